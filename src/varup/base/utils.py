"""Small shared helpers: atomic writes, hashing, logging, progress bars, provenance sidecars, threads."""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("varup")


# -------------------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX),
    on error it is removed, so a reader never sees a half-written file. ``durable``: the data reach the disk
    before the rename (fsync), so a crash of the machine cannot leave an empty or truncated ``path``. A write that
    runs out of space raises :class:`NoSpaceError` naming ``path`` and the free space (``path`` stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix + ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give the result the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            if durable:
                fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except Exception as e:
        if isinstance(e, NoSpaceError) or not is_out_of_space(e, path.parent):
            raise
        written = tmp_path.stat().st_size if tmp_path.exists() else None
        tmp_path.unlink(missing_ok=True)
        raise no_space_error(path, e, written) from e
    finally:
        tmp_path.unlink(missing_ok=True)


class NoSpaceError(OSError):
    """A file that could not be written for want of space (``errno.ENOSPC``): the message names it, the free space
    on its file system and what to do."""


#: what torch's zip writer says when a write falls short ("unexpected pos 526976 vs 526868", "PytorchStreamWriter
#: failed writing …: file write failed", the C++ stream's "basic_ios::clear: iostream error"); it passes on no errno,
#: so the free space decides
_WRITER_FAILURES = ("unexpected pos", "file write failed", "pytorchstreamwriter failed", "iostream error")
#: a writer failure with less than this free on the file system is taken for a full disk
_FULL_BELOW = 16 << 20
_SPACE_MESSAGES = ("no space left on device", "os error 28", "disk quota exceeded")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free (for this user) on the file system of ``path``, or None where that cannot be asked."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _space_left(path: Path) -> str:
    """``12.0 MiB free of 1.8 TiB`` on the file system of ``path``."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "an unknown amount free"
    return f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"


def format_bytes(n: float | None) -> str:
    """``512 B``, ``3.2 MiB``, ``1.5 GiB`` (an unknown amount for None)."""
    if n is None:
        return "an unknown amount"
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def is_out_of_space(exc: BaseException, directory: str | os.PathLike) -> bool:
    """Whether a failed write ran out of space in ``directory``: ``ENOSPC`` / ``EDQUOT``, a library's message saying
    so (safetensors: "os error 28"), or torch's writer failing (:data:`_WRITER_FAILURES`) with under 16 MiB left
    on the file system."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if any(m in text for m in _SPACE_MESSAGES):
        return True
    if not any(m in text for m in _WRITER_FAILURES):
        return False
    free = free_bytes(directory)
    return free is not None and free < _FULL_BELOW


def no_space_error(path: str | os.PathLike, exc: BaseException, written: int | None = None) -> NoSpaceError:
    """The :class:`NoSpaceError` for ``path``, once its partial file is removed (a writer that still holds it open
    keeps its space until the writer is gone: the free space reported is what the file system says now)."""
    path = Path(path)
    why = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
    part = f"; {format_bytes(written)} of it had been written" if written else ""
    return NoSpaceError(errno.ENOSPC, (
        f"no space left on device writing {path} ({type(exc).__name__}: {why}{part}); "
        f"{_space_left(path.parent)} on the file system of {path.parent}. The partial file is "
        f"removed and any previous {path.name} is as it was: free some space there (or move the results to a larger "
        f"disk) and rerun; a training job resumes from its last checkpoint"))


def temp_file_pattern(name: str) -> re.Pattern:
    """The names of the temporaries of a file ``name``: :func:`atomic_path`'s ``.<name>.<8 random>.<suffix>.tmp``
    (or ``….tmp.npy``), a copy's ``.<name>.<pid>.tmp`` and a folder's ``.<name>.tmp<pid>``."""
    return re.compile(rf"\.{re.escape(name)}\.(\w{{8}}\.[\w.]*tmp[\w.]*|\d+\.tmp|tmp\d+)")


def sweep_temp_files(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove what a killed job's atomic writes left in ``folder``: the temporaries of the files ``names`` (those
    this job alone writes: :func:`temp_file_pattern`) when given, else every hidden ``.…tmp…`` entry (a folder this
    job alone writes). For a job to call when it starts, before it writes anything; each removal is logged
    (WARNING). Returns the paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = None if names is None else [temp_file_pattern(n) for n in names]
    removed = []
    for p in sorted(folder.iterdir()):
        n = p.name
        if patterns is None and not (n.startswith(".") and ".tmp" in n):
            continue
        if patterns is not None and not any(r.fullmatch(n) for r in patterns):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.warning("removed %s: a temporary file left by an interrupted write (a killed job)", p)
        removed.append(p)
    return removed


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically and durably (checkpoints and models are what a crash must not truncate)."""
    import torch

    with atomic_path(path, durable=True) as tmp:
        torch.save(obj, tmp)


def atomic_np_save(path: str | os.PathLike, array) -> None:
    import numpy as np

    with atomic_path(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, array)


def atomic_npz_save(path: str | os.PathLike, **arrays) -> None:
    import numpy as np

    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)


def json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"required file is missing: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


# ------------------------------------------------------------------------------------------ hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=json_default).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ logging
def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr and, if given, to ``log_file`` (appending, so a resumed job keeps its history)."""
    root = logging.getLogger("varup")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    root.addHandler(sh)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False
    return root


class LineProgress:
    """Progress for a stream that is not a terminal (a Snakemake log): newline-terminated lines, never carriage
    returns; one line at the start, one each time another ``every_frac`` of ``total`` is done or ``every_s``
    seconds have passed since the last line (whichever comes first), and one at :meth:`close`. The subset of
    tqdm's interface the library uses: iteration, ``update``, ``set_postfix``, ``close``, a context manager."""

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file=None, disable: bool = False, unit_scale: bool = False,
                 every_frac: float = 0.1, every_s: float = 120.0, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.unit_scale = iterable, total, desc, unit, unit_scale
        self.n = self._start_n = initial
        self.file, self.disable, self.every_frac, self.every_s, self.clock = file, disable, every_frac, every_s, clock
        self.postfix, self.closed, self._last_n = "", False, None
        self._t0 = self._last_t = clock()
        self._last_bucket = self._bucket()
        self._emit()

    def _bucket(self) -> int:
        """How many ``every_frac`` steps of ``total`` are done (integer arithmetic: 300 of 1000 is 3 tenths)."""
        return int(self.n * max(1, round(1 / self.every_frac)) // self.total) if self.total else 0

    def _count(self, x: float, unit: str = "") -> str:
        from tqdm import tqdm

        if self.unit_scale:
            return f"{tqdm.format_sizeof(x)}{unit}"
        num = str(int(x)) if float(x).is_integer() else (f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}")
        return num + (f" {unit}" if unit else "")

    def _line(self) -> str:
        from tqdm import tqdm

        dt = self.clock() - self._t0
        rate = (self.n - self._start_n) / dt if dt > 0 else None
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            head += f"{100 * self.n / self.total:3.0f}% {self._count(self.n)}/{self._count(self.total, self.unit)}"
        else:
            head += self._count(self.n, self.unit)
        left = f", {tqdm.format_interval((self.total - self.n) / rate)} left" if self.total and rate else ""
        speed = f", {self._count(rate, self.unit)}/s" if rate else ""
        tail = f" {self.postfix}" if self.postfix else ""
        return f"{head} [{tqdm.format_interval(dt)} elapsed{left}{speed}]{tail}"

    def _emit(self) -> None:
        if self.disable:
            return
        f = self.file if self.file is not None else sys.stderr
        f.write(self._line() + "\n")
        f.flush()
        self._last_t, self._last_bucket, self._last_n = self.clock(), self._bucket(), self.n

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bucket() > self._last_bucket or self.clock() - self._last_t >= self.every_s:
            self._emit()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if not self.closed and self.n != self._last_n:
            self._emit()
        self.closed = True

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, file=None, **kw) -> Any:
    """A progress bar on ``file`` (default stderr): tqdm when it is a terminal; otherwise (a Snakemake log)
    :class:`LineProgress`, plain lines at about every 10 % or 2 minutes. ``VARUP_NO_PROGRESS=1`` silences both."""
    f = sys.stderr if file is None else file
    kw["disable"] = kw.get("disable", False) or os.environ.get("VARUP_NO_PROGRESS") == "1"
    if not (hasattr(f, "isatty") and f.isatty()):
        return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=f, **kw)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=f, dynamic_ncols=True,
                mininterval=0.5, **kw)


