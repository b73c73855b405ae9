"""varup.models.clip and the CMMD image embedder: the real open_clip loading path on a tiny registered model config
(weights saved as a state dict, safetensors and an OpenAI-style TorchScript archive), and the weight fetch from
a local HTTP server (test_download's)."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import warnings
import zipfile

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from test_download import FAST, server  # noqa: F401  (the local HTTP server fixture)
from varup.base.download import ChecksumError
from varup.metrics.cmmd import ClipImageEmbedder, cmmd_preprocess
from varup.models.clip import CLIP_WEIGHTS, ClipTextEncoder, fetch_clip_weights, is_torchscript, load_clip_state_dict

TINY = "varup-tiny-clip"
TINY_WIDE = "varup-tiny-clip-wide"
CONFIG = {"embed_dim": 32,
          "vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "patch_size": 14, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CAPTIONS = ["a photo of a goldfish", "", "a tabby cat on a sofa"]


def tiny_model(arch: str = TINY) -> torch.nn.Module:
    """A random tiny open_clip CLIP (QuickGELU, as OpenAI's), parameters pushed away from any fresh init."""
    torch.manual_seed(0)
    model = open_clip.create_model(arch, force_quick_gelu=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny configs registered with open_clip, one model, and its weights in three file formats."""
    root = tmp_path_factory.mktemp("clip")
    wide = json.loads(json.dumps(CONFIG))
    wide["text_cfg"]["width"] = 64
    for name, cfg in ((TINY, CONFIG), (TINY_WIDE, wide)):
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
    model = tiny_model()
    files = {"state_dict": root / "tiny_sd.pt", "safetensors": root / "tiny.safetensors",
             "torchscript": root / "tiny_ts.pt"}
    torch.save({"state_dict": model.state_dict()}, files["state_dict"])
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files["safetensors"]))
    save_openai_style_torchscript(tiny_model(), files["torchscript"])
    return model, files


def save_openai_style_torchscript(model, path):
    """A TorchScript archive of the model carrying, like OpenAI's release files, an int buffer beside the weights
    (their context_length / vocab_size are attributes of open_clip's model here, so only input_resolution)."""
    model.register_buffer("input_resolution", torch.tensor(28))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))


def reference_text(model, captions):
    return F.normalize(model.encode_text(open_clip.get_tokenizer(TINY)(captions)), dim=-1)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "torchscript"])
