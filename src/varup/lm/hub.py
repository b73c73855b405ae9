"""Fetching a hub model's files (sha256-checked, resumable) and loading models / tokenizers from local folders.

Files are fetched from the Hugging Face resolve layout (``<endpoint>/<repo_id>/resolve/<revision>/<file>``) with
:func:`varup.base.download.fetch_file`: a pinned sha256 is verified, an unpinned file is trusted on first use and its hash
recorded in ``<file>.sha256`` for later runs to verify. Loading never touches the network (``local_files_only``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath

from varup.base.download import ChecksumError, DownloadError, fetch_file
from varup.base.utils import atomic_write_json

log = logging.getLogger("varup.lm.hub")

DEFAULT_ENDPOINT = "https://huggingface.co"
FETCH_RECORD = "varup_fetch.json"
_HOW_TO_FETCH = "run `snakemake lm_weights` or `python -m varup lm-fetch` to fetch it"


def hub_file_url(endpoint: str, repo_id: str, revision: str, filename: str) -> str:
    """URL of ``filename`` at ``revision`` of ``repo_id`` in the hub's resolve layout."""
    return f"{endpoint.rstrip('/')}/{repo_id}/resolve/{revision}/{filename}"


def _check_filename(filename: str) -> str:
    p = PurePosixPath(filename)
    if not filename or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"hub file name must be a relative path inside the repository, got {filename!r}")
    return str(p)


def _json_validator(repo_id: str, filename: str):
    """A ``validate`` callback refusing a file that is not JSON (e.g. an HTML error or login page)."""
    def validate(path: Path) -> None:
        try:
            json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            head = Path(path).read_bytes()[:60]
            raise ValueError(f"{filename} of {repo_id} is not valid JSON ({e}); it starts with {head!r} "
                             f"(an HTML error page?); refused") from None
    return validate


def fetch_hub_model(repo_id: str, dest_dir: str | os.PathLike, *, files: list[str], revision: str = "main",
                    endpoint: str = DEFAULT_ENDPOINT, sha256: dict[str, str] | None = None,
                    config_key: str | None = None) -> dict:
    """Fetch ``files`` of ``repo_id`` at ``revision`` into ``dest_dir/<file>`` (pinned by ``sha256[file]`` when
    given, trusted on first use otherwise; ``*.json`` files must parse), then write ``dest_dir/varup_fetch.json``
    = {repo_id, revision, endpoint, files: {name: sha256}} and return it.
    Raises :class:`DownloadError` / :class:`ChecksumError` naming repo, revision and file, or ValueError when a
    JSON file does not parse (the file is then not kept)."""
    if not files:
        raise ValueError(f"no files listed to fetch from {repo_id}")
    dest_dir = Path(dest_dir)
    sha256 = sha256 or {}
    unknown = sorted(set(sha256) - set(files))
    if unknown:
        raise ValueError(f"sha256 pinned for files not in the list to fetch from {repo_id}: {unknown}")
    hashes = {}
    for name in files:
        name = _check_filename(name)
        url = hub_file_url(endpoint, repo_id, revision, name)
        key = f"{config_key}/sha256/{name}" if config_key else None
        validate = _json_validator(repo_id, name) if name.endswith(".json") else None
        try:
            res = fetch_file(url, dest_dir / name, sha256.get(name), config_key=key, validate=validate)
        except DownloadError as e:  # ChecksumError included: keep the type, add which file of which repo
            raise type(e)(f"cannot fetch {name} of {repo_id} at revision {revision}: {e}") from e
        hashes[name] = res["sha256"]
        log.info("%s@%s: %s ok (sha256 %s%s)", repo_id, revision, name, res["sha256"][:12],
                 ", pinned" if res["pinned"] else "")
    record = {"repo_id": repo_id, "revision": revision, "endpoint": endpoint, "files": hashes}
    atomic_write_json(dest_dir / FETCH_RECORD, record)
    return record


def _require_dir(path: str | os.PathLike, what: str, marker: str | None = None) -> Path:
    """``path`` as a Path, or FileNotFoundError naming it (and ``marker``, a file it must hold) and how to fetch it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}; {_HOW_TO_FETCH}")
    if marker and not (path / marker).is_file():
        raise FileNotFoundError(f"{what} folder {path} has no {marker}; {_HOW_TO_FETCH}")
    return path


def _torch_dtype(dtype: str):
    import torch

    dt = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r} (e.g. float32, bfloat16, float16)")
    return dt


def quiet_transformers() -> None:
    """No per-call tqdm bars from transformers ("Loading weights", "Writing model shards") in job logs: varup's own
    progress bars and log lines cover the stages; kept when a person watches a terminal."""
    import sys

    if os.environ.get("VARUP_NO_PROGRESS") == "1" or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_causal_lm(path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu"):
    """``AutoModelForCausalLM`` from the local folder ``path`` (no network) in ``dtype``, moved to ``device``.
    Works with transformers 5 (``dtype=``) and 4.x (``torch_dtype=``). FileNotFoundError if the folder is missing."""
    from transformers import AutoModelForCausalLM

    path = _require_dir(path, "model", marker="config.json")
    quiet_transformers()
    dt = _torch_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True)
    except TypeError:  # transformers 4.x before `dtype=`: the kwarg reaches the model's __init__
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dt, local_files_only=True)
    return model.to(device)


_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declares_generic_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a ``tokenizer.json`` and its ``tokenizer_config.json`` declares a generic
    (tokenizer.json-driven) class rather than a model-specific one."""
    cfg = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class") in _GENERIC_TOKENIZERS
    except (ValueError, AttributeError):
        return False


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in the local folder ``path`` (``AutoTokenizer``, or the generic fast tokenizer when
    ``tokenizer_config.json`` declares one), set up for batched generation: pad token = eos token when
    it has none, left padding. FileNotFoundError if the folder is missing."""
    from transformers import AutoTokenizer

    path = _require_dir(path, "tokenizer")
    if _declares_generic_tokenizer(path):
        # transformers 5's AutoTokenizer overrides the declared class for some model types (qwen2 among them) and
        # rebuilds e.g. Qwen2Tokenizer from the vocabulary alone, dropping tokenizer.json's own pipeline
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer in {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


__all__ = ["hub_file_url", "fetch_hub_model", "load_causal_lm", "load_tokenizer", "DownloadError", "ChecksumError",
           "DEFAULT_ENDPOINT", "FETCH_RECORD"]
