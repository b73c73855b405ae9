"""Tests for varup.data: the seeded toy dataset and image folders with VAR preprocessing."""
from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from varup.base.utils import sha256_file
from varup.data import toy
from varup.data.folder import (
    CorruptImageError,
    ImageDataset,
    load_rgb,
    load_uint8_images,
    scan_image_folder,
    to_uint8,
    verify_images,
)
from varup.data.toy import generate_toy_dataset, mode_table, read_manifest

SMALL = dict(n_train_per_class=32, n_val_per_class=4, progress=False)


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy_ds(tmp_path_factory) -> Path:
    """A mid-sized toy dataset shared by the read-only tests (64 train images per class)."""
    out = tmp_path_factory.mktemp("toy") / "ds"
    generate_toy_dataset(out, seed=0, n_train_per_class=64, n_val_per_class=8, progress=False)
    return out


# ------------------------------------------------------------------------------------------ toy data
def test_same_seed_byte_identical_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info_a = generate_toy_dataset(a, seed=7, **SMALL)
    generate_toy_dataset(b, seed=7, **SMALL)
    generate_toy_dataset(c, seed=8, **SMALL)
    fa, fb, fc = _all_files(a), _all_files(b), _all_files(c)
    assert fa == fb
    assert set(fa) == set(fc)
    images = [k for k in fa if k.startswith("images/")]
    n_diff = sum(fa[k] != fc[k] for k in images)
    assert n_diff == len(images)  # every image changes with the seed
    assert json.loads(fa["dataset.json"])["seed"] == 7 and json.loads(fc["dataset.json"])["seed"] == 8
    assert info_a["manifest_sha256"] == sha256_file(a / "manifest.csv")


def test_image_depends_only_on_seed_split_and_index(tmp_path):
    """Image i of a split re-rendered alone (rng([seed, split, i])) equals the stored file: order-independent."""
    out = tmp_path / "ds"
    generate_toy_dataset(out, seed=3, **SMALL)
    modes = mode_table(out)
    for r in read_manifest(out)[::37]:
        split_id = toy.SPLITS.index(r["split"])
        i = int(Path(r["path"]).stem)
        rgb, mask = toy.render_toy_image(modes[r["mode"]], 32, np.random.default_rng([3, split_id, i]))
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["path"])), rgb)
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["mask_path"])), mask)


def test_counts_columns_and_metadata(toy_ds):
    info = json.loads((toy_ds / "dataset.json").read_text())
    assert info["name"] == "toy" and info["resolution"] == 32
    assert info["classes"] == ["circle", "square", "triangle", "cross"]
    assert len(info["modes"]) == 64
    assert info["counts"] == {"train": 4 * 64, "val": 4 * 8}
    assert info["manifest_sha256"] == sha256_file(toy_ds / "manifest.csv")
    with open(toy_ds / "manifest.csv", newline="") as f:
        assert next(csv.reader(f)) == list(toy.MANIFEST_COLUMNS)
    rows = read_manifest(toy_ds, verify=True)
    assert len(rows) == 4 * 72
    assert Counter(r["split"] for r in rows) == {"train": 256, "val": 32}
    table = mode_table(toy_ds)
    for r in rows:
        m = table[r["mode"]]
        assert (m["shape"], m["colour"], m["size"], m["background"]) == (
            r["class_name"], r["colour"], r["size"], r["background"])
        assert m["label"] == r["label"] == info["classes"].index(r["class_name"])
        assert r["mode"] == r["label"] * 16 + r["mode_in_class"]
        assert r["path"] == f"images/{r['split']}/{r['class_name']}/{Path(r['path']).name}"
        im = Image.open(toy_ds / r["path"])
        assert im.mode == "RGB" and im.size == (32, 32)
    assert len(list((toy_ds / "images").rglob("*.png"))) == len(rows)
    assert len(list((toy_ds / "masks").rglob("*.png"))) == len(rows)


def test_manifest_verify_detects_tampering(tmp_path):
    out = tmp_path / "ds"
    generate_toy_dataset(out, seed=0, **SMALL)
    with open(out / "manifest.csv", "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="manifest.csv"):
        read_manifest(out, verify=True)


def test_every_mode_of_every_class_appears(toy_ds):
    train = read_manifest(toy_ds, "train")
    counts = Counter(r["mode"] for r in train)
    assert set(counts) == set(range(64))
    assert set(counts.values()) == {4}  # balanced: 64 images per class / 16 modes
    for label in range(4):
        assert {r["mode_in_class"] for r in train if r["label"] == label} == set(range(16))


def test_unknown_factor_names_are_rejected(tmp_path):
    with pytest.raises(KeyError, match="hexagon"):
        generate_toy_dataset(tmp_path / "x", shapes=("circle", "hexagon"), **SMALL)
    assert not (tmp_path / "x").exists()


def _load(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel))


