"""Real datasets (AFHQ, ImageNet-100, a user image folder) prepared into the toy's dataset-directory format.

Everything downstream (:func:`varup.data.toy.read_manifest`, ``ImageDataset.from_toy(dataset_dir, split)``)
reads the result unchanged. Real images are **not copied**: the manifest points at the source files.

Dataset directory (same files and columns as :mod:`varup.data.toy`)::

    out_dir/manifest.csv   columns MANIFEST_COLUMNS, one row per image, split-major (train, then val),
                           class-major in label order, files sorted within a class:
        path           ABSOLUTE path of the source image (``dataset_dir / path`` is then that path)
        mask_path, colour, size, background   empty
        split          train | val
        label          int class index into dataset.json "classes"
        class_name     class name (AFHQ: cat/dog/wild; ImageNet: the wnid; folder: the sub-directory name)
        mode, mode_in_class   -1 (real data has no known modes)
    out_dir/dataset.json   {name, kind ("afhq" | "imagenet100" | "folder"), classes, resolution (the target
                            training resolution; images keep their own size on disk), counts {train, val},
                            class_counts {train: [...], val: [...]} (label order), manifest_sha256,
                            source {...}, split {method: "released" | "seeded", ...}, verified (bool)}
                           ImageNet adds imagenet1k_index (list | null), imagenet1k_index_note, class_list.

The directory is built in a hidden temporary sibling and renamed onto ``out_dir`` only on success.

Archives (:func:`fetch_archive`)::

    dest_dir/<name>              the downloaded archive (zip or tar, tar.gz, tgz, tar.bz2, tar.xz)
    dest_dir/<name>.sha256       its sha256 when it was not pinned (trust on first use); later calls verify it
    dest_dir/<stem>/             the unpacked archive, renamed into place only when complete
    dest_dir/<stem>/.complete    the archive's sha256, written last: its presence means "complete"
"""
from __future__ import annotations

import csv
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from varup.base.download import ChecksumError, download, read_hash, record_first_use
from varup.base.utils import atomic_write_json, atomic_write_text, progress, replace_dir, sha256_file
from varup.config.errors import ConfigError
from varup.config.folders import class_dir_names, folder_classes, num_classes_problem
from varup.data.folder import IMG_EXTENSIONS, scan_image_folder, verify_images
from varup.data.toy import MANIFEST_COLUMNS, SPLITS

log = logging.getLogger("varup.prepare")

