"""The token cache: every image (and every kept augmentation of it) encoded ONCE by the frozen tokenizer.

Format (directory, stable; :class:`TokenCache` reads it):
  meta.json                  {format, patch_nums, vocab_size, L, dtype, num_classes, class_names,
                              splits: {split: {rows, images, variants}}, tokenizer_sha256, source}
  {split}_tokens.npy         (rows, L) unsigned/int array: the multi-scale index maps of a row, scales
                             concatenated small to large, each row-major (pn*pn) — 680 tokens per 256 px image
  {split}_labels.npy         (rows,) int64 class index
  {split}_source.npy         (rows,) int64 index of the source image in the split (rows differ by augmentation)
Encoding runs in shards (``.shards/{split}/{i:05d}.npz``, written atomically) and resumes after a kill; the final
arrays are written atomically and the shards removed. :func:`encode_dataset` decodes every image once, in DataLoader
worker processes, and makes its variants (the mirror) from the decoded tensor; :func:`encode_split` takes the
images from a callable, one at a time. Both encode the same rows in the same batches, so their tokens are identical.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

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


def variant_image(img: torch.Tensor, variant: Mapping) -> torch.Tensor:
    """One kept augmentation of a decoded image (3, R, R): ``{}`` or ``{'hflip': False}`` as it is,
    ``{'hflip': True}`` mirrored left-right. The flip is the last step of the preprocessing
    (:func:`varup.data.folder.preprocess`) and the tensor conversion works pixel by pixel, so this equals decoding the
    file again with the flip on, bit for bit."""
    unknown = sorted(set(variant) - {"hflip"})
    if unknown:
        raise ValueError(f"token variant {dict(variant)}: unknown keys {unknown} (dataset token_variants in the "
                         "config may hold only 'hflip')")
    return img.flip(-1) if variant.get("hflip") else img


def _images_only(items: list) -> list[torch.Tensor]:
    """DataLoader collate: the image tensors of ``(image, label)`` items, unstacked."""
    return [x for x, _ in items]


def _decoded_variants(dataset, pending: Sequence[tuple[int, int]], variants: Sequence[dict], batch_size: int,
                      num_workers: int) -> Iterator[torch.Tensor]:
    """The image of every job ``(i, v)`` of ``pending`` (image-major, ascending), in order: each image decoded once,
    by ``num_workers`` DataLoader worker processes (0: in this process), its variants made from the tensor."""
    from torch.utils.data import DataLoader, Subset

    order = list(dict.fromkeys(i for i, _ in pending))
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_images_only)
    decoded = (img for batch in loader for img in batch)
    ids = iter(order)
    cur_i, cur = -1, None
    for i, v in pending:
        while cur_i != i:
            cur_i, cur = next(ids), next(decoded)
        yield variant_image(cur, variants[v])


def _jobs(n_images: int, n_variants: int, shard_size: int) -> tuple[list[tuple[int, int]], int]:
    """The (image, variant) rows of a split, image-major, and how many shards of ``shard_size`` hold them."""
    jobs = [(i, v) for i in range(n_images) for v in range(n_variants)]
    return jobs, max(1, -(-len(jobs) // shard_size))


@torch.no_grad()
def _encode_shards(vae: VQVAE, images_of: Callable[[list[tuple[int, int]]], Iterator[torch.Tensor]],
                   labels: Sequence[int], out_dir: str | os.PathLike, split: str, *, variants: Sequence[dict],
                   batch_size: int, shard_size: int, device: torch.device | str) -> dict:
    """The shard loop of :func:`encode_split` / :func:`encode_dataset`: ``images_of(jobs)`` yields the (3, R, R)
    image of every job of the shards still to encode, in order; each shard is encoded in batches of
    ``batch_size`` consecutive rows (the same batches whatever made the images), written atomically, and the
    finished shards are skipped on a rerun."""
    out = Path(out_dir)
    shard_dir = out / ".shards" / split
    shard_dir.mkdir(parents=True, exist_ok=True)
    jobs, n_shards = _jobs(len(labels), len(variants), shard_size)
    L = num_tokens(vae.patch_nums)
    dtype = token_dtype(vae.V)
    vae = vae.to(device)
    todo = [s for s in range(n_shards) if not (shard_dir / f"{s:05d}.npz").exists()]
    if len(todo) < n_shards:
        log.info("%s: %d of %d shards already encoded, resuming", split, n_shards - len(todo), n_shards)
    bar = progress(total=len(jobs), desc=f"encode {split}", unit="img")
    bar.update(len(jobs) - sum(len(jobs[s * shard_size:(s + 1) * shard_size]) for s in todo))
    images = images_of([j for s in todo for j in jobs[s * shard_size:(s + 1) * shard_size]])
    for s in todo:
        part = jobs[s * shard_size:(s + 1) * shard_size]
        toks = np.empty((len(part), L), dtype=dtype)
        for a in range(0, len(part), batch_size):
            chunk = part[a:a + batch_size]
            img = torch.stack([next(images) for _ in chunk]).to(device)
            toks[a:a + len(chunk)] = torch.cat(vae.img_to_idxBl(img), dim=1).cpu().numpy().astype(dtype)
            bar.update(len(chunk))
        atomic_npz_save(shard_dir / f"{s:05d}.npz", tokens=toks, source=np.array([i for i, _ in part], np.int64))
    bar.close()
    parts = [np.load(shard_dir / f"{s:05d}.npz") for s in range(n_shards)]
    tokens = np.concatenate([p["tokens"] for p in parts]) if jobs else np.empty((0, L), dtype)
    source = np.concatenate([p["source"] for p in parts]) if jobs else np.empty((0,), np.int64)
    atomic_np_save(out / f"{split}_tokens.npy", tokens)
    atomic_np_save(out / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64)[source])
    atomic_np_save(out / f"{split}_source.npy", source)
    shutil.rmtree(shard_dir)
    return {"rows": int(len(tokens)), "images": int(len(labels)), "variants": list(variants)}


def encode_split(vae: VQVAE, get_image: Callable[[int, dict], torch.Tensor], labels: Sequence[int],
                 out_dir: str | os.PathLike, split: str, *, variants: Sequence[dict] = ({},), batch_size: int = 64,
                 shard_size: int = 4096, device: torch.device | str = "cpu") -> dict:
    """Encode images ``0..len(labels)-1`` of a split, once per variant (e.g. ``{'hflip': True}``), the images
    made one at a time in this process: ``get_image(i, variant)`` returns a float tensor (3, R, R) in [-1, 1].
    Rows are ordered image-major, then variant. Returns the split's entry for meta.json.
    :func:`encode_dataset` gives the same rows from a dataset, decoding each image once and in parallel."""
    def images_of(jobs):
        return (get_image(i, variants[v]) for i, v in jobs)

    return _encode_shards(vae, images_of, labels, out_dir, split, variants=variants, batch_size=batch_size,
                          shard_size=shard_size, device=device)


def encode_dataset(vae: VQVAE, dataset, out_dir: str | os.PathLike, split: str, *, variants: Sequence[dict] = ({},),
                   batch_size: int = 64, shard_size: int = 4096, device: torch.device | str = "cpu",
                   num_workers: int = 0) -> dict:
    """:func:`encode_split` of a map-style dataset (``dataset[i] -> (float (3, R, R) in [-1, 1], label)`` and
    ``dataset.labels``, e.g. :func:`varup.data.folder.open_split` with no flip): each image is decoded ONCE, by
    ``num_workers`` DataLoader worker processes (0: in this process), and its variants are made from the decoded
    tensor (:func:`variant_image`); the rows are encoded in the same batches on ``device``. The token maps equal
    :func:`encode_split`'s with ``get_image(i, v) = variant_image(dataset[i][0], v)``, whatever ``num_workers``."""
    if getattr(dataset, "hflip", False) is not False:
        raise ValueError("encode_dataset flips the decoded images itself (token_variants): open the dataset "
                         f"without hflip (got hflip={getattr(dataset, 'hflip')!r})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")

    def images_of(jobs):
        return _decoded_variants(dataset, jobs, variants, batch_size, num_workers)

    return _encode_shards(vae, images_of, dataset.labels, out_dir, split, variants=variants, batch_size=batch_size,
                          shard_size=shard_size, device=device)


def write_meta(out_dir: str | os.PathLike, vae: VQVAE, splits: dict, class_names: Sequence[str], **extra) -> None:
    meta = {"format": FORMAT, "patch_nums": list(vae.patch_nums), "vocab_size": vae.V, "L": num_tokens(vae.patch_nums),
            "dtype": token_dtype(vae.V).name, "num_classes": len(class_names), "class_names": list(class_names),
            "splits": splits, **extra}
    atomic_write_json(Path(out_dir) / "meta.json", meta)
    shard_root = Path(out_dir) / ".shards"
    if shard_root.exists() and not any(shard_root.iterdir()):
        shard_root.rmdir()