def test_masks_nonempty_and_object_colour_differs(toy_ds):
    for r in read_manifest(toy_ds):
        img = _load(toy_ds, r["path"]).astype(np.float32)
        mask = _load(toy_ds, r["mask_path"])
        assert set(np.unique(mask)) <= {0, 255}
        inside = mask == 255
        assert 0 < inside.sum() < inside.size, r["mask_path"]
        diff = np.abs(img[inside].mean(0) - img[~inside].mean(0)).max()
        assert diff > 40, (r["path"], diff)
        # the object's colour is nearest to its nominal colour
        mean_in = img[inside].mean(0)
        nearest = min(toy.COLOURS, key=lambda c: np.sum((np.array(toy.COLOURS[c]) - mean_in) ** 2))
        assert nearest == r["colour"], r["path"]


def test_sizes_backgrounds_and_shapes_are_distinguishable(toy_ds):
    rows = read_manifest(toy_ds)
    area = defaultdict(list)
    bg_std = defaultdict(list)
    for r in rows:
        img = _load(toy_ds, r["path"]).astype(np.float32)
        mask = _load(toy_ds, r["mask_path"]) > 0
        area[(r["class_name"], r["size"])].append(mask.sum())
        bg_std[r["background"]].append(img[~mask].mean(1).std())
    for shape in ("circle", "square", "triangle", "cross"):
        assert max(area[(shape, "small")]) < min(area[(shape, "large")]), shape
    assert max(bg_std["plain"]) < min(bg_std["stripes"])

    # a nearest-centroid classifier on bbox-normalised masks separates the shapes
    def feats(rs):
        out = []
        for r in rs:
            m = Image.open(toy_ds / r["mask_path"])
            out.append(np.asarray(m.crop(m.getbbox()).resize((12, 12), Image.BILINEAR), np.float32).ravel())
        return np.array(out), np.array([r["label"] for r in rs])

    xtr, ytr = feats([r for r in rows if r["split"] == "train"])
    xva, yva = feats([r for r in rows if r["split"] == "val"])
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(4)])
    pred = ((xva[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yva).mean() >= 0.9


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = toy._render_one
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(toy, "_render_one", flaky)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_toy_dataset(out, seed=0, **SMALL)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary sibling left either


def test_failed_regeneration_keeps_old_and_success_replaces(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    generate_toy_dataset(out, seed=0, **SMALL)
    before = _all_files(out)

    def boom(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(toy, "_render_one", boom)
        with pytest.raises(KeyboardInterrupt):
            generate_toy_dataset(out, seed=1, **SMALL)
    assert _all_files(out) == before
    generate_toy_dataset(out, seed=1, **SMALL)
    assert json.loads((out / "dataset.json").read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


# --------------------------------------------------------------------------------------- folders
def _save(path: Path, arr: np.ndarray, mode: str | None = None, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    _save(root / "dog" / "b.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    _save(root / "dog" / "a.JPG", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), fmt="JPEG")
    _save(root / "cat" / "x.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))                # L
    _save(root / "cat" / "sub" / "y.png", rng.integers(0, 256, (18, 40, 4), dtype=np.uint8))     # RGBA
    _save(root / "cat" / "z.png", rng.integers(0, 256, (17, 17, 3), dtype=np.uint8), mode="P")   # palette
    (root / "cat" / "notes.txt").write_text("not an image")
    _save(root / "cat" / ".hidden.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return root


def test_scan_image_folder_sorted_and_filtered(folder_tree):
    paths, labels, names = scan_image_folder(folder_tree)
    assert names == ["cat", "dog"]
    rel = [Path(p).relative_to(folder_tree).as_posix() for p in paths]
    assert rel == ["cat/sub/y.png", "cat/x.png", "cat/z.png", "dog/a.JPG", "dog/b.png"]
    assert labels == [0, 0, 0, 1, 1]
    paths2, labels2, names2 = scan_image_folder(folder_tree, classes=["dog", "cat"])
    assert names2 == ["dog", "cat"] and labels2 == [0, 0, 1, 1, 1]


def test_scan_image_folder_errors_name_the_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        scan_image_folder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        scan_image_folder(empty)
    root = tmp_path / "r"
    _save(root / "ok" / "a.png", np.zeros((4, 4, 3), np.uint8))
    (root / "bad").mkdir()
    (root / "bad" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=str(root / "bad")):
        scan_image_folder(root)
    with pytest.raises(FileNotFoundError, match=str(root / "ghost")):
        scan_image_folder(root, classes=["ok", "ghost"])


def test_image_dataset_shape_range_labels(folder_tree):
    ds = ImageDataset.from_folder(folder_tree, resolution=16)
    assert len(ds) == 5 and ds.class_names == ["cat", "dog"]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert y == ds.labels[i]
    x, _ = ds[1]  # the L image: all channels equal
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert [y for _, y in ds] == [0, 0, 0, 1, 1]


def test_lanczos_resize_and_center_crop_match_manual(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)  # H=20, W=40
    p = _save(tmp_path / "c" / "wide.png", arr)
    ds = ImageDataset([p], [0], resolution=16, mid_reso=1.125)  # shorter side -> round(18) = 18
    x, _ = ds[0]
    assert x.shape == (3, 16, 16)
    ref = Image.fromarray(arr).resize((36, 18), Image.Resampling.LANCZOS)
    ref = np.asarray(ref)[1:17, 10:26]  # centre crop: top = round(2/2), left = round(20/2)
    expected = torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    # mid_reso = 1 on an already R x R image: no resampling at all
    sq = _save(tmp_path / "c" / "sq.png", arr[:, :20])
    x1, _ = ImageDataset([sq], [0], resolution=20, mid_reso=1.0)[0]
    torch.testing.assert_close(x1, torch.from_numpy(arr[:, :20]).permute(2, 0, 1).float() / 255 * 2 - 1)


def test_hflip_fixed_and_random(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    p = _save(tmp_path / "c" / "a.png", arr)
    plain, _ = ImageDataset([p], [0], resolution=16, mid_reso=1.0)[0]
    flipped, _ = ImageDataset([p, p], [0, 0], resolution=16, mid_reso=1.0, hflip=[True, False])[0]
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    rnd = ImageDataset([p] * 400, [0] * 400, resolution=16, mid_reso=1.0, hflip=True, seed=5)
    flags = [rnd.flip_for(i) for i in range(400)]
    assert 0.4 < np.mean(flags) < 0.6
    assert flags == [ImageDataset([p] * 400, [0] * 400, resolution=16, hflip=True, seed=5).flip_for(i)
                     for i in range(400)]
    i_flip, i_keep = flags.index(True), flags.index(False)
    assert torch.equal(rnd[i_flip][0], plain.flip(-1)) and torch.equal(rnd[i_keep][0], plain)
    rnd.set_epoch(1)
    assert [rnd.flip_for(i) for i in range(400)] != flags


def test_random_crop_is_seeded(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    p = _save(tmp_path / "c" / "a.png", arr)
    kw = dict(resolution=16, mid_reso=1.5, crop="random", seed=0)
    a = ImageDataset([p] * 8, [0] * 8, **kw)
    b = ImageDataset([p] * 8, [0] * 8, **kw)
    xa = torch.stack([a[i][0] for i in range(8)])
    assert torch.equal(xa, torch.stack([b[i][0] for i in range(8)]))
    assert len({x.numpy().tobytes() for x in xa}) > 1  # different crops for different items


def test_toy_dataset_and_uint8_loading(toy_ds):
    ds = ImageDataset.from_toy(toy_ds, "val")
    rows = read_manifest(toy_ds, "val")
    assert len(ds) == len(rows) == 32 and ds.labels == [r["label"] for r in rows]
    assert ds.class_names == ["circle", "square", "triangle", "cross"] and ds.records[0]["mode"] == rows[0]["mode"]
    x, y = ds[5]
    raw = np.stack([_load(toy_ds, r["path"]) for r in rows])
    torch.testing.assert_close(x, torch.from_numpy(raw[5]).permute(2, 0, 1).float() / 255 * 2 - 1)
    u8 = load_uint8_images([toy_ds / r["path"] for r in rows], 32, progress=False)
    assert u8.dtype == np.uint8 and u8.shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(u8, raw)
    # round trip [-1, 1] -> [0, 1] -> uint8 is lossless
    np.testing.assert_array_equal(to_uint8((x[None] + 1) / 2)[0], raw[5])


# ------------------------------------------------------------------------------------- corrupt files
@pytest.fixture
def bad_files(tmp_path) -> tuple[Path, Path, Path]:
    good = _save(tmp_path / "good.png", np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a PNG file\n")
    return good, truncated, fake


def test_load_rgb_names_corrupt_files(bad_files):
    good, truncated, fake = bad_files
    assert load_rgb(good).size == (64, 64)
    for bad in (truncated, fake):
        with pytest.raises(CorruptImageError) as ei:
            load_rgb(bad)
        assert str(bad) in str(ei.value) and "corrupt or unreadable image" in str(ei.value)
    assert not getattr(__import__("PIL.ImageFile").ImageFile, "LOAD_TRUNCATED_IMAGES")


def test_verify_images_reports_first_bad_file(bad_files):
    good, truncated, fake = bad_files
    assert verify_images([good, good], progress=False) == 2
    for bad in (truncated, fake):
        with pytest.raises(CorruptImageError) as ei:
            verify_images([good, good, bad, good], progress=False)
        msg = str(ei.value)
        assert str(bad) in msg and "2 checked OK" in msg
    with pytest.raises(CorruptImageError, match="truncated.png"):
        load_uint8_images([good, truncated], 64, progress=False)


def test_dataset_getitem_names_corrupt_file(bad_files):
    _, truncated, _ = bad_files
    with pytest.raises(CorruptImageError, match=str(truncated)):
        ImageDataset([truncated], [0], resolution=16)[0]


# ---------------------------------------------------------------------------------------- to_uint8
def test_to_uint8_rounds_and_clamps():
    vals = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 0.999, 1.0, 1.3, -0.2, 127.5 / 255, 127.49 / 255])
    x = vals.view(1, 1, 1, -1).expand(2, 3, 1, -1).clone()
    x[1] = 1 - x[1].clamp(0, 1)
    out = to_uint8(x)
    assert out.shape == (2, 1, len(vals), 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 1, 255, 255, 255, 0, 128, 127]
    assert (out[0, ..., 0] == out[0, ..., 2]).all()
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_uint8(torch.zeros(3, 4, 4))


def test_position_jitter_narrows_where_objects_sit():
    """0 centres every object; 1 spreads them over the whole free range; in between, in proportion."""
    mode = {"shape": "square", "colour": "red", "size": "small", "background": "plain"}

    def centres(jitter):
        out = []
        for i in range(40):
            _, mask = toy.render_toy_image(mode, 32, np.random.default_rng([0, 0, i]), position_jitter=jitter)
            ys, xs = np.nonzero(mask)
            out.append((xs.mean() + 0.5, ys.mean() + 0.5))
        return np.array(out)

    c0, c3, c1 = centres(0.0), centres(0.3), centres(1.0)
    assert np.abs(c0 - 16).max() < 1.0  # centred (rotation jitter moves the mask centroid a little)
    spread = [np.ptp(c, axis=0).max() for c in (c0, c3, c1)]
    assert spread[0] < spread[1] < spread[2] and spread[2] > 8
    assert np.abs(c3 - 16).max() <= 0.3 * 16 / 2 + 1.5  # the free range of a ~16 px object is ~15 px
    with pytest.raises(ValueError, match="position_jitter"):
        generate_toy_dataset("/nonexistent/never", position_jitter=1.5, **SMALL)


# ------------------------------------------------------------------------------------------ token cache
class _Counting(torch.utils.data.Dataset):
    """A dataset that counts its decodes and can fail at one index (a kill in the middle of a split)."""

    def __init__(self, ds, fail_at: int | None = None):
        self.ds, self.labels, self.hflip, self.fail_at, self.calls = ds, ds.labels, ds.hflip, fail_at, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"killed at image {i}")
        self.calls.append(i)
        return self.ds[i]


def _cache_arrays(d: Path, split: str) -> dict[str, np.ndarray]:
    return {k: np.load(d / f"{split}_{k}.npy") for k in ("tokens", "labels", "source")}


def test_token_cache_from_a_dataset_equals_serial_encoding(toy_ds, tmp_path):
    """encode_dataset (each image decoded once, in DataLoader workers, the mirror made from the decoded tensor) gives
    the token maps of encode_split fed image by image with every file decoded again for its flip; a random crop and
    shards that split an image's two variants included, and a resumed run gives them too."""
    from helpers import tiny_vqvae
    from varup.data.folder import open_split
    from varup.tokenizer.tokens import encode_dataset, encode_split, variant_image

    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    pre = {"mid_reso": 1.125, "crop": "random"}  # 32 px -> 18 px (LANCZOS) -> a seeded 16 px crop
    plain = open_split(toy_ds, "val", 16, pre)
    mirrored = ImageDataset.from_toy(toy_ds, "val", resolution=16, mid_reso=1.125, crop="random",
                                     hflip=[True] * len(plain))  # every file decoded again, flipped while decoding
    variants = [{"hflip": False}, {"hflip": True}]
    kw = dict(variants=variants, batch_size=5, shard_size=7)  # 7 rows a shard: shards split an image's variants

    def get_image(i, v):
        return (mirrored if v.get("hflip") else plain)[i][0]

    serial = encode_split(vae, get_image, plain.labels, tmp_path / "serial", "val", **kw)
    ref = _cache_arrays(tmp_path / "serial", "val")
    assert len(np.unique(ref["tokens"], axis=0)) > len(plain)  # the mirrors are encoded as other token maps

    counted = _Counting(plain)
    split = encode_dataset(vae, counted, tmp_path / "once", "val", **kw)
    assert split == serial and sorted(counted.calls) == list(range(len(plain)))  # each image decoded once
    for k, v in _cache_arrays(tmp_path / "once", "val").items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)

    assert encode_dataset(vae, plain, tmp_path / "workers", "val", num_workers=2, **kw) == serial
    for k, v in _cache_arrays(tmp_path / "workers", "val").items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)

    # decoded 5 images at a time: image 20 fails after shards 0-4 (rows 0..34) are written; row 34 is image 17,
    # row 35 its mirror
    with pytest.raises(RuntimeError, match="killed at image 20"):
        encode_dataset(vae, _Counting(plain, fail_at=20), tmp_path / "resumed", "val", **kw)
    assert len(list((tmp_path / "resumed" / ".shards" / "val").glob("*.npz"))) == 5
    rerun = _Counting(plain)
    assert encode_dataset(vae, rerun, tmp_path / "resumed", "val", **kw) == serial
    assert rerun.calls[0] == 17  # the resumed run decodes image 17 again for its mirror
    for k, v in _cache_arrays(tmp_path / "resumed", "val").items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)

    with pytest.raises(ValueError, match="without hflip"):
        encode_dataset(vae, open_split(toy_ds, "val", 16, pre, hflip=True), tmp_path / "x", "val", **kw)
    with pytest.raises(ValueError, match="unknown keys \\['vflip'\\]"):
        variant_image(plain[0][0], {"vflip": True})


def test_varup_encode_stores_the_mirror_of_every_image(toy_ds, tmp_path):
    """`varup encode` with the paper's token_variants [{hflip: false}, {hflip: true}]: the second row of each image is
    the token map of its mirror, for every image (the command opened the dataset with hflip=True, which flips each
    item at random, p = 0.5: about half the "mirrors" were copies of the unflipped image)."""
    from helpers import tiny_vqvae
    from varup.cli import main
    from varup.data.folder import open_split
    from varup.tokenizer.tokens import encode_split

    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    torch.save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, tmp_path / "vqvae.pt")
    variants = [{"hflip": False}, {"hflip": True}]
    main(["encode", "--data", str(toy_ds), "--tokenizer", str(tmp_path / "vqvae.pt"), "--resolution", "16",
          "--variants", json.dumps(variants), "--splits", "train", "--batch-size", "8", "--workers", "1",
          "--device", "cpu", "--out", str(tmp_path / "cli")])
    plain = open_split(toy_ds, "train", 16, {})
    mirrored = ImageDataset.from_toy(toy_ds, "train", resolution=16, hflip=[True] * len(plain))

    def get_image(i, v):
        return (mirrored if v.get("hflip") else plain)[i][0]

    encode_split(vae, get_image, plain.labels, tmp_path / "ref", "train", variants=variants, batch_size=8)
    for k, v in _cache_arrays(tmp_path / "ref", "train").items():
        np.testing.assert_array_equal(_cache_arrays(tmp_path / "cli", "train")[k], v, err_msg=k)
