"""databricks-dolly-15k: reading, prompt formatting and the seeded held-out split.

The source is JSONL, one record a line, with the string keys ``instruction``, ``context`` (may be empty),
``response`` and ``category``; a record's ``id`` is its 0-based index in the file.

The LM arm's common record format (written by :func:`write_split`, and by :mod:`varup.lm.grammar` with the extra
keys ``instruction`` and ``mode``) is JSONL with one object a line::

    {"id": int, "prompt": str, "response": str, "category": str}

where ``prompt`` is the instruction (and context) formatted with a template (:func:`format_prompt`); the model is
trained on ``prompt + response`` and asked to continue ``prompt`` at generation time.
"""
from __future__ import annotations

import json
import os
import string
from collections import Counter
from pathlib import Path

import numpy as np

from varup.base.utils import atomic_write_json, atomic_write_text
from varup.data.textfile import read_utf8, text_lines

KEYS = ("instruction", "context", "response", "category")

#: named prompt templates (``str.format`` strings); ``{context_block}`` is empty when the record has no context
TEMPLATES = {
    "dolly": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n{instruction}\n\n{context_block}### Response:\n"),
    "plain": "{instruction}\n{context_block}",
}
#: what ``{context_block}`` becomes for a non-empty context, per named template (``{context}`` is substituted)
CONTEXT_BLOCKS = {"dolly": "### Input:\n{context}\n\n", "plain": "{context}\n"}
#: ``{context_block}`` of a literal (user) template
DEFAULT_CONTEXT_BLOCK = "{context}\n"
FIELDS = ("instruction", "context", "context_block")


# ------------------------------------------------------------------------------------------------ reading
def _check_record(raw, where: str) -> dict:
    """The four dolly keys of ``raw`` (all strings), or ValueError naming ``where`` and the bad key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for k in KEYS:
        if k not in raw:
            raise ValueError(f"{where}: record has no key {k!r} (needs {', '.join(KEYS)})")
        if not isinstance(raw[k], str):
            raise ValueError(f"{where}: key {k!r} must be a string, got {type(raw[k]).__name__}")
    return {k: raw[k] for k in KEYS}


def read_dolly(path: str | os.PathLike) -> list[dict]:
    """The records of the dolly JSONL file ``path`` (blank lines skipped), each with ``id`` = its 0-based index.
    ValueError naming the file and 1-based line for bytes that are not UTF-8, invalid JSON (e.g. a line cut short)
    or a missing / non-string key."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(text_lines(read_utf8(path)), 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e}); a truncated download? Fetch the file again") from None
        out.append({"id": len(out), **_check_record(raw, where)})
    return out


def read_dolly_datasets(path_or_name: str | os.PathLike, split: str = "train", **kw) -> list[dict]:
    """The same records as :func:`read_dolly`, read with ``datasets.load_dataset``: a local ``.json``/``.jsonl``
    file through the ``json`` builder, otherwise ``path_or_name`` as a dataset name (e.g.
    ``databricks/databricks-dolly-15k``). ``kw`` goes to ``load_dataset`` (e.g. ``cache_dir``). A local file that
    the builder cannot read (it names no line) is read again line by line, so the error names the file and line."""
    import datasets

    p = Path(path_or_name)
    if not p.is_file():
        ds = datasets.load_dataset(str(path_or_name), split=split, **kw)
    else:
        read_utf8(p)  # the json builder loads bytes that are not UTF-8, then fails on reading the row, naming no file
        try:
            ds = datasets.load_dataset("json", data_files=str(p), split=split, **kw)
        except Exception as e:  # e.g. DatasetGenerationError, naming no line: find the bad line
            n = len(read_dolly(p))  # raises, naming file and line, for a line the builder choked on
            raise ValueError(f"{p}: datasets.load_dataset could not read its {n} records ({type(e).__name__}: {e}); "
                             f"lm.corpus.reader: json reads them line by line") from e
    return [{"id": i, **_check_record(row, f"{path_or_name} ({split}), row {i}")} for i, row in enumerate(ds)]


# ------------------------------------------------------------------------------------------------ prompts
def _fields(template: str) -> set[str]:
    try:
        return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template)
                if name is not None}
    except ValueError as e:
        raise ValueError(f"malformed prompt template {template!r}: {e}") from None


