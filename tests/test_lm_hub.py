"""varup.lm.hub: fetching a tiny Qwen2 model + tokenizer from a local hub-like HTTP server (127.0.0.1 only) and
loading them back through transformers."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import shutil
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from varup.base.download import ChecksumError, DownloadError  # noqa: E402
from varup.lm.hub import fetch_hub_model, hub_file_url, load_causal_lm, load_tokenizer  # noqa: E402

REPO, REV = "tiny-org/tiny-qwen2", "v1"
WORDS = "the a cat dog sat on mat ran far and".split()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_tokenizer(pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"pad_token": "<pad>"} if pad else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", **kw)


def tiny_model():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model and tokenizer written by save_pretrained; (folder, model, tokenizer, relative file names)."""
    folder = tmp_path_factory.mktemp("saved")
    model, tok = tiny_model(), tiny_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return folder, model, tok, files


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, saved):
    """A local server laid out as /<repo_id>/resolve/<revision>/<file>, serving a copy of the saved folder."""
    root = tmp_path / "hubroot"
    repo_dir = root / REPO / "resolve" / REV
    shutil.copytree(saved[0], repo_dir)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.endpoint, srv.repo_dir = f"http://127.0.0.1:{srv.server_address[1]}/", repo_dir
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hub_file_url():
    assert hub_file_url("https://huggingface.co/", "Qwen/Qwen1.5-0.5B", "main", "config.json") == \
        "https://huggingface.co/Qwen/Qwen1.5-0.5B/resolve/main/config.json"
    assert hub_file_url("http://h:1", "o/r", "abc", "sub/x.bin") == "http://h:1/o/r/resolve/abc/sub/x.bin"


def test_fetch_and_load_round_trip(hub, saved, tmp_path, caplog):
    folder, model, tok, files = saved
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    dest = tmp_path / "weights"
    with caplog.at_level(logging.WARNING, logger="varup"):
        rec = fetch_hub_model(REPO, dest, files=files, revision=REV, endpoint=hub.endpoint, config_key="lm.weights")
    assert rec == {"repo_id": REPO, "revision": REV, "endpoint": hub.endpoint,
                   "files": {f: _sha(folder / f) for f in files}}
    assert json.loads((dest / "varup_fetch.json").read_text()) == rec
    for f in files:  # trusted on first use: the hash is recorded, and the warning says where to pin it
        assert (dest / f).read_bytes() == (folder / f).read_bytes()
        assert (dest / (f + ".sha256")).read_text().strip() == rec["files"][f]
    assert "lm.weights/sha256/config.json" in caplog.text

    loaded = load_causal_lm(dest, dtype="float32")
    assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    ltok = load_tokenizer(dest)
    text = "the cat sat on the mat"
    enc = ltok(text)["input_ids"]
    assert enc == tok(text)["input_ids"] and ltok.decode(enc) == text
    assert ltok.padding_side == "left" and ltok.pad_token == "<pad>" and ltok.eos_token == "<eos>"
    batch = ltok(["the cat", "the cat sat on"], padding=True)["input_ids"]
    assert batch[0][:2] == [ltok.pad_token_id] * 2 and batch[0][2:] == batch[1][:2]


def test_load_in_bfloat16(hub, saved, tmp_path):
    fetch_hub_model(REPO, tmp_path / "w", files=saved[3], revision=REV, endpoint=hub.endpoint)
    m = load_causal_lm(tmp_path / "w", dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float33"):
        load_causal_lm(tmp_path / "w", dtype="float33")


def test_tokenizer_without_pad_gets_eos(tmp_path):
    tiny_tokenizer(pad=False).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"


def test_wrong_pinned_sha_leaves_no_file(hub, saved, tmp_path):
    dest = tmp_path / "w"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as ei:
        fetch_hub_model(REPO, dest, files=["config.json"], revision=REV, endpoint=hub.endpoint,
                        sha256={"config.json": wrong})
    assert "config.json" in str(ei.value) and REPO in str(ei.value) and wrong in str(ei.value)
    assert not (dest / "config.json").exists() and not (dest / "config.json.part").exists()
    assert not (dest / "config.json.sha256").exists() and not (dest / "varup_fetch.json").exists()


def test_pinned_sha_ok(hub, saved, tmp_path):
    folder = saved[0]
    pins = {"config.json": _sha(folder / "config.json")}
    rec = fetch_hub_model(REPO, tmp_path / "w", files=["config.json", "tokenizer.json"], revision=REV,
                          endpoint=hub.endpoint, sha256=pins)
    assert rec["files"]["config.json"] == pins["config.json"]


def test_refetch_verifies_recorded_hash(hub, saved, tmp_path):
    """A second fetch checks the hash recorded on first use: a tampered local file is fetched again (fetch_file
    re-downloads on mismatch); a changed upstream file is refused with ChecksumError naming the sidecar."""
    folder, files = saved[0], ["config.json", "model.safetensors"]
    dest = tmp_path / "w"
    first = fetch_hub_model(REPO, dest, files=files, revision=REV, endpoint=hub.endpoint)
    target = dest / "model.safetensors"
    target.write_bytes(b"tampered" + target.read_bytes()[8:])
    again = fetch_hub_model(REPO, dest, files=files, revision=REV, endpoint=hub.endpoint)
    assert again == first and target.read_bytes() == (folder / "model.safetensors").read_bytes()

    target.write_bytes(b"tampered")  # now the server's copy changes too
    (hub.repo_dir / "model.safetensors").write_bytes(b"upstream changed")
    with pytest.raises(ChecksumError) as ei:
        fetch_hub_model(REPO, dest, files=files, revision=REV, endpoint=hub.endpoint)
    msg = str(ei.value)
    assert "model.safetensors" in msg and REV in msg and "model.safetensors.sha256" in msg
    # fetch_file deletes the wrong download (.part) but leaves the local file as it found it
    assert target.read_bytes() == b"tampered" and not (dest / "model.safetensors.part").exists()


def test_missing_file_is_named(hub, tmp_path):
    with pytest.raises(DownloadError) as ei:
        fetch_hub_model(REPO, tmp_path / "w", files=["config.json", "no_such_file.bin"], revision=REV,
                        endpoint=hub.endpoint)
    msg = str(ei.value)
    assert type(ei.value) is DownloadError
    assert "no_such_file.bin" in msg and REPO in msg and REV in msg and "404" in msg
    assert not (tmp_path / "w" / "varup_fetch.json").exists()


def test_html_page_as_json_is_refused(hub, tmp_path):
    (hub.repo_dir / "config.json").write_text("<!DOCTYPE html><html><body>Sign in</body></html>\n")
    dest = tmp_path / "w"
    with pytest.raises(ValueError, match="config.json") as ei:
        fetch_hub_model(REPO, dest, files=["config.json"], revision=REV, endpoint=hub.endpoint)
    assert "html" in str(ei.value).lower()
    assert not (dest / "config.json").exists() and not (dest / "config.json.sha256").exists()


def test_bad_file_names_refused(tmp_path):
    for bad in ("../x.json", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            fetch_hub_model(REPO, tmp_path, files=[bad], endpoint="http://127.0.0.1:9")


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as ei:
        load_causal_lm(missing)
    assert str(missing) in str(ei.value) and "lm_weights" in str(ei.value)
    with pytest.raises(FileNotFoundError) as ei:
        load_tokenizer(missing)
    assert str(missing) in str(ei.value)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(missing)