COMPLETE_MARKER = ".complete"
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
AFHQ_CLASSES = ("cat", "dog", "wild")
WNID_RE = re.compile(r"n\d{8}")
IMAGENET_LAYOUT = ("expected <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (validation images sorted "
                   "into class folders, e.g. with the widely used valprep.sh or LOC_val_solution.csv)")


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the target directory (absolute path, '..', link, device)."""


# ------------------------------------------------------------------------------------------- archives
def archive_stem(name: str) -> str:
    """``afhq.zip`` -> ``afhq``, ``x.tar.gz`` -> ``x``; ValueError for an unsupported file name."""
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"unsupported archive name {name!r}: expected one of {', '.join(ARCHIVE_SUFFIXES)} "
                     f"(pass name= when the URL does not end in the file name)")


def fetch_archive(url: str, dest_dir: str | os.PathLike, *, sha256: str | None = None, name: str | None = None,
                  config_key: str | None = None, timeout: float = 60, retries: int = 3,
                  backoff: float = 1.0) -> dict[str, Any]:
    """Download ``url`` (resumable, sha256-verified) into ``dest_dir/<name>`` and unpack it atomically into
    ``dest_dir/<stem>``; return ``{archive, sha256, extracted_dir, pinned}``.

    ``name`` defaults to the last component of the URL's path. ``sha256=None`` means "not pinned": the first
    download's hash is recorded in ``<archive>.sha256`` with a WARNING telling how to pin it under
    ``config_key`` (e.g. ``datasets.afhq.download.sha256``) once it has unpacked; later unpinned calls verify
    against that record.
    A complete unpacked directory (its ``.complete`` marker holds the expected hash) returns at once without
    network (the archive itself may have been deleted by then). A checksum mismatch raises :class:`ChecksumError` and leaves neither archive nor directory;
    unsafe members raise :class:`UnsafeArchiveError` naming the member before anything is written.
    """
    dest_dir = Path(dest_dir)
    name = name or posixpath.basename(urllib.parse.urlparse(url).path)
    archive, pinned = dest_dir / name, sha256 is not None
    extracted, sidecar = dest_dir / archive_stem(name), dest_dir / (name + ".sha256")
    expected = sha256.strip().lower() if pinned else read_hash(sidecar)
    done = read_hash(extracted / COMPLETE_MARKER)
    if done is not None and (expected is None or done == expected):
        log.info("%s is already unpacked (sha256 %s): nothing to fetch", extracted, done)
        return {"archive": archive, "sha256": done, "extracted_dir": extracted, "pinned": pinned}
    try:
        download(url, archive, expected, timeout=timeout, retries=retries, backoff=backoff, desc=name)
    except ChecksumError as e:
        archive.unlink(missing_ok=True)  # download() only re-fetches over an archive whose hash was wrong
        if pinned:
            raise
        raise ChecksumError(f"{e}. The expected sha256 was recorded on first use in {sidecar}; if the upstream "
                            f"file really changed, delete that file (or pin the new hash under "
                            f"{config_key or 'the download sha256 option'})") from e
    actual = expected or sha256_file(archive)
    _unpack(archive, extracted, actual)
    if expected is None:
        record_first_use(sidecar, url, actual, config_key or "the dataset's download sha256")
    elif pinned and sidecar.exists() and read_hash(sidecar) != actual:
        atomic_write_text(sidecar, actual + "\n")  # a stale first-use record would trip a later unpinned call
    return {"archive": archive, "sha256": actual, "extracted_dir": extracted, "pinned": pinned}


def _unpack(archive: Path, extracted: Path, sha256: str) -> None:
    """Unpack ``archive`` into a temporary sibling, write the ``.complete`` marker last, rename onto ``extracted``."""
    tmp = _mkdtemp_beside(extracted)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp)
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive (an HTML page instead of the file? "
                             f"check the URL, then delete {archive} to fetch it again)")
        (tmp / COMPLETE_MARKER).write_text(sha256 + "\n")
        replace_dir(tmp, extracted)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("unpacked %s -> %s", archive, extracted)


def _check_member(archive: Path, name: str) -> None:
    """Reject absolute member names and names with a '..' component (path traversal)."""
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"[A-Za-z]:", n) or ".." in n.split("/"):
        raise UnsafeArchiveError(f"{archive}: refusing to unpack member {name!r}: absolute path or '..' "
                                 f"component (path traversal); nothing was extracted")


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for m in members:
            _check_member(archive, m.filename)
        for m in progress(members, desc=f"unpack {archive.name}", unit="file"):
            zf.extract(m, dest)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            _check_member(archive, m.name)
            if m.issym() and (m.linkname.startswith("/") or
                              posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
                              .split("/")[0] == ".."):
                raise UnsafeArchiveError(f"{archive}: refusing member {m.name!r}: symlink to {m.linkname!r} "
                                         f"points outside the archive; nothing was extracted")
            if m.islnk():
                _check_member(archive, m.linkname)
            if m.isdev():
                raise UnsafeArchiveError(f"{archive}: refusing device/fifo member {m.name!r}")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for m in progress(members, desc=f"unpack {archive.name}", unit="file"):
            tf.extract(m, dest, **kw)


def _mkdtemp_beside(path: Path) -> Path:
    """A hidden temporary directory next to ``path`` (same file system, so the final rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700 directories
    return tmp


# ------------------------------------------------------------------------------------ dataset writing
class _Item(NamedTuple):
    path: str
    split: str
    label: int
    class_name: str


def _scan_split(split_dir: Path, classes: Sequence[str], split: str,
                max_per_class: int | None = None) -> list[_Item]:
    """Items of ``split_dir/<class>/...`` for ``classes`` in order (absolute paths, sorted within a class)."""
    items = []
    for label, name in enumerate(progress(classes, desc=f"scan {split_dir.name}", unit="class")):
        paths, _, _ = scan_image_folder(split_dir, classes=[name])
        items += [_Item(os.path.abspath(p), split, label, name) for p in paths[:max_per_class]]
    return items


def _write_dataset(out_dir: str | os.PathLike, items: list[_Item], info: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.csv + dataset.json for ``items`` atomically into ``out_dir``; return dataset.json's dict."""
    out_dir = Path(out_dir)
    n_classes = len(info["classes"])
    tmp = _mkdtemp_beside(out_dir)
    try:
        manifest = tmp / "manifest.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            w.writeheader()
            for it in items:
                w.writerow({"path": it.path, "mask_path": "", "split": it.split, "label": it.label,
                            "class_name": it.class_name, "colour": "", "size": "", "background": "",
                            "mode": -1, "mode_in_class": -1})
        class_counts = {s: np.bincount([it.label for it in items if it.split == s], minlength=n_classes).tolist()
                        for s in SPLITS}
        info = {**info, "counts": {s: sum(class_counts[s]) for s in SPLITS}, "class_counts": class_counts,
                "manifest_sha256": sha256_file(manifest)}
        atomic_write_json(tmp / "dataset.json", info)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: %d train + %d val images of %d classes -> %s", info["name"], info["counts"]["train"],
             info["counts"]["val"], n_classes, out_dir)
    return info


def _check_resolution(resolution: int) -> int:
    if int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def _verify(items: list[_Item], verify: bool) -> None:
    """Fully decode every image when ``verify`` (CorruptImageError names the first bad file)."""
    if verify:
        verify_images([it.path for it in items])


def _class_dirs(root: Path) -> list[str]:
    names = class_dir_names(root)
    if not names:
        raise ValueError(f"{root} has no class sub-directories (expected {root}/<class>/<image>)")
    return names


# ------------------------------------------------------------------------------------------------ AFHQ
def prepare_afhq(extracted_dir: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int = 256,
                 verify: bool = True, name: str = "afhq", source: dict[str, Any] | None = None) -> dict[str, Any]:
    """AFHQ as released by StarGAN v2 (``afhq.zip`` -> ``afhq/{train,val}/{cat,dog,wild}/*.jpg|png``).

    ``extracted_dir`` is the parent of ``afhq/`` or ``afhq/`` itself. Classes are cat, dog, wild (labels 0, 1,
    2); the released train/val split is kept. ``verify`` decodes every image first. ``source`` adds entries
    (e.g. the URL) to dataset.json's ``source``; an archive sha256 from a ``.complete`` marker is added too.
    Returns the dict written to ``out_dir/dataset.json``.
    """
    resolution = _check_resolution(resolution)
    extracted_dir = Path(extracted_dir)
    root = next((d for d in (extracted_dir / "afhq", extracted_dir)
                 if (d / "train").is_dir() and (d / "val").is_dir()), None)
    if root is None:
        raise FileNotFoundError(f"AFHQ not found under {extracted_dir}: expected {extracted_dir}/afhq/"
                                f"{{train,val}}/{{cat,dog,wild}}/ or {extracted_dir}/{{train,val}}/{{cat,dog,wild}}/")
    items = []
    for split in SPLITS:
        extra = sorted(set(_class_dirs(root / split)) - set(AFHQ_CLASSES))
        if extra:
            log.warning("AFHQ %s: ignoring unexpected class directories %s", root / split, extra)
        items += _scan_split(root / split, AFHQ_CLASSES, split)
    _verify(items, verify)
    src = {"root": os.path.abspath(root)}
    if (archive_sha := read_hash(extracted_dir / COMPLETE_MARKER)) is not None:
        src["archive_sha256"] = archive_sha
    info = {"name": name, "kind": "afhq", "classes": list(AFHQ_CLASSES), "resolution": resolution,
            "source": {**src, **(source or {})}, "split": {"method": "released"}, "verified": bool(verify)}
    return _write_dataset(out_dir, items, info)


# ---------------------------------------------------------------------------------------- ImageNet-100
def read_class_list(path: str | os.PathLike | None = None) -> list[str]:
    """wnids of a class-list file, one per line ('#' lines and blank lines skipped); default: the shipped CMC
    ImageNet-100 list. ValueError naming the file for a malformed or duplicated wnid."""
    if path is None:
        text, where = resources.files("varup.data").joinpath("imagenet100.txt").read_text(), "imagenet100.txt"
    else:
        text, where = Path(path).read_text(), str(path)
    wnids = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return _check_wnids(wnids, where)


def _check_wnids(wnids: Sequence[str], where: str) -> list[str]:
    bad = [w for w in wnids if not WNID_RE.fullmatch(w)]
    if bad:
        raise ValueError(f"{where}: not ImageNet wnids (expected n + 8 digits): {bad[:5]}")
    dup = sorted({w for w in wnids if list(wnids).count(w) > 1})
    if dup:
        raise ValueError(f"{where}: duplicated wnids {dup}")
    if not wnids:
        raise ValueError(f"{where}: empty class list")
    return list(wnids)


def imagenet1k_index(train_dir: str | os.PathLike, wnids: Sequence[str]) -> tuple[list[int] | None, str]:
    """ImageNet-1k class index of each wnid = its position in the sorted list of the wnid directories under
    ``train_dir`` when there are exactly 1000 of them; else ``(None, reason)``. Returns ``(index, note)``."""
    train_dir = Path(train_dir)
    all_wnids = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and WNID_RE.fullmatch(d.name))
    if len(all_wnids) != 1000:
        return None, (f"{train_dir} holds {len(all_wnids)} wnid directories, not the 1000 of ImageNet-1k: "
                      f"the ImageNet-1k class index is unknown")
    pos = {w: i for i, w in enumerate(all_wnids)}
    return [pos[w] for w in wnids], f"position in the sorted list of the 1000 wnid directories under {train_dir}"


