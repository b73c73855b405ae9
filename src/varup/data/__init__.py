"""Datasets: the seeded toy shapes dataset (:mod:`varup.data.toy`) and real image folders with VAR's
preprocessing (:mod:`varup.data.folder`).

Names are imported lazily, so ``import varup.data.toy`` does not pull in torch / torchvision.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "folder": ("IMG_EXTENSIONS", "OFFICIAL_MID_RESO", "CorruptImageError", "ImageDataset", "load_rgb",
               "load_uint8_images", "preprocess", "scan_image_folder", "to_pm1", "to_uint8", "verify_images"),
    "toy": ("generate_toy_dataset", "mode_table", "read_manifest", "render_toy_image"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"varup.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'varup.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