# --------------------------------------------------------------------------------------- provenance
def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: Iterable[str] = ("varup", "torch", "torchvision", "numpy", "torch-fidelity", "clean-fid",
                                             "snakemake")) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def device_description(device: str | None = None) -> str:
    try:
        import torch

        if device and str(device).startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    except ImportError:  # pragma: no cover
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(*, config: Any = None, seed: int | None = None, device: str | None = None,
               started: float | None = None, **extra) -> dict:
    rec = {
        "git_commit": git_commit(),
        "config_hash": config_hash(config) if config is not None else None,
        "seed": seed,
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device_description(device),
        "host": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if started is not None:
        rec["wall_time_s"] = round(time.time() - started, 3)
    rec.update(extra)
    return rec


def provenance_path(result_path: str | os.PathLike) -> Path:
    """The provenance sidecar of a result file: ``<result>.prov.json``."""
    return Path(str(result_path) + ".prov.json")


def write_provenance(result_path: str | os.PathLike, **kw) -> Path:
    """Write ``<result>.prov.json`` beside a result file (after the result: a sidecar never precedes its result).
    Rules declare the sidecars as outputs, so Snakemake removes them with their results; a job whose rule cannot
    (its shell passes ``{output}`` whole) calls :func:`remove_orphan_provenance` when it starts."""
    p = provenance_path(result_path)
    atomic_write_json(p, provenance(**kw))
    return p


def remove_orphan_provenance(*results: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    """Remove the sidecars of ``results`` that do not exist: a sidecar must not outlive the result it describes
    (Snakemake deletes a failed job's declared outputs before a rerun, not undeclared sidecars). For a job to call
    when it starts, with the results it writes; accepts paths, lists of paths and None (skipped); returns the
    sidecars removed."""
    removed = []
    for r in results:
        for path in [] if r is None else [r] if isinstance(r, (str, os.PathLike)) else r:
            side = provenance_path(path)
            if side.is_file() and not Path(path).exists():
                side.unlink()
                log.info("removed %s: its result %s is gone", side, path)
                removed.append(side)
    return removed


# ------------------------------------------------------------------------------------------ threads
def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (Snakemake passes the job's ``threads``)."""
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished ``src`` onto ``dst``, replacing an existing ``dst`` directory only now."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"output path exists and is not a directory: {dst}")
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "d")
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
