"""varup.base.download against a local threaded HTTP server on 127.0.0.1 (loopback only, ephemeral port)."""
from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import pytest

from varup.base import download as dl
from varup.base.download import ChecksumError, DownloadError, download

PAYLOAD = os.urandom(300_000) + b"varup-tail"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at /file.bin with optional byte-range support and scripted failures:
    ``server.truncate_first`` closes the connection after that many body bytes on the first request;
    ``server.honour_range`` False answers 200 with the full body even to Range requests."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
            first = len(srv.requests) == 1
        if self.path != "/file.bin":
            self.send_error(404)
            return
        data, start = srv.payload, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and srv.honour_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
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
    srv.payload, srv.requests, srv.lock = PAYLOAD, [], threading.Lock()
    srv.truncate_first, srv.honour_range = None, True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/file.bin"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


FAST = dict(timeout=5, backoff=0.01)


def test_download_ok(server, tmp_path):
    dest = tmp_path / "sub" / "f.bin"
    out = download(server.url, dest, PAYLOAD_SHA, chunk=4096, **FAST)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    assert len(server.requests) == 1 and server.requests[0]["range"] is None


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "f.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as ei:
        download(server.url, dest, wrong, **FAST)
    msg = str(ei.value)
    assert server.url in msg and str(dest) in msg and wrong in msg and PAYLOAD_SHA in msg
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    server.truncate_first = 100_000
    dest = tmp_path / "f.bin"
    part = Path(str(dest) + ".part")
    with pytest.raises(DownloadError) as ei:
        download(server.url, dest, PAYLOAD_SHA, retries=0, **FAST)
    assert type(ei.value) is DownloadError and server.url in str(ei.value)
    assert not dest.exists()
    assert part.exists() and part.read_bytes() == PAYLOAD[:100_000]

    download(server.url, dest, PAYLOAD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert [r["range"] for r in server.requests] == [None, "bytes=100000-"]


def test_retry_within_one_call_resumes(server, tmp_path):
    server.truncate_first = 12_345
    dest = tmp_path / "f.bin"
    download(server.url, dest, PAYLOAD_SHA, retries=2, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, "bytes=12345-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.truncate_first, server.honour_range = 50_000, False
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError):
        download(server.url, dest, PAYLOAD_SHA, retries=0, **FAST)
    download(server.url, dest, PAYLOAD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD  # not the first 50,000 bytes twice
    assert server.requests[1]["range"] == "bytes=50000-"


def test_stale_part_longer_than_file_restarts(server, tmp_path):
    dest = tmp_path / "f.bin"
    Path(str(dest) + ".part").write_bytes(b"x" * (len(PAYLOAD) + 10))
    download(server.url, dest, PAYLOAD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_existing_correct_file_makes_no_request(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(PAYLOAD)
    assert download(server.url, dest, PAYLOAD_SHA, **FAST) == dest
    assert server.requests == []


def test_existing_wrong_file_is_replaced(server, tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"stale")
    download(server.url, dest, PAYLOAD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_http_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError) as ei:
        download(server.url.replace("file.bin", "missing.bin"), tmp_path / "m.bin", retries=3, **FAST)
    assert "missing.bin" in str(ei.value) and len(server.requests) == 1


def test_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = download(src.as_uri(), tmp_path / "out" / "dst.bin", PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="missing"):
        download((tmp_path / "missing").as_uri(), tmp_path / "x.bin")


def test_fetch_pypi_file_reports_pip_failure(tmp_path, monkeypatch):
    class Proc:
        returncode, stderr = 1, "line\nERROR: No matching distribution found for nothing-here==9"

    monkeypatch.setattr(dl.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(DownloadError, match="No matching distribution") as ei:
        dl.fetch_pypi_file("nothing-here==9", "0" * 64, tmp_path)
    assert "nothing-here==9" in str(ei.value)


def test_fetch_pypi_file_verifies_and_caches(tmp_path, monkeypatch):
    wheel = b"PK fake wheel bytes"
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        d = Path(cmd[cmd.index("-d") + 1])
        (d / "some_pkg-1.0-py3-none-any.whl").write_bytes(wheel)

        class Proc:
            returncode, stderr = 0, ""
        return Proc()

    monkeypatch.setattr(dl.subprocess, "run", fake_run)
    good = hashlib.sha256(wheel).hexdigest()
    with pytest.raises(ChecksumError):
        dl.fetch_pypi_file("some-pkg==1.0", "f" * 64, tmp_path)
    assert list(tmp_path.glob("*.whl")) == []
    out = dl.fetch_pypi_file("some-pkg==1.0", good, tmp_path)
    assert out.read_bytes() == wheel and out.parent == tmp_path
    assert dl.fetch_pypi_file("some-pkg==1.0", good, tmp_path) == out and len(calls) == 2  # cached: no pip
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