def format_prompt(rec: dict, template: str, *, context_block: str | None = None) -> str:
    """``rec``'s prompt: ``template`` (a key of :data:`TEMPLATES` or a literal ``str.format`` string) with the fields
    ``{instruction}``, ``{context}`` and ``{context_block}``; the last is empty for an empty (or blank) context and
    otherwise ``context_block`` (default: the named template's :data:`CONTEXT_BLOCKS` entry, or
    :data:`DEFAULT_CONTEXT_BLOCK` for a literal template) with ``{context}`` substituted.
    ValueError for an unknown template name or an unknown field."""
    template = next((k for k, v in TEMPLATES.items() if v == template), template)  # a named one, spelt out
    if template in TEMPLATES:
        block = CONTEXT_BLOCKS[template] if context_block is None else context_block
        template = TEMPLATES[template]
    elif "{" in template:
        block = DEFAULT_CONTEXT_BLOCK if context_block is None else context_block
    else:
        raise ValueError(f"unknown prompt template {template!r}: use one of {sorted(TEMPLATES)} or a format string "
                         f"with the fields {', '.join('{' + f + '}' for f in FIELDS)}")
    unknown = sorted(_fields(template) - set(FIELDS))
    if unknown:
        raise ValueError(f"prompt template has unknown field(s) {unknown} (allowed: {', '.join(FIELDS)}): "
                         f"{template!r}")
    bad = sorted(_fields(block) - {"context"})
    if bad:
        raise ValueError(f"context block may only use the field 'context', got {bad}: {block!r}")
    context = rec.get("context") or ""
    cb = block.format(context=context) if context.strip() else ""
    return template.format(instruction=rec["instruction"], context=context, context_block=cb)


# -------------------------------------------------------------------------------------------------- split
def split_dolly(records: list[dict], *, n_eval: int, seed: int,
                categories: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, eval): the records of ``categories`` (all when None), in the order of a permutation drawn with
    ``numpy.random.default_rng(seed)``; the first ``n_eval`` are eval, the rest train. ValueError when a listed
    category has no record or ``n_eval`` exceeds the records available."""
    if categories is not None:
        wanted = set(categories)
        absent = sorted(wanted - {r["category"] for r in records})
        if absent:
            raise ValueError(f"categories with no record: {absent}")
        records = [r for r in records if r["category"] in wanted]
    if not 0 <= n_eval <= len(records):
        raise ValueError(f"n_eval={n_eval} but only {len(records)} records are available"
                         + (f" in categories {sorted(categories)}" if categories is not None else ""))
    perm = np.random.default_rng(seed).permutation(len(records))
    shuffled = [records[i] for i in perm]
    return shuffled[n_eval:], shuffled[:n_eval]


def write_split(records: list[dict], out_jsonl: str | os.PathLike, template: str) -> None:
    """Write ``records`` atomically to ``out_jsonl`` in the common record format (``id``, ``prompt`` formatted with
    ``template``, ``response``, ``category``)."""
    lines = (json.dumps({"id": r["id"], "prompt": format_prompt(r, template), "response": r["response"],
                         "category": r["category"]}) + "\n" for r in records)
    atomic_write_text(out_jsonl, "".join(lines))


def prepare_dolly(src_jsonl: str | os.PathLike, out_dir: str | os.PathLike, *, n_eval: int, seed: int, template: str,
                  categories: list[str] | None = None, reader: str = "datasets") -> dict:
    """Read ``src_jsonl`` (``reader``: ``datasets`` through ``datasets.load_dataset`` with a throwaway cache, or
    ``json`` line by line: the same records), split it (:func:`split_dolly`) and write ``out_dir/train.jsonl``,
    ``out_dir/eval.jsonl`` and ``out_dir/summary.json``; returns the summary {n_train, n_eval, by_category}."""
    out = Path(out_dir)
    if reader == "datasets":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="varup-datasets-") as cache:
            records = read_dolly_datasets(src_jsonl, cache_dir=cache)
    elif reader == "json":
        records = read_dolly(src_jsonl)
    else:
        raise ValueError(f"lm.corpus.reader must be 'datasets' or 'json', got {reader!r}")
    try:
        train, ev = split_dolly(records, n_eval=n_eval, seed=seed, categories=categories)
    except ValueError as e:
        raise ValueError(f"{src_jsonl}: {e}; set lm.corpus.n_eval / lm.corpus.categories") from None
    if not train or not ev:  # an empty set would fail later (SFT, MAUVE), naming neither the file nor the key
        kept = f"{len(train) + len(ev)} records" + (f" in categories {sorted(categories)}" if categories else "")
        raise ValueError(f"{src_jsonl}: lm.corpus.n_eval={n_eval} of {kept} leaves {len(train)} SFT and {len(ev)} "
                         f"held-out records; both must be non-empty (lm.corpus.n_eval, lm.corpus.categories)")
    format_prompt({"instruction": "", "context": "x"}, template)  # a bad template fails before anything is written
    write_split(train, out / "train.jsonl", template)
    write_split(ev, out / "eval.jsonl", template)
    n_tr, n_ev = Counter(r["category"] for r in train), Counter(r["category"] for r in ev)
    summary = {"n_train": len(train), "n_eval": len(ev),
               "by_category": {c: {"train": n_tr[c], "eval": n_ev[c]} for c in sorted(n_tr | n_ev)}}
    atomic_write_json(out / "summary.json", summary)
    return summary


__all__ = ["KEYS", "TEMPLATES", "CONTEXT_BLOCKS", "read_dolly", "read_dolly_datasets", "format_prompt", "split_dolly",
           "write_split", "prepare_dolly"]
