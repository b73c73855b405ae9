"""Small shared helpers: atomic writes, hashing, logging, progress bars, provenance sidecars, threads."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
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
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX),
    on error it is removed, so a reader never sees a half-written file."""
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
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
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


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, **kw) -> Any:
    """tqdm on stderr; refreshes rarely when stderr is a file (Snakemake logs) so logs stay readable."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    kw["disable"] = kw.get("disable", False) or os.environ.get("VARUP_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.5 if tty else 15.0, **kw)


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


def write_provenance(result_path: str | os.PathLike, **kw) -> Path:
    """Write ``<result>.prov.json`` beside a result file."""
    p = Path(str(result_path) + ".prov.json")
    atomic_write_json(p, provenance(**kw))
    return p


# ------------------------------------------------------------------------------------------ threads
def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (Snakemake passes the job's ``threads``)."""
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))
