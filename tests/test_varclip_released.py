"""VAR-CLIP as released (text.released): the settings that follow its weights (text.encoder.act, text.null_condition:
auto), the sha256-checked fetch of its checkpoint from a local HTTP server, the strict conversion into a model file
of the prompt study, and the study's run plan around it."""
from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from test_clip import CAPTIONS, TINY, tiny  # noqa: F401  (the tiny CLIP fixture: registered config + saved weights)
from test_download import FAST, server  # noqa: F401  (the local HTTP server fixture)
from test_textvar import PN, tiny_textvar
from varup.base.download import ChecksumError, DownloadError
from varup.config.schema import load_config
from varup.config.textplan import (
    RELEASED,
    TextRun,
    encoder_spec,
    released_run,
    study_runs,
    text_problems,
    text_run_spec,
    text_runs,
    text_settings,
)
from varup.models.checkpoint import load_model, load_text_encoder, released_model_file
from varup.models.clip import ClipTextEncoder
from varup.models.textvar import TextVAR, fetch_varclip

CONFIG = Path(__file__).resolve().parents[1] / "config"


@pytest.fixture
def paper() -> dict:
    return load_config(CONFIG / "paper.yaml")


def test_settings_follow_the_released_weights_from_one_function(paper):
    """auto: VAR-CLIP's GELU tower and learned null with text.released, OpenAI's QuickGELU and the empty caption
    without; a value set explicitly is kept; the run spec records the resolved values."""
    assert paper["text"]["encoder"]["act"] == "auto" and paper["text"]["null_condition"] == "auto"
    assert text_settings(paper) == {"act": "gelu", "null_condition": "learned"}
    run = text_runs(paper)[0]
    spec = text_run_spec(paper, run)
    assert spec["text"] == {"encoder": {"kind": "clip", "arch": "ViT-L-14", "act": "gelu"}, "null_condition": "learned"}
    del paper["text"]["released"]
    assert text_settings(paper) == {"act": "quick_gelu", "null_condition": "empty_caption"}
    assert encoder_spec(paper)["act"] == "quick_gelu"
    paper["text"]["encoder"]["act"], paper["text"]["null_condition"] = "gelu", "learned"
    assert text_settings(paper) == {"act": "gelu", "null_condition": "learned"}
    toy = load_config(CONFIG / "config.yaml")
    assert text_settings(toy)["null_condition"] == "empty_caption" and "act" not in encoder_spec(toy)


def test_the_released_model_is_a_study_run_and_its_needs_are_checked(paper):
    rel = TextRun("afhq", 16, RELEASED, 0, "text")
    assert released_run(paper) == rel and study_runs(paper)[-1] == rel
    assert rel.path == "afhq/text_d16/released/seed0" and rel not in text_runs(paper)  # sampled, never trained
    assert text_problems(paper) == []
    paper["text"]["encoder"]["kind"] = "toy"
    paper["datasets"]["afhq"]["tokenizer"] = "mine"
    paper["tokenizers"]["mine"] = {"kind": "train"}
    paper["methods"][RELEASED] = paper["methods"]["baseline"]
    problems = "\n".join(text_problems(paper))
    assert "text/encoder/kind clip" in problems and "datasets/afhq/tokenizer" in problems
    assert "methods/released" in problems
    paper["text"]["prompts"]["families"] = ["var"]
    assert released_run(paper) is None


def varclip_checkpoint(model: TextVAR) -> bytes:
    """A VAR-CLIP training checkpoint as its trainer writes it (var_wo_ddp beside the optimiser, args as a dict)."""
    buf = io.BytesIO()
    torch.save({"epoch": 999, "iter": 0, "args": OrderedDict(depth=2, pn="1_2_3_4", cmd=""),
                "trainer": {"config": {"ls": 0.0}, "var_wo_ddp": model.state_dict(),
                            "var_opt": {"optim": {"state": {}, "param_groups": []}}}}, buf)
    return buf.getvalue()


def test_the_released_checkpoint_is_fetched_pinned_and_converted_strictly(server, tmp_path):  # noqa: F811
    model = tiny_textvar().eval()
    server.payload = varclip_checkpoint(model)
    sha = hashlib.sha256(server.payload).hexdigest()
    dest = tmp_path / "var_clip_d2.pth"
    with pytest.raises(ChecksumError, match="0" * 64):
        fetch_varclip(server.url, dest, "0" * 64, **FAST)
    assert not dest.exists()
    got = fetch_varclip(server.url, dest, sha, **FAST)
    assert got["pinned"] and got["sha256"] == sha and dest.read_bytes() == server.payload
    out = tmp_path / "model.pt"
    rec = released_model_file(dest, out, null_condition="learned", act="gelu", depth=2, source=server.url)
    assert rec == {"depth": 2, "encoder": {"kind": "clip", "arch": "ViT-L-14", "act": "gelu"},
                   "null_condition": "learned"}
    loaded = load_model(out)
    assert isinstance(loaded, TextVAR) and loaded.patch_nums == PN
    x = torch.randn(2, sum(p * p for p in PN) - 1, 8)
    e = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    torch.testing.assert_close(loaded(e, x), model(e, x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.noise.weight, model.noise.weight, rtol=0, atol=0)  # its learned null
    with pytest.raises(ValueError, match="text.released.depth"):
        released_model_file(dest, tmp_path / "m16.pt", null_condition="learned", act="gelu", depth=16)


def test_a_file_that_is_no_varclip_is_never_trusted_and_offline_says_what_to_do(server, tmp_path):  # noqa: F811
    bad = tiny_textvar().state_dict()
    bad["extra.weight"] = torch.zeros(1)  # strict: one key too many
    buf = io.BytesIO()
    torch.save(bad, buf)
    server.payload = buf.getvalue()
    with pytest.raises(Exception, match="extra.weight"):
        fetch_varclip(server.url, tmp_path / "v.pth", **FAST)  # no sha256: would be trusted on first use
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the file nor a recorded hash
    url = server.url
    server.shutdown()
    server.server_close()
    with pytest.raises(DownloadError, match="text.released.url"):
        fetch_varclip(url, tmp_path / "v.pth", retries=0, timeout=2)


def test_the_released_model_file_runs_its_clip_tower_with_the_recorded_activation(tiny, tmp_path):  # noqa: F811
    model, files = tiny
    torch.save(tiny_textvar(text_dim=32).state_dict(), tmp_path / "var_clip.pth")
    for act in ("gelu", "quick_gelu"):
        out = tmp_path / f"{act}.pt"
        released_model_file(tmp_path / "var_clip.pth", out, null_condition="learned", act=act, arch=TINY)
        enc = load_text_encoder(out, files["state_dict"])
        assert enc.act == act
        want = ClipTextEncoder(files["state_dict"], arch=TINY, act=act).encode(CAPTIONS)
        torch.testing.assert_close(enc.encode(CAPTIONS), want, rtol=0, atol=0)
    gelu, quick = (load_text_encoder(tmp_path / f"{a}.pt", files["state_dict"]) for a in ("gelu", "quick_gelu"))
    assert (gelu.encode(CAPTIONS) - quick.encode(CAPTIONS)).abs().max() > 1e-3