def _check_imagenet_root(root: Path, wnids: Sequence[str]) -> None:
    """Errors naming the missing directory / wnid, or explaining the expected val/ layout."""
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            raise FileNotFoundError(f"ImageNet root {root} has no {split}/ directory; {IMAGENET_LAYOUT}")
        if split == "val" and not any(e.is_dir() and WNID_RE.fullmatch(e.name) for e in d.iterdir()):
            raise ValueError(f"{d} has no <wnid> class folders (a flat val/ as distributed?); {IMAGENET_LAYOUT}")
        missing = [w for w in wnids if not (d / w).is_dir()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed ImageNet class(es) missing under {d}: "
                                    f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")


def prepare_imagenet100(imagenet_root: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int = 256,
                        class_list: str | os.PathLike | Sequence[str] | None = None, verify: bool = False,
                        max_per_class: int | None = None, name: str = "imagenet100",
                        source: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ImageNet subset from a user-provided root with ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

    ``class_list``: None (the shipped CMC ImageNet-100 list), a path to a one-wnid-per-line file, or a sequence
    of wnids; its order gives the labels. Only listed classes are used; a listed wnid missing under train/ or
    val/ is an error naming it. ``max_per_class`` keeps the first N files (sorted) of each class in each split.
    ``verify`` decodes every image (slow on full ImageNet). dataset.json gets ``imagenet1k_index`` (see
    :func:`imagenet1k_index`). Returns the dict written to ``out_dir/dataset.json``.
    """
    resolution = _check_resolution(resolution)
    root = Path(imagenet_root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet root does not exist: {root}")
    if class_list is None or isinstance(class_list, (str, os.PathLike)):
        wnids = read_class_list(class_list)
    else:
        wnids = _check_wnids(list(class_list), "class_list")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    _check_imagenet_root(root, wnids)
    items = [it for split in SPLITS for it in _scan_split(root / split, wnids, split, max_per_class)]
    _verify(items, verify)
    index, note = imagenet1k_index(root / "train", wnids)
    listed = "CMC imagenet100.txt (HobbitLong/CMC)" if class_list is None else (
        os.path.abspath(class_list) if isinstance(class_list, (str, os.PathLike)) else "given list")
    info = {"name": name, "kind": "imagenet100", "classes": wnids, "resolution": resolution,
            "imagenet1k_index": index, "imagenet1k_index_note": note, "class_list": listed,
            "max_per_class": max_per_class, "source": {"root": os.path.abspath(root), **(source or {})},
            "split": {"method": "released"}, "verified": bool(verify)}
    return _write_dataset(out_dir, items, info)


# ------------------------------------------------------------------------------------------ user folder
def split_val_indices(n: int, val_fraction: float, rng: np.random.Generator) -> list[int]:
    """Sorted indices (of ``n`` sorted files) that go to val: ``round_half_up(n * val_fraction)`` of a seeded
    permutation, at least 1 when ``n >= 2`` and at most ``n - 1`` (a class always keeps a training image)."""
    n_val = int(n * val_fraction + 0.5)
    n_val = min(max(1, n_val), n - 1) if n >= 2 else 0
    return sorted(rng.permutation(n)[:n_val].tolist())


def prepare_folder(root: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int,
                   val_fraction: float = 0.1, seed: int = 0, verify: bool = True, name: str | None = None,
                   source: dict[str, Any] | None = None, num_classes: int | None = None,
                   num_classes_key: str = "num_classes") -> dict[str, Any]:
    """A user image folder: ``root/{train,val}/<class>/<image>`` (split as released; both splits must have the
    same class directories) or ``root/<class>/<image>`` (split per class by :func:`split_val_indices` with
    ``default_rng([seed, crc32(class name)])``, so a class's split depends only on the seed, its name and its
    files). Classes are the sorted sub-directory names; ``num_classes`` (the config's, at ``num_classes_key``) must
    be their number (ConfigError otherwise). Returns the dict written to ``out_dir/dataset.json``.
    """
    resolution = _check_resolution(resolution)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    has = {s: (root / s).is_dir() for s in SPLITS}
    if has["train"] != has["val"]:
        present, absent = ("train", "val") if has["train"] else ("val", "train")
        raise ValueError(f"{root} has {present}/ but no {absent}/: use {root}/train/<class>/ + {root}/val/<class>/ "
                         f"(released split) or {root}/<class>/ (seeded split)")
    problem = num_classes_problem(num_classes_key, num_classes, root, folder_classes(root)) if num_classes else None
    if problem:
        raise ConfigError(problem)
    if has["train"]:
        classes = _class_dirs(root / "train")
        val_classes = _class_dirs(root / "val")
        if val_classes != classes:
            raise ValueError(f"{root}: train/ and val/ class directories differ: only in train "
                             f"{sorted(set(classes) - set(val_classes))}, only in val "
                             f"{sorted(set(val_classes) - set(classes))}")
        items = [it for split in SPLITS for it in _scan_split(root / split, classes, split)]
        split_info: dict[str, Any] = {"method": "released"}
    else:
        classes = _class_dirs(root)
        items = _seeded_split(_scan_split(root, classes, "train"), val_fraction, seed)
        split_info = {"method": "seeded", "val_fraction": val_fraction, "seed": seed}
    _verify(items, verify)
    info = {"name": name or root.resolve().name, "kind": "folder", "classes": classes,
            "resolution": resolution, "source": {"root": os.path.abspath(root), **(source or {})},
            "split": split_info, "verified": bool(verify)}
    return _write_dataset(out_dir, items, info)


def _seeded_split(items: list[_Item], val_fraction: float, seed: int) -> list[_Item]:
    """Re-label ``items`` (all "train", class-major) into train + val per class; train rows first, then val."""
    by_class: dict[int, list[_Item]] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it)
    train, val = [], []
    for label, cls in sorted(by_class.items()):
        rng = np.random.default_rng([seed, zlib.crc32(cls[0].class_name.encode("utf-8"))])
        val_idx = set(split_val_indices(len(cls), val_fraction, rng))
        for k, it in enumerate(cls):
            (val if k in val_idx else train).append(it._replace(split="val" if k in val_idx else "train"))
    return train + val


# ------------------------------------------------------------------------------------------------ OOD
def prepare_ood(source: dict[str, Any], out_dir: str | os.PathLike, *, resolution: int, verify: bool = True) -> dict:
    """An out-of-distribution image set (Table 3) as a dataset directory whose ``val`` split holds every OOD image
    (one class, ``ood``). ``source``: ``{kind: folder, root}`` — any image tree, with or without class folders — or
    ``{kind: toy, generator: {...}}`` — toy images drawn with other generator settings (e.g. unseen colours)."""
    resolution = _check_resolution(resolution)
    out_dir = Path(out_dir)
    kind = source.get("kind")
    generated = None
    if kind == "toy":  # generated beside, then moved into out_dir/toy once the manifest is in place
        from varup.data.toy import generate_toy_dataset, read_manifest

        generated = _mkdtemp_beside(out_dir)
        shutil.rmtree(generated)
        generate_toy_dataset(generated, resolution=resolution, **{"n_train_per_class": 1, **source.get("generator", {})})
        rows = read_manifest(generated, "val")
        if verify:
            verify_images([generated / r["path"] for r in rows])
        paths = [os.path.abspath(out_dir / "toy" / r["path"]) for r in rows]
        verify = False
    elif kind == "folder":
        root = Path(source["root"])
        if not root.is_dir():
            raise FileNotFoundError(f"OOD image folder does not exist: {root} (experiments.ood.source.root)")
        paths = sorted(os.path.abspath(p) for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
        if not paths:
            raise ValueError(f"OOD image folder {root} has no images ({', '.join(IMG_EXTENSIONS)})")
    else:
        raise ValueError(f"experiments.ood.source.kind must be 'folder' or 'toy', got {kind!r}")
    items = [_Item(p, "val", 0, "ood") for p in paths]
    _verify(items, verify)
    info = {"name": "ood", "kind": f"ood-{kind}", "classes": ["ood"], "resolution": resolution,
            "source": dict(source), "split": {"method": "all images in val"}, "verified": True}
    try:
        out = _write_dataset(out_dir, items, info)
        if generated is not None:
            os.replace(generated, out_dir / "toy")
    finally:
        if generated is not None and generated.exists():
            shutil.rmtree(generated, ignore_errors=True)
    return out
