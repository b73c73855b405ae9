"""The token cache: every image (and every kept augmentation of it) encoded ONCE by the frozen tokenizer.

Format (directory, stable; :class:`TokenCache` reads it):
  meta.json                  {format, patch_nums, vocab_size, L, dtype, num_classes, class_names,
                              splits: {split: {rows, images, variants}}, tokenizer_sha256, source}
  {split}_tokens.npy         (rows, L) unsigned/int array: the multi-scale index maps of a row, scales
                             concatenated small to large, each row-major (pn*pn) — 680 tokens per 256 px image
  {split}_labels.npy         (rows,) int64 class index
  {split}_source.npy         (rows,) int64 index of the source image in the split (rows differ by augmentation)
Encoding runs in shards (``.shards/{split}/{i:05d}.npz``, written atomically) and resumes after a kill; the final
arrays are written atomically and the shards removed.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from varup.base.utils import atomic_np_save, atomic_npz_save, atomic_write_json, progress, read_json
from varup.models.vqvae import VQVAE, num_tokens

log = logging.getLogger("varup.tokenizer.tokens")
FORMAT = "varup-token-cache/1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class TokenCache:
    """Memory-mapped view of one split of a token cache."""

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.dir = Path(directory)
        self.meta = read_json(self.dir / "meta.json")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.dir / 'meta.json'}: not a {FORMAT} token cache")
        if split not in self.meta["splits"]:
            raise KeyError(f"token cache {self.dir} has no split {split!r} (has {sorted(self.meta['splits'])})")
        self.split = split
        self.tokens = np.load(self.dir / f"{split}_tokens.npy", mmap_mode="r")
        self.labels = np.load(self.dir / f"{split}_labels.npy")
        if self.tokens.shape != (len(self.labels), self.meta["L"]):
            raise ValueError(f"{self.dir}: {split}_tokens.npy has shape {self.tokens.shape}, expected "
                             f"({len(self.labels)}, {self.meta['L']})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(self.meta["patch_nums"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def check_made_by(self, vae: VQVAE, tokenizer: str | os.PathLike | None = None) -> None:
        """ValueError unless this cache holds ``vae``'s tokens (the same scales and vocabulary); ``tokenizer``, the
        tokenizer's path, names it in the message."""
        if self.patch_nums != tuple(vae.patch_nums) or self.vocab_size != vae.V:
            by = "this tokenizer" if tokenizer is None else f"tokenizer {tokenizer}"
            raise ValueError(f"token cache {self.dir} (patch_nums {self.patch_nums}, V {self.vocab_size}) was not "
                             f"made by {by} (patch_nums {tuple(vae.patch_nums)}, V {vae.V})")


@torch.no_grad()
def encode_split(vae: VQVAE, get_image: Callable[[int, dict], torch.Tensor], labels: Sequence[int], out_dir: str | os.PathLike,
                 split: str, *, variants: Sequence[dict] = ({},), batch_size: int = 64, shard_size: int = 4096,
                 device: torch.device | str = "cpu") -> dict:
    """Encode images ``0..len(labels)-1`` of a split, once per variant (e.g. ``{'hflip': True}``).

    ``get_image(i, variant)`` returns a float tensor (3, R, R) in [-1, 1]. Rows are ordered image-major, then
    variant. Returns the split's entry for meta.json.
    """
    out = Path(out_dir)
    shard_dir = out / ".shards" / split
    shard_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, v) for i in range(len(labels)) for v in range(len(variants))]
    n_shards = max(1, -(-len(jobs) // shard_size))
    L = num_tokens(vae.patch_nums)
    dtype = token_dtype(vae.V)
    vae = vae.to(device)
    done = sum((shard_dir / f"{s:05d}.npz").exists() for s in range(n_shards))
    if done:
        log.info("%s: %d of %d shards already encoded, resuming", split, done, n_shards)
    bar = progress(total=len(jobs), desc=f"encode {split}", unit="img")
    for s in range(n_shards):
        part = jobs[s * shard_size:(s + 1) * shard_size]
        path = shard_dir / f"{s:05d}.npz"
        if path.exists():
            bar.update(len(part))
            continue
        toks = np.empty((len(part), L), dtype=dtype)
        for a in range(0, len(part), batch_size):
            chunk = part[a:a + batch_size]
            img = torch.stack([get_image(i, variants[v]) for i, v in chunk]).to(device)
            toks[a:a + len(chunk)] = torch.cat(vae.img_to_idxBl(img), dim=1).cpu().numpy().astype(dtype)
            bar.update(len(chunk))
        atomic_npz_save(path, tokens=toks, source=np.array([i for i, _ in part], dtype=np.int64))
    bar.close()
    parts = [np.load(shard_dir / f"{s:05d}.npz") for s in range(n_shards)]
    tokens = np.concatenate([p["tokens"] for p in parts]) if jobs else np.empty((0, L), dtype)
    source = np.concatenate([p["source"] for p in parts]) if jobs else np.empty((0,), np.int64)
    atomic_np_save(out / f"{split}_tokens.npy", tokens)
    atomic_np_save(out / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64)[source])
    atomic_np_save(out / f"{split}_source.npy", source)
    shutil.rmtree(shard_dir)
    return {"rows": int(len(tokens)), "images": int(len(labels)), "variants": list(variants)}


def write_meta(out_dir: str | os.PathLike, vae: VQVAE, splits: dict, class_names: Sequence[str], **extra) -> None:
    meta = {"format": FORMAT, "patch_nums": list(vae.patch_nums), "vocab_size": vae.V, "L": num_tokens(vae.patch_nums),
            "dtype": token_dtype(vae.V).name, "num_classes": len(class_names), "class_names": list(class_names),
            "splits": splits, **extra}
    atomic_write_json(Path(out_dir) / "meta.json", meta)
    shard_root = Path(out_dir) / ".shards"
    if shard_root.exists() and not any(shard_root.iterdir()):
        shard_root.rmdir()
