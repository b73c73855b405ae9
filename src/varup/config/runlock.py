"""One writer per results directory: ``results/<experiment>/.varup-lock.json`` is held by the Snakemake run that is
writing there, so a second run on the same directory (from another working folder, whose Snakemake lock in
``.snakemake/`` it cannot see) is refused before any job starts, naming the holder, instead of sharing the trainers'
checkpoints and curves.

The lock file records its holder (host, pid and the process's start time, working folder, config files, start time)
and is created with O_CREAT|O_EXCL: of two runs starting together, one gets it. The holder releases it when it ends
(success, error, Ctrl-C). A lock whose holder is gone (same host, no such process, or the pid now belongs to a newer
process) is stale and taken over; a lock held from another host cannot be checked from here and is refused, naming
the file to delete once that run is known to be over.

Imported by the Snakefile: standard library only.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

LOCK_FILE = ".varup-lock.json"
#: how long a half-written lock file (created, not yet filled) is waited for, and how long a takeover guard may
#: stay before it counts as abandoned
_SETTLE_S = 2.0
_GUARD_STALE_S = 60.0


class LockHeld(RuntimeError):
    """Another run holds the results directory (or its lock cannot be read)."""


def lock_path(results: str | os.PathLike) -> Path:
    return Path(results) / LOCK_FILE


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` as the kernel counts it (Linux: /proc/<pid>/stat field 22), so a pid reused
    by a newer process is told apart; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[19] if len(fields) > 19 else None


def holder_record(workdir: str | os.PathLike, configfiles) -> dict:
    """This process as a lock holder (``token`` tells two records of one process apart)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
            "workdir": os.path.abspath(workdir), "configfiles": [str(f) for f in configfiles],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": uuid.uuid4().hex}


def describe(holder: dict) -> str:
    files = " + ".join(holder.get("configfiles") or []) or "the default config"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} in "
            f"{holder.get('workdir')} with {files}")


def read_lock(results: str | os.PathLike) -> dict | None:
    """The holder recorded in the lock file; None when there is none. A file that stays unreadable (not a holder's
    JSON) raises LockHeld naming it."""
    f = lock_path(results)
    deadline = time.monotonic() + _SETTLE_S
    while True:
        try:
            rec = json.loads(f.read_text())
            if isinstance(rec, dict) and "pid" in rec and "host" in rec:
                return rec
            problem = "it holds no holder record"
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # being written by its holder this instant, or damaged
            problem = str(e)
        if time.monotonic() > deadline:
            raise LockHeld(f"{f} exists but cannot be read ({problem}): if no Snakemake run is writing "
                           f"{Path(results)}/, delete {f} and start again.")
        time.sleep(0.1)


def holder_state(holder: dict) -> str:
    """'live', 'dead' (its process is gone: stale) or 'foreign' (held from another host: cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return "foreign"
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "dead"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:  # another user's live process
        pass
    start = process_start(pid)
    if holder.get("pid_start") and start and start != holder["pid_start"]:
        return "dead"  # the pid was reused by a newer process
    return "live"


def refusal(results: str | os.PathLike, holder: dict, state: str) -> str:
    """Why this run may not write into ``results`` now: who holds it and what to do."""
    f = lock_path(results)
    head = (f"{Path(results)}/ is being written by another Snakemake run ({describe(holder)}); a second run on the "
            f"same results directory would share its checkpoints and training curves, so this one stops before "
            f"any job starts. The lock is {f}.")
    if state == "foreign":
        return (f"{head} It was taken on another host, {holder.get('host')}, whose processes cannot be checked from "
                f"here: if that run is over (on {holder.get('host')}: `ps -p {holder.get('pid')}`), delete {f} and "
                f"start again; otherwise wait for it, or give this run its own `results_dir` or `experiment:`.")
    return (f"{head} Wait for that run to end (it releases the lock), stop it, or give this run its own "
            f"`results_dir` or `experiment:`. A lock whose process is gone is taken over by itself.")


def _create(f: Path, record: dict) -> bool:
    """Create the lock file holding ``record``; False when it exists."""
    try:
        fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return True


def _remove_if_same(f: Path, stale: dict) -> None:
    """Delete the lock file if it still holds ``stale`` (not a lock another run has taken meanwhile). Guarded by an
    O_EXCL side file so that two runs taking over one stale lock do not delete each other's new one."""
    guard = f.with_name(f.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:  # left by a run killed mid-takeover
                guard.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.1)
        return
    os.close(fd)
    try:
        current = read_lock(f.parent)
        if current is not None and current.get("token") == stale.get("token"):
            f.unlink()
    finally:
        guard.unlink()


def acquire(results: str | os.PathLike, record: dict) -> dict | None:
    """Hold ``results`` for the run ``record`` (holder_record). Returns the stale holder it took over (to be named
    in a warning), or None. Raises LockHeld naming the holder and the lock file when a live or unverifiable run
    holds it."""
    d = Path(results)
    d.mkdir(parents=True, exist_ok=True)
    f = lock_path(d)
    taken_over = None
    while True:
        if _create(f, record):
            return taken_over
        holder = read_lock(d)
        if holder is None:  # released between the two calls
            continue
        if holder.get("token") == record.get("token"):
            return taken_over  # already ours
        state = holder_state(holder)
        if state != "dead":
            raise LockHeld(refusal(d, holder, state))
        _remove_if_same(f, holder)
        taken_over = holder


def release(results: str | os.PathLike, record: dict) -> bool:
    """Delete the lock if ``record`` holds it (never another run's); True when it did. Safe to call twice."""
    try:
        holder = read_lock(results)
    except LockHeld:
        return False
    if holder is None or holder.get("token") != record.get("token"):
        return False
    try:
        lock_path(results).unlink()
    except FileNotFoundError:
        return False
    return True


def held_by_other(results: str | os.PathLike) -> str | None:
    """A warning for a run that starts no job (a dry run, --unlock): who holds ``results`` now and what a run that
    starts jobs would meet; None when nobody does."""
    try:
        holder = read_lock(results)
    except LockHeld as e:
        return str(e)
    if holder is None:
        return None
    f, state = lock_path(results), holder_state(holder)
    if state == "dead":
        return f"{f} names a run that is gone ({describe(holder)}): the next run that starts jobs takes it over."
    head = (f"{Path(results)}/ is held by another Snakemake run ({describe(holder)}): a run that starts jobs now is "
            f"refused (a dry run is not).")
    if state == "foreign":
        return f"{head} It was taken on another host: if that run is over, delete {f}."
    return f"{head} The lock is {f}."
