"""OpenAI CLIP through open_clip, with weights from local files: the text encoder of VAR-CLIP and the shared
loader that CMMD's image embedder (:mod:`varup.metrics.cmmd`) uses.

Why our own loader: the OpenAI release files (``ViT-L-14.pt``, ``ViT-L-14-336px.pt``) are TorchScript archives,
and ``open_clip.create_model(name, pretrained=PATH)`` reads a path with ``torch.load(weights_only=True)``, which
refuses TorchScript. TorchScript is not a pickle, so :func:`load_clip_state_dict` opens it with
``torch.jit.load`` and takes its ``state_dict()``; any other file (a ``torch.save`` state dict, safetensors) is
read weights-only. The weights go strictly into an open_clip model built from its config name with the MLP
activation ``act`` (:data:`ACTIVATIONS`): ``quick_gelu`` is OpenAI's (their weights were trained with it; open_clip
only switches it on for its own ``pretrained='openai'`` tag, never for a path), ``gelu`` is what VAR-CLIP runs
(``open_clip.create_model_and_transforms('ViT-L-14', pretrained='pretrained/ViT-L-14.pt')``: a path, so plain
GELU), hence the embeddings its released generator was trained on. The config key ``text.encoder.act`` chooses;
its ``auto`` is resolved in one place, :func:`varup.config.textplan.text_settings`.

:data:`CLIP_WEIGHTS` records the two OpenAI files (URL and sha256: the URL's path segment is the file's sha256, as
openai/CLIP's ``_MODELS`` has it) and :func:`fetch_clip_weights` fetches one with :func:`varup.base.download.fetch_file`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from varup.base.download import fetch_file

OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha256}/{file}"
# Tensors of the OpenAI / TorchScript state dicts that are no weights (ints, and the causal mask TorchScript keeps).
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
#: the MLP activation of the CLIP towers: OpenAI's QuickGELU, or the plain GELU open_clip gives a weights path
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class ClipWeights:
    """One OpenAI CLIP release file: its open_clip architecture, file name and sha256 (which is also its URL)."""
    arch: str
    file: str
    sha256: str

    @property
    def url(self) -> str:
        return OPENAI_URL.format(sha256=self.sha256, file=self.file)


CLIP_WEIGHTS: dict[str, ClipWeights] = {
    "ViT-L-14": ClipWeights("ViT-L-14", "ViT-L-14.pt",
                            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L-14-336": ClipWeights("ViT-L-14-336", "ViT-L-14-336px.pt",
                                "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
}


# ------------------------------------------------------------------------------------------------ weights
def fetch_clip_weights(name: str, dest_dir: str | os.PathLike, url: str | None = None,
                       sha256: str | None = None) -> Path:
    """Fetch the weights file ``name`` (a key of :data:`CLIP_WEIGHTS`) into ``dest_dir`` and return its path.

    ``url`` / ``sha256`` override the registry's (a mirror, another file); an unknown ``name`` needs ``url`` and is
    then saved under the URL's file name, trusted on first use when no ``sha256`` is given. Resumes partial
    downloads and raises :class:`varup.base.download.ChecksumError` on a wrong sha256 (see ``fetch_file``)."""
    entry = CLIP_WEIGHTS.get(name)
    if entry is None and url is None:
        raise KeyError(f"unknown CLIP weights {name!r}: known are {sorted(CLIP_WEIGHTS)}; or give its url")
    url = url or entry.url
    sha256 = sha256 or (entry.sha256 if entry else None)
    dest = Path(dest_dir) / (entry.file if entry else Path(url.split("?")[0]).name)
    got = fetch_file(url, dest, sha256, config_key=f"the sha256 of CLIP weights {name!r}", validate=check_weights_file)
    return Path(got["path"])


def check_weights_file(path: str | os.PathLike) -> None:
    """Reject what cannot be a weights file (an HTML error page, a truncated file): torch and TorchScript files
    are zip archives, safetensors files end in ``.safetensors``."""
    path = Path(path)
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch / TorchScript zip archive (nor .safetensors): not CLIP weights")


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (a zip with ``constants.pkl`` at its top level, as torch itself tests)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in ``path``, never unpickling arbitrary objects: TorchScript through ``torch.jit.load``,
    safetensors, or a ``torch.save`` state dict (optionally under ``'state_dict'``) with ``weights_only=True``."""
    path = Path(path)
    if is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and the only reader of these
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict of CLIP weights")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in NON_WEIGHT_KEYS}