def test_text_encoder_outputs_equal_the_saved_models(tiny, fmt):
    model, files = tiny
    enc = ClipTextEncoder(files[fmt], arch=TINY)
    out = enc.encode(CAPTIONS)
    assert enc.dim == 32 and out.shape == (3, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(out, reference_text(model, CAPTIONS), atol=1e-6, rtol=1e-5)
    assert not out.requires_grad and not any(p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training


def test_text_encoder_is_deterministic_and_the_empty_caption_works(tiny):
    _, files = tiny
    enc = ClipTextEncoder(files["state_dict"], arch=TINY)
    out = enc.encode(CAPTIONS)
    torch.testing.assert_close(enc.encode(CAPTIONS), out, atol=0, rtol=0)
    empty = enc.encode([""])
    torch.testing.assert_close(empty[0], out[1], atol=1e-6, rtol=1e-5)  # independent of the batch
    assert torch.isfinite(empty).all() and (empty[0] - out[0]).abs().max() > 1e-3
    sot, eot = enc.tokenizer.sot_token_id, enc.tokenizer.eot_token_id
    assert enc.tokenizer([""])[0, :3].tolist() == [sot, eot, 0]
    with pytest.raises(TypeError, match="list"):
        enc.encode("a cat")


def test_openai_weights_get_quick_gelu_and_a_fresh_model_differs(tiny):
    model, files = tiny
    enc = ClipTextEncoder(files["torchscript"], arch=TINY)
    assert type(enc.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    gelu = ClipTextEncoder(files["torchscript"], arch=TINY, act="gelu")
    assert (gelu.encode(CAPTIONS) - enc.encode(CAPTIONS)).abs().max() > 1e-4
    fresh = open_clip.create_model(TINY, force_quick_gelu=True).eval()
    with torch.no_grad():
        assert (reference_text(fresh, CAPTIONS) - enc.encode(CAPTIONS)).abs().max() > 1e-3


class Formula(torch.nn.Module):
    """An MLP activation written out: OpenAI's QuickGELU x·sigmoid(1.702x), or the exact (erf) GELU."""

    def __init__(self, act: str):
        super().__init__()
        self.act = act

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else 0.5 * x * (1 + torch.erf(x / 2 ** 0.5))


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_the_activation_changes_the_text_embedding_as_written_on_saved_weights(tiny, fmt):
    """text.encoder.act on saved weights: gelu (VAR-CLIP's) and quick_gelu (OpenAI's) give different embeddings,
    each equal to the saved tower computed with that activation written out in every MLP."""
    model, files = tiny
    got = {act: ClipTextEncoder(files[fmt], arch=TINY, act=act).encode(CAPTIONS) for act in ("gelu", "quick_gelu")}
    assert (got["gelu"] - got["quick_gelu"]).abs().max() > 1e-3
    for act, out in got.items():
        ref = open_clip.create_model(TINY, force_quick_gelu=False).eval()
        ref.load_state_dict(model.state_dict())
        for block in ref.transformer.resblocks:
            block.mlp.gelu = Formula(act)
        with torch.no_grad():
            torch.testing.assert_close(out, reference_text(ref, CAPTIONS), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="text.encoder.act"):
        ClipTextEncoder(files[fmt], arch=TINY, act="auto")


def test_torchscript_extras_are_dropped_and_detected(tiny):
    _, files = tiny
    assert is_torchscript(files["torchscript"]) and not is_torchscript(files["state_dict"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        raw = torch.jit.load(str(files["torchscript"])).state_dict()
    assert {"input_resolution", "attn_mask"} <= set(raw)
    sd = load_clip_state_dict(files["torchscript"])
    assert not {"input_resolution", "context_length", "vocab_size", "attn_mask"} & set(sd)
    assert set(sd) == set(load_clip_state_dict(files["state_dict"]))


class NotAWeight:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (print, ("unpickled code ran",))


def test_pickles_with_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": NotAWeight()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_clip_state_dict(path)


def test_missing_file_names_the_registry_key_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        ClipTextEncoder(tmp_path / "ViT-L-14.pt")
    msg = str(ei.value)
    assert str(tmp_path / "ViT-L-14.pt") in msg and "fetch_clip_weights('ViT-L-14'" in msg
    assert CLIP_WEIGHTS["ViT-L-14"].url in msg
    with pytest.raises(FileNotFoundError, match="ViT-L-14-336px.pt"):
        ClipImageEmbedder(tmp_path / "x.pt")


def test_weights_of_another_architecture_are_a_clear_error(tiny):
    _, files = tiny
    with pytest.raises(ValueError, match=f"does not hold open_clip {TINY_WIDE} weights") as ei:
        ClipTextEncoder(files["state_dict"], arch=TINY_WIDE)
    assert str(files["state_dict"]) in str(ei.value)


# --------------------------------------------------------------------------------------- image embedder
def images_of_mixed_sizes():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
            [(28, 28, 3), (40, 60, 3), (64, 32, 3), (17, 17, 3), (100, 100, 3)]]


def test_image_embedder_outputs_equal_the_saved_models(tiny):
    model, files = tiny
    emb = ClipImageEmbedder(files["torchscript"], arch=TINY, batch_size=2)
    images = images_of_mixed_sizes()
    out = emb.embed(images)
    assert emb.size == 28 and out.shape == (5, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    x = torch.from_numpy(np.stack([cmmd_preprocess(im, 28) for im in images]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = F.normalize(model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(ClipImageEmbedder(files["state_dict"], arch=TINY, batch_size=5).embed(images), out,
                               atol=1e-5)


def test_image_embedder_takes_an_nhwc_array(tiny):
    _, files = tiny
    emb = ClipImageEmbedder(files["state_dict"], arch=TINY, batch_size=3)
    batch = np.random.default_rng(1).integers(0, 256, (4, 30, 30, 3), dtype=np.uint8)
    out = emb.embed(batch)
    np.testing.assert_allclose(out, emb.embed(list(batch)), atol=0)
    np.testing.assert_array_equal(out, emb.embed(batch))  # deterministic
    assert emb.embed(batch[:0]).shape == (0, 32)


# ------------------------------------------------------------------------------------------------ fetch
def test_registry_urls_carry_the_sha256():
    assert set(CLIP_WEIGHTS) == {"ViT-L-14", "ViT-L-14-336"}
    for name, w in CLIP_WEIGHTS.items():
        assert w.arch == name and name in open_clip.list_models()
        assert w.url == f"https://openaipublic.azureedge.net/clip/models/{w.sha256}/{w.file}"
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
    assert CLIP_WEIGHTS["ViT-L-14-336"].file == "ViT-L-14-336px.pt"


def zip_payload() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(1000.0)}, buf)
    assert zipfile.is_zipfile(io.BytesIO(buf.getvalue()))
    return buf.getvalue()


def test_fetch_from_a_mirror_with_its_sha256(server, tmp_path):  # noqa: F811
    server.payload = zip_payload()
    sha = hashlib.sha256(server.payload).hexdigest()
    path = fetch_clip_weights("ViT-L-14", tmp_path, url=server.url, sha256=sha)
    assert path == tmp_path / "ViT-L-14.pt" and path.read_bytes() == server.payload
    assert fetch_clip_weights("ViT-L-14", tmp_path, url=server.url, sha256=sha) == path
    assert len(server.requests) == 1  # verified on disk, not fetched again


def test_fetch_with_a_wrong_checksum_keeps_nothing(server, tmp_path):  # noqa: F811
    server.payload = zip_payload()
    with pytest.raises(ChecksumError, match="0" * 64):
        fetch_clip_weights("ViT-L-14-336", tmp_path, url=server.url, sha256="0" * 64)
    # a mirror URL alone is still checked against the registry's sha256
    with pytest.raises(ChecksumError, match=CLIP_WEIGHTS["ViT-L-14-336"].sha256):
        fetch_clip_weights("ViT-L-14-336", tmp_path, url=server.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_fetch_of_an_unknown_name_trusts_on_first_use_but_rejects_non_weights(server, tmp_path):  # noqa: F811
    server.payload = b"<html>not found</html>"
    with pytest.raises(ValueError, match="not a torch"):
        fetch_clip_weights("my-clip", tmp_path, url=server.url)
    assert not (tmp_path / "file.bin").exists() and not (tmp_path / "file.bin.sha256").exists()
    server.payload = zip_payload()
    path = fetch_clip_weights("my-clip", tmp_path, url=server.url)
    assert path == tmp_path / "file.bin" and (tmp_path / "file.bin.sha256").read_text().strip() == \
        hashlib.sha256(server.payload).hexdigest()
    with pytest.raises(KeyError, match="ViT-L-14"):
        fetch_clip_weights("my-clip", tmp_path)


def test_no_random_init_warning_while_weights_are_loaded(tiny, caplog):
    _, files = tiny
    with caplog.at_level("WARNING"):
        ClipTextEncoder(files["state_dict"], arch=TINY)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level("WARNING"):
        open_clip.create_model(TINY)  # the filter is gone afterwards
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]
