"""varup.data.prepare: archive fetching (loopback HTTP on 127.0.0.1 only) and AFHQ / ImageNet-100 / folder
preparation into the toy's dataset-directory format, on tiny generated fixtures."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import re
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from varup.base.download import ChecksumError, DownloadError
from varup.base.utils import sha256_file
from varup.data.folder import CorruptImageError, ImageDataset
from varup.data.prepare import (
    AFHQ_CLASSES,
    UnsafeArchiveError,
    fetch_archive,
    imagenet1k_index,
    prepare_afhq,
    prepare_folder,
    prepare_imagenet100,
    read_class_list,
    split_val_indices,
)
from varup.data.toy import read_manifest

pytestmark = pytest.mark.timeout(60)
FAST = dict(timeout=5, backoff=0.01, retries=0)


# ------------------------------------------------------------------------------------------ fixtures
def _image_bytes(fmt: str, size=(40, 48), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path: Path, fmt: str = "PNG", size=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(fmt, size))
    return path


N_AFHQ = {"train": 2, "val": 1}  # images per class


def _afhq_zip() -> bytes:
    """A tiny afhq.zip as released: afhq/{train,val}/{cat,dog,wild}/ with PNG and JPEG files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split, n in N_AFHQ.items():
            for c in AFHQ_CLASSES:
                for i in range(n):
                    fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                    zf.writestr(f"afhq/{split}/{c}/flickr_{c}_{i:06d}.{ext}", _image_bytes(fmt))
    return buf.getvalue()