def missing_weights_message(path: Path, arch: str) -> str:
    """Which file is missing and how to get it (registry key and URL when the architecture has one)."""
    entry = next((w for w in CLIP_WEIGHTS.values() if w.arch == arch), None)
    how = (f"fetch it with varup.models.clip.fetch_clip_weights({entry.arch!r}, DIR) from {entry.url}"
           if entry else "no OpenAI release is registered for this architecture")
    return f"CLIP weights file {path} not found (architecture {arch}): {how}"


def load_clip_model(weights: str | os.PathLike, arch: str, *, device: str | torch.device = "cpu",
                    quick_gelu: bool = True) -> torch.nn.Module:
    """Build open_clip's ``arch`` (QuickGELU for OpenAI weights; ``quick_gelu=False``: plain GELU), load ``weights``
    strictly, freeze it, eval mode."""
    import open_clip

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(missing_weights_message(path, arch))
    with random_init_warning_silenced():
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, device="cpu")
    try:
        model.load_state_dict(load_clip_state_dict(path), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not hold open_clip {arch} weights: {e}") from e
    model.requires_grad_(False)
    return model.to(device).eval()


@contextlib.contextmanager
def random_init_warning_silenced():
    """Drop open_clip's "initialized randomly" warning (root logger): the weights are loaded right after."""
    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def image_size(model: torch.nn.Module) -> int:
    """The (square) input resolution of an open_clip model's image tower."""
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    if h != w:
        raise ValueError(f"non-square CLIP input {h}x{w} is not supported")
    return int(h)


# ------------------------------------------------------------------------------------------- text encoder
def check_act(act: str) -> str:
    """``act`` if it is one of :data:`ACTIVATIONS`, else a ValueError naming the config key."""
    if act not in ACTIVATIONS:
        raise ValueError(f"text.encoder.act must be one of {ACTIVATIONS} (resolved; 'auto' is resolved by "
                         f"varup.config.textplan.text_settings), got {act!r}")
    return act


class ClipTextEncoder:
    """Frozen CLIP text tower for VAR-CLIP's conditioning: ``encode(captions)`` gives (B, dim) float32
    L2-normalised embeddings (as VAR-CLIP's CLIPWrapper normalises them). The empty caption ``""`` encodes CLIP's
    empty prompt (start and end tokens only), the unconditional input of classifier-free guidance. ``act``: the
    tower's MLP activation (``quick_gelu``: OpenAI's; ``gelu``: VAR-CLIP's, see the module docstring)."""

    def __init__(self, weights: str | os.PathLike, arch: str = "ViT-L-14", *, device: str | torch.device = "cpu",
                 act: str = "quick_gelu"):
        import open_clip

        self.device = torch.device(device)
        self.arch, self.act = arch, check_act(act)
        self.model = load_clip_model(weights, arch, device=self.device, quick_gelu=act == "quick_gelu")
        self.model.visual = None  # the image tower (300 M parameters for ViT-L/14) is never used here
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(self.model.text_projection.shape[1])

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not one string")
        tokens = self.tokenizer(list(captions)).to(self.device)
        with autocast_off(self.device):
            emb = self.model.encode_text(tokens, normalize=True)
        return emb.float()


def autocast_off(device: torch.device):
    """No mixed precision inside (the caller may run under autocast): the embeddings are computed in float32."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
