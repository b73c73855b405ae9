"""Class folders of an image-folder dataset (read by the config checks and by data preparation)."""
from __future__ import annotations

import os
from pathlib import Path


def class_dir_names(folder: str | os.PathLike) -> list[str]:
    """The sorted, non-hidden sub-directories of ``folder``: the classes of a ``<folder>/<class>/<image>`` tree."""
    return sorted(d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_classes(root: str | os.PathLike) -> list[str]:
    """The classes of a folder dataset as ``varup prepare --kind folder`` reads them: those of ``root/train`` when
    ``root`` has ``train/`` and ``val/`` (a released split), else those of ``root``."""
    root = Path(root)
    released = (root / "train").is_dir() and (root / "val").is_dir()
    return class_dir_names(root / "train" if released else root)


def num_classes_problem(key: str, num_classes: int, root: str | os.PathLike, classes: list[str]) -> str | None:
    """Why ``num_classes`` (config ``key``) does not fit the folder ``root`` with ``classes``; None when it does."""
    if num_classes == len(classes):
        return None
    shown = classes if len(classes) <= 8 else classes[:8] + ["..."]
    return (f"{key}: {num_classes}, but the folder {root} has {len(classes)} class folders {shown}: set num_classes "
            f"to {len(classes)} (or leave it out: the classes are the folder's)")