AFHQ_ZIP = _afhq_zip()
AFHQ_SHA = hashlib.sha256(AFHQ_ZIP).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` with byte ranges; ``server.truncate_first`` closes the connection after
    that many body bytes on the first request (same pattern as tests/test_download.py)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
            first = len(srv.requests) == 1
        data = srv.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if first and srv.truncate_first is not None:
            self.wfile.write(body[: srv.truncate_first])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.lock, srv.truncate_first = {"/afhq.zip": AFHQ_ZIP}, [], threading.Lock(), None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ------------------------------------------------------------------------------------- fetch + AFHQ
def test_fetch_and_prepare_afhq(server, tmp_path):
    dl = tmp_path / "downloads"
    res = fetch_archive(f"{server.base}/afhq.zip?dl=1", dl, sha256=AFHQ_SHA, **FAST)
    assert res == {"archive": dl / "afhq.zip", "sha256": AFHQ_SHA, "extracted_dir": dl / "afhq", "pinned": True}
    assert (dl / "afhq" / ".complete").read_text().strip() == AFHQ_SHA
    assert _leftovers(dl) == ["afhq", "afhq.zip"]  # no temp dir, no .part, no sidecar when pinned

    out = tmp_path / "data" / "afhq"
    info = prepare_afhq(res["extracted_dir"], out, resolution=64, source={"url": "u"})
    assert info["classes"] == ["cat", "dog", "wild"] and info["kind"] == "afhq" and info["resolution"] == 64
    assert info["counts"] == {"train": 6, "val": 3}
    assert info["class_counts"] == {"train": [2, 2, 2], "val": [1, 1, 1]}
    assert info["source"]["archive_sha256"] == AFHQ_SHA and info["source"]["url"] == "u"
    assert json.loads((out / "dataset.json").read_text()) == info
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "manifest.csv"]  # images are not copied

    rows = read_manifest(out, verify=True)
    assert [r["split"] for r in rows] == ["train"] * 6 + ["val"] * 3
    assert [r["label"] for r in rows] == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    for r in rows:
        p = Path(r["path"])
        assert p.is_absolute() and p.is_file() and p.parent.name == r["class_name"] == AFHQ_CLASSES[r["label"]]
        assert p.parent.parent.name == r["split"] and str(p).startswith(str(dl / "afhq" / "afhq"))
        assert r["mask_path"] == "" and r["mode"] == -1 and r["mode_in_class"] == -1

    ds = ImageDataset.from_toy(out, "train", resolution=64, mid_reso=1.125)
    x, y = ds[3]
    assert tuple(x.shape) == (3, 64, 64) and y == 1 and ds.paths[3] == rows[3]["path"]
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert len(ImageDataset.from_toy(out, "val")) == 3

    n = len(server.requests)
    again = fetch_archive(f"{server.base}/afhq.zip?dl=1", dl, sha256=AFHQ_SHA, **FAST)
    assert again == res and len(server.requests) == n == 1  # complete: no HTTP request
    res["archive"].unlink()  # the archive may be deleted to save space once unpacked
    assert fetch_archive(f"{server.base}/afhq.zip?dl=1", dl, sha256=AFHQ_SHA, **FAST) == res
    assert len(server.requests) == 1 and not res["archive"].exists()


def test_prepare_afhq_accepts_afhq_dir_itself_and_reports_missing(tmp_path):
    root = tmp_path / "afhq"
    for split in ("train", "val"):
        for c in AFHQ_CLASSES:
            _write_image(root / split / c / "a.png")
    info = prepare_afhq(root, tmp_path / "out", verify=True)
    assert info["counts"] == {"train": 3, "val": 3} and info["source"]["root"] == str(root)
    with pytest.raises(FileNotFoundError, match="AFHQ not found under"):
        prepare_afhq(tmp_path / "nothing-here", tmp_path / "out2")
    (root / "val" / "wild" / "a.png").unlink()
    with pytest.raises(ValueError, match=re.escape(str(root / "val" / "wild"))):
        prepare_afhq(tmp_path, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    dl = tmp_path / "downloads"
    with pytest.raises(ChecksumError, match=AFHQ_SHA):
        fetch_archive(f"{server.base}/afhq.zip", dl, sha256="0" * 64, **FAST)
    assert _leftovers(dl) == []  # neither archive, .part, temp dir nor extracted dir


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.truncate_first = 1000
    dl = tmp_path / "downloads"
    with pytest.raises(DownloadError):
        fetch_archive(f"{server.base}/afhq.zip", dl, sha256=AFHQ_SHA, **FAST)
    assert _leftovers(dl) == ["afhq.zip.part"] and (dl / "afhq.zip.part").stat().st_size == 1000
    res = fetch_archive(f"{server.base}/afhq.zip", dl, sha256=AFHQ_SHA, **FAST)
    assert [r["range"] for r in server.requests] == [None, "bytes=1000-"]
    assert sha256_file(res["archive"]) == AFHQ_SHA and (res["extracted_dir"] / "afhq" / "train" / "dog").is_dir()


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_path_traversal_member_is_refused(server, tmp_path):
    server.files["/evil.zip"] = _zip({"evil/ok.txt": b"fine", "evil/../../escaped.txt": b"gotcha"})
    dl = tmp_path / "sub" / "downloads"
    with pytest.raises(UnsafeArchiveError, match=re.escape("'evil/../../escaped.txt'")):
        fetch_archive(f"{server.base}/evil.zip", dl, sha256=hashlib.sha256(server.files["/evil.zip"]).hexdigest(),
                      **FAST)
    assert _leftovers(dl) == ["evil.zip"]  # the (correctly downloaded) archive only: nothing extracted
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "sub" / "escaped.txt").exists()


@pytest.mark.parametrize("member", ["/abs/x.txt", "a/../../x.txt"])
def test_path_traversal_in_tar_is_refused(tmp_path, member):
    src = tmp_path / "bad.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(member))):
        fetch_archive(src.as_uri(), tmp_path / "dl", sha256=sha256_file(src))
    assert _leftovers(tmp_path / "dl") == ["bad.tar.gz"]


def test_tar_archive_unpacks(tmp_path):
    src = tmp_path / "data.tgz"
    with tarfile.open(src, "w:gz") as tf:
        info = tarfile.TarInfo("data/x/y.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    res = fetch_archive(src.as_uri(), tmp_path / "dl", sha256=sha256_file(src))
    assert res["extracted_dir"] == tmp_path / "dl" / "data"
    assert (res["extracted_dir"] / "data" / "x" / "y.txt").read_bytes() == b"hello"


def test_interrupted_unpack_leaves_no_directory(server, tmp_path):
    good = _zip({"d/a.txt": b"a" * 100, "d/b.txt": b"b" * 100}, zipfile.ZIP_STORED)
    bad = good.replace(b"b" * 100, b"c" + b"b" * 99)  # second member fails its CRC mid-unpack
    server.files["/d.zip"] = bad
    dl = tmp_path / "dl"
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        fetch_archive(f"{server.base}/d.zip", dl, sha256=hashlib.sha256(bad).hexdigest(), **FAST)
    assert _leftovers(dl) == ["d.zip"]  # no half-unpacked d/ nor temp dir


def test_trust_on_first_use(server, tmp_path, caplog):
    dl, url = tmp_path / "dl", f"{server.base}/afhq.zip"
    with caplog.at_level(logging.WARNING, logger="varup.prepare"):
        res = fetch_archive(url, dl, config_key="datasets.afhq.download.sha256", **FAST)
    assert res["pinned"] is False and res["sha256"] == AFHQ_SHA
    assert (dl / "afhq.zip.sha256").read_text().strip() == AFHQ_SHA
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and AFHQ_SHA in warn[0] and "datasets.afhq.download.sha256" in warn[0]

    # a corrupted local archive (unpack redone) is verified against the recorded hash and fetched again
    (dl / "afhq.zip").write_bytes(b"corrupt")
    (dl / "afhq" / ".complete").unlink()
    caplog.clear()
    assert fetch_archive(url, dl, **FAST)["sha256"] == AFHQ_SHA and len(server.requests) == 2
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "trusting" in r.getMessage()]

    # upstream now serves other bytes: the recorded hash catches it, nothing is left behind
    tampered = AFHQ_ZIP[:-10] + b"x" * 10
    server.files["/afhq.zip"] = tampered
    (dl / "afhq.zip").write_bytes(tampered)
    (dl / "afhq" / ".complete").unlink()
    with pytest.raises(ChecksumError, match=re.escape(str(dl / "afhq.zip.sha256"))):
        fetch_archive(url, dl, **FAST)
    assert not (dl / "afhq.zip").exists() and not (dl / "afhq.zip.part").exists()
    assert (dl / "afhq.zip.sha256").read_text().strip() == AFHQ_SHA  # the record is never overwritten


# ------------------------------------------------------------------------------------------ ImageNet
LISTED = ["n02869837", "n01749939", "n02488291"]  # first three CMC classes (not in sorted order)
UNLISTED = "n00000001"


def _fake_imagenet(root: Path, wnids, n_train=3, n_val=2) -> Path:
    for w in wnids:
        for i in range(n_train):
            _write_image(root / "train" / w / f"{w}_{i}.JPEG", "JPEG", (20, 16))
        for i in range(n_val):
            _write_image(root / "val" / w / f"ILSVRC2012_val_{w}_{i}.JPEG", "JPEG", (20, 16))
    return root


def test_default_class_list_is_cmc_imagenet100():
    wnids = read_class_list()
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert wnids[:3] == LISTED and wnids[-1] == "n02090622"
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)


def test_prepare_imagenet100_subset(tmp_path):
    root = _fake_imagenet(tmp_path / "imagenet", LISTED + [UNLISTED])
    out = tmp_path / "in100"
    info = prepare_imagenet100(root, out, class_list=LISTED, verify=True)
    assert info["classes"] == LISTED and info["kind"] == "imagenet100" and info["resolution"] == 256
    assert info["counts"] == {"train": 9, "val": 6}
    assert info["imagenet1k_index"] is None and "not the 1000" in info["imagenet1k_index_note"]
    rows = read_manifest(out, "train", verify=True)
    assert [(r["class_name"], r["label"]) for r in rows] == [(w, k) for k, w in enumerate(LISTED) for _ in range(3)]
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).parent.name == r["class_name"] for r in rows)
    assert UNLISTED not in (out / "manifest.csv").read_text()
    assert ImageDataset.from_toy(out, "val", resolution=16, mid_reso=1.0)[5][1] == 2

    small = prepare_imagenet100(root, tmp_path / "small", class_list=LISTED, max_per_class=1)
    assert small["counts"] == {"train": 3, "val": 3}

    listfile = tmp_path / "classes.txt"
    listfile.write_text("# my list\n" + "\n".join(reversed(LISTED)) + "\n")
    assert prepare_imagenet100(root, tmp_path / "rev", class_list=listfile)["classes"] == LISTED[::-1]


def test_prepare_imagenet100_errors(tmp_path):
    root = _fake_imagenet(tmp_path / "imagenet", LISTED)
    with pytest.raises(FileNotFoundError, match="n02107142") as ei:
        prepare_imagenet100(root, tmp_path / "o", class_list=LISTED + ["n02107142"])
    assert str(root / "train") in str(ei.value)
    with pytest.raises(FileNotFoundError, match="97 listed ImageNet class"):  # default list: 3 of 100 present
        prepare_imagenet100(root, tmp_path / "o")
    (root / "val" / LISTED[1]).rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=LISTED[1]) as ei:
        prepare_imagenet100(root, tmp_path / "o", class_list=LISTED)
    assert str(root / "val") in str(ei.value)
    flat = tmp_path / "flat"
    _fake_imagenet(flat, LISTED[:1])
    for p in (flat / "val" / LISTED[0]).iterdir():
        p.rename(flat / "val" / p.name)
    (flat / "val" / LISTED[0]).rmdir()
    with pytest.raises(ValueError, match=r"flat val/.*val/<wnid>/\*\.JPEG"):
        prepare_imagenet100(flat, tmp_path / "o", class_list=LISTED[:1])
    with pytest.raises(ValueError, match="duplicated"):
        prepare_imagenet100(root, tmp_path / "o", class_list=LISTED[:1] * 2)
    assert not (tmp_path / "o").exists()


def test_imagenet1k_index_with_1000_classes(tmp_path):
    rng = np.random.default_rng(0)
    others = {f"n{v:08d}" for v in rng.choice(10**8, size=1200, replace=False)} - set(LISTED)
    all_wnids = sorted(LISTED + sorted(others)[:997])
    root = _fake_imagenet(tmp_path / "imagenet", LISTED, n_train=1, n_val=1)
    for w in all_wnids:
        (root / "train" / w).mkdir(exist_ok=True)
    (root / "train" / "not-a-wnid").mkdir()
    info = prepare_imagenet100(root, tmp_path / "o", class_list=LISTED)
    assert info["imagenet1k_index"] == [all_wnids.index(w) for w in LISTED]
    assert len(set(info["imagenet1k_index"])) == 3 and info["counts"] == {"train": 3, "val": 3}
    assert imagenet1k_index(root / "train", LISTED[:1])[0] == [all_wnids.index(LISTED[0])]


# ------------------------------------------------------------------------------------------- folder
def test_prepare_folder_released_split(tmp_path):
    root = tmp_path / "mine"
    for split, n in (("train", 3), ("val", 1)):
        for c in ("zebra", "ant"):
            for i in range(n):
                _write_image(root / split / c / f"{i}.png")
    info = prepare_folder(root, tmp_path / "out", resolution=32)
    assert info["classes"] == ["ant", "zebra"] and info["split"] == {"method": "released"}
    assert info["counts"] == {"train": 6, "val": 2} and info["name"] == "mine" and info["kind"] == "folder"
    rows = read_manifest(tmp_path / "out", "val")
    assert [(Path(r["path"]).parent.name, r["label"]) for r in rows] == [("ant", 0), ("zebra", 1)]
    (root / "val" / "zebra").rename(root / "val" / "zebras")
    with pytest.raises(ValueError, match="zebras"):
        prepare_folder(root, tmp_path / "out2", resolution=32)


def test_prepare_folder_seeded_split(tmp_path):
    root = tmp_path / "mine"
    for c, n in (("a", 10), ("b", 1), ("c", 2)):
        for i in range(n):
            _write_image(root / c / f"{i:02d}.png")
    info = prepare_folder(root, tmp_path / "o1", resolution=32, val_fraction=0.3, seed=0, verify=False)
    assert info["class_counts"] == {"train": [7, 1, 1], "val": [3, 0, 1]}
    assert info["split"] == {"method": "seeded", "val_fraction": 0.3, "seed": 0}
    again = prepare_folder(root, tmp_path / "o2", resolution=32, val_fraction=0.3, seed=0)
    assert (tmp_path / "o1" / "manifest.csv").read_bytes() == (tmp_path / "o2" / "manifest.csv").read_bytes()
    assert again["manifest_sha256"] == info["manifest_sha256"]
    other = prepare_folder(root, tmp_path / "o3", resolution=32, val_fraction=0.3, seed=1)
    assert other["class_counts"] == info["class_counts"] and other["manifest_sha256"] != info["manifest_sha256"]
    rows = read_manifest(tmp_path / "o1")
    val_a = [Path(r["path"]).name for r in rows if r["split"] == "val" and r["class_name"] == "a"]
    rng = np.random.default_rng([0, zlib.crc32(b"a")])
    assert val_a == [f"{i:02d}.png" for i in split_val_indices(10, 0.3, rng)]
    train = {r["path"] for r in rows if r["split"] == "train"}
    assert train.isdisjoint(r["path"] for r in rows if r["split"] == "val") and len(rows) == 13


def test_split_val_indices_bounds():
    rng = np.random.default_rng(0)
    assert split_val_indices(1, 0.5, rng) == []
    assert len(split_val_indices(2, 0.01, rng)) == 1  # at least one val image once a class has 2
    assert len(split_val_indices(3, 0.99, rng)) == 2  # a class keeps at least one training image
    assert len(split_val_indices(100, 0.1, rng)) == 10


def test_prepare_folder_truncated_image(tmp_path):
    root = tmp_path / "mine"
    for c in ("a", "b"):
        for i in range(3):
            _write_image(root / c / f"{i}.jpg", "JPEG", (64, 64))
    bad = root / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        prepare_folder(root, tmp_path / "out", resolution=32)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == ["mine"]
    with pytest.raises(ValueError, match="train/ but no val/"):
        (root / "train").mkdir()
        prepare_folder(root, tmp_path / "out", resolution=32)


def test_html_instead_of_archive_is_not_trusted(server, tmp_path):
    server.files["/page.zip"] = b"<html>Dropbox: please sign in</html>"
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        fetch_archive(f"{server.base}/page.zip", tmp_path / "dl", **FAST)
    assert _leftovers(tmp_path / "dl") == ["page.zip"]  # no first-use record, no unpacked directory
