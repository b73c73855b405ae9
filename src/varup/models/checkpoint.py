"""A trained varup generator file (``{'model', 'config'[, 'text']}``): what the trainer writes and how every later
stage loads it, strictly (checkpoint loading lives with the models, so no compute stage imports the trainer)."""
from __future__ import annotations

import logging
import os

import torch

from varup.models.textenc import build_toy_encoder
from varup.models.textvar import CaptionedVAR, build_var
from varup.models.var import VAR, VARConfig

log = logging.getLogger("varup.training.loop")



def model_payload(model: torch.nn.Module) -> dict:
    """The model file's content: the generator's state dict and config; a text-conditioned run adds ``text``
    (the caption list, the null condition and the encoder: the toy encoder's config and weights, or CLIP's arch)."""
    if not isinstance(model, CaptionedVAR):
        return {"model": model.state_dict(), "config": model.cfg.to_dict()}
    text = {"captions": model.captions, "null_condition": model.null_condition}
    if model.encoder is not None:
        text["encoder"] = {"kind": "toy", "config": model.encoder.cfg.to_dict(), "state": model.encoder.state_dict()}
    else:
        text["encoder"] = {"kind": "clip", "empty": model.caption_emb[-1].cpu()}
    return {"model": model.var.state_dict(), "config": model.var.cfg.to_dict(), "text": text}


def _read_model_file(path, map_location) -> dict:
    from varup.base.checkpoint import read_checkpoint

    obj = read_checkpoint(path, map_location)
    if not isinstance(obj, dict) or "config" not in obj or "model" not in obj:
        raise ValueError(f"{path}: not a varup model file (expected keys 'model' and 'config')")
    return obj


def load_model(path: str | os.PathLike, map_location="cpu") -> VAR:
    """A trained varup model (``{'model', 'config'}``), strictly: a :class:`VAR`, or a :class:`TextVAR` for a
    text-conditioned run (its encoder: :func:`load_text_encoder`)."""
    from varup.base.checkpoint import load_strict

    obj = _read_model_file(path, map_location)
    model = build_var(VARConfig(**obj["config"]))
    load_strict(model, obj["model"], str(path))
    return model.eval()


def load_text_encoder(path: str | os.PathLike, weights: str | os.PathLike | None = None, map_location="cpu"):
    """The text encoder a text-conditioned model file was trained with (toy: from the file; CLIP: ``weights``)."""
    from varup.base.checkpoint import load_strict

    obj = _read_model_file(path, map_location)
    enc = (obj.get("text") or {}).get("encoder")
    if enc is None:
        raise ValueError(f"{path}: a class-conditional model has no text encoder")
    if enc["kind"] == "toy":
        encoder = build_toy_encoder(enc["config"])
        load_strict(encoder, enc["state"], f"{path} (text encoder)")
        return encoder.eval()
    from varup.models.clip import ClipTextEncoder

    if weights is None:
        raise ValueError(f"{path} was trained on CLIP text embeddings: give the CLIP weights file")
    spec = obj["run"]["text"]["encoder"]  # a file of before text.encoder.act was OpenAI's QuickGELU
    return ClipTextEncoder(weights, arch=spec.get("arch", "ViT-L-14"), act=spec.get("act", "quick_gelu"),
                           device=map_location)


def released_model_file(checkpoint: str | os.PathLike, out: str | os.PathLike, *, null_condition: str, act: str,
                        arch: str = "ViT-L-14", depth: int | None = None, source: str | None = None) -> dict:
    """VAR-CLIP's released checkpoint (``ar-ckpt-last.pth``) as a varup model file that every later stage loads
    like a trained text run: the generator loaded strictly (:func:`varup.models.textvar.load_varclip`), its
    CLIP text tower recorded (``arch``, ``act``) and the null condition of its CFG. ``depth``: the depth the
    workflow expects (a file of another depth is refused, naming it). Returns what it recorded."""
    from varup.base.utils import atomic_torch_save
    from varup.models.clip import check_act
    from varup.models.textvar import NULL_CONDITIONS, load_varclip

    if null_condition not in NULL_CONDITIONS:
        raise ValueError(f"text.null_condition must be one of {NULL_CONDITIONS} (resolved), got {null_condition!r}")
    var = load_varclip(checkpoint)
    if depth is not None and var.depth != depth:
        raise ValueError(f"{checkpoint}: a VAR-CLIP of depth {var.depth}, but text.released.depth is {depth}: "
                         f"set it to {var.depth}")
    enc = {"kind": "clip", "arch": arch, "act": check_act(act)}
    text = {"captions": [], "null_condition": null_condition, "encoder": {"kind": "clip"}}
    run = {"text": {"encoder": enc, "null_condition": null_condition}, "released": str(source or checkpoint)}
    atomic_torch_save({"model": var.state_dict(), "config": var.cfg.to_dict(), "text": text, "run": run}, out)
    log.info("VAR-CLIP released d%d (%s) -> %s: CLIP %s with %s, null condition %s", var.depth, checkpoint, out,
             arch, act, null_condition)
    return {"depth": var.depth, **run["text"]}
