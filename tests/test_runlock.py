"""One writer per results directory (varup.config.runlock): the lock file's holder, its release, the takeover of a
lock whose process is gone, the refusal of a live or unverifiable one; and the trial of the issue: two Snakemake
runs from two working folders on one results_dir, the second refused while the first runs, naming it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tinydag import REPO, smk, tiny_config
from varup.config import runlock


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def record(tmp_path: Path, **over) -> dict:
    return {**runlock.holder_record(tmp_path, ["cfg.yaml"]), **over}


def test_a_held_directory_refuses_another_holder_until_released(tmp_path):
    res = tmp_path / "results" / "toy"
    mine, other = record(tmp_path / "a"), record(tmp_path / "b")
    assert runlock.acquire(res, mine) is None
    f = res / runlock.LOCK_FILE
    held = json.loads(f.read_text())
    assert held["pid"] == os.getpid() and held["workdir"] == str(tmp_path / "a") and held["token"] == mine["token"]
    assert held["configfiles"] == ["cfg.yaml"] and held["started"] and held["host"]
    with pytest.raises(runlock.LockHeld) as e:
        runlock.acquire(res, other)  # a live process on this host holds it
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and str(tmp_path / "a") in msg and str(f) in msg and "cfg.yaml" in msg
    assert runlock.release(res, other) is False and json.loads(f.read_text())["token"] == mine["token"]
    warned = runlock.held_by_other(res)  # what a dry run says
    assert warned.endswith(f"a run that starts jobs now is refused (a dry run is not). The lock is {f}.")
    assert runlock.release(res, mine) is True and not f.exists()
    assert runlock.release(res, mine) is False  # twice is harmless
    assert runlock.held_by_other(res) is None
    assert runlock.acquire(res, other) is None and json.loads(f.read_text())["token"] == other["token"]


def test_a_lock_whose_process_is_gone_is_taken_over_naming_it(tmp_path):
    res = tmp_path / "toy"
    gone = record(tmp_path / "old", pid=dead_pid())
    runlock.acquire(res, gone)  # written as that process would have (it holds nothing now)
    assert "takes it over" in runlock.held_by_other(res)
    new = record(tmp_path / "new")
    stale = runlock.acquire(res, new)
    assert stale["pid"] == gone["pid"] and stale["workdir"] == str(tmp_path / "old")
    assert str(tmp_path / "old") in runlock.describe(stale)
    assert json.loads((res / runlock.LOCK_FILE).read_text())["token"] == new["token"]


@pytest.mark.skipif(runlock.process_start(os.getpid()) is None, reason="no /proc: a reused pid cannot be told apart")
def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    assert runlock.holder_state(record(tmp_path)) == "live"
    assert runlock.holder_state(record(tmp_path, pid_start="1")) == "dead"  # this pid, another process's start


def test_a_lock_from_another_host_is_refused_naming_the_file_to_delete(tmp_path):
    res = tmp_path / "toy"
    foreign = record(tmp_path / "elsewhere", host="login-2.cluster.example", pid=dead_pid())
    runlock.acquire(res, foreign)
    with pytest.raises(runlock.LockHeld) as e:
        runlock.acquire(res, record(tmp_path))
    f = res / runlock.LOCK_FILE
    msg = str(e.value)
    assert "login-2.cluster.example" in msg and f"delete {f}" in msg and str(tmp_path / "elsewhere") in msg
    assert json.loads(f.read_text())["token"] == foreign["token"]  # not taken over: its process cannot be checked
    assert f"another host: if that run is over, delete {f}" in runlock.held_by_other(res)


def test_an_unreadable_lock_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "_SETTLE_S", 0.3)
    res = tmp_path / "toy"
    res.mkdir()
    (res / runlock.LOCK_FILE).write_text("{not json")
    with pytest.raises(runlock.LockHeld, match=f"{res / runlock.LOCK_FILE} exists but cannot be read"):
        runlock.acquire(res, record(tmp_path))


def test_of_runs_taking_over_one_stale_lock_at_once_exactly_one_gets_it(tmp_path):
    res = tmp_path / "toy"
    runlock.acquire(res, record(tmp_path, pid=dead_pid()))
    records = [record(tmp_path / f"w{i}") for i in range(8)]
    won, refused, start = [], [], threading.Barrier(len(records))

    def contend(r):
        start.wait()
        try:
            runlock.acquire(res, r)
            won.append(r["token"])
        except runlock.LockHeld:
            refused.append(r["token"])

    threads = [threading.Thread(target=contend, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and len(refused) == 7  # one holder (this pid, alive: the others are refused)
    assert json.loads((res / runlock.LOCK_FILE).read_text())["token"] == won[0]


def tree(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def wait_for(cond, what: str, log: Path, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _ctrl_c_reaches_it() -> None:
    """SIGINT handled as a terminal's Ctrl-C reaches a foreground Snakemake: a shell that starts a job in the
    background (CI, `nohup … &`) hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_second_run_from_another_folder_is_refused_while_the_first_holds_the_results(tmp_path):
    """The issue's trial: two working folders, one absolute results_dir. Run A makes two cheap jobs but may start
    only one per 10 minutes, so after the first it waits, holding results/toy/. Run B (dry run: warned; run and
    --touch: refused naming A, writing nothing) and, once A is stopped with Ctrl-C (its lock released), B runs."""
    results = tmp_path / "shared" / "results"
    cfg = tiny_config(results)
    cfgfile = tmp_path / "tiny.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    res = results / cfg["experiment"]
    lock = res / runlock.LOCK_FILE
    targets = [str(res / "shapes" / "data"), str(res / "shapes" / "ood_data")]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    log = tmp_path / "a.log"
    with open(log, "w") as out:
        a = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(a_dir),
                              "--configfile", str(cfgfile), "--cores", "1", "--max-jobs-per-timespan", "1/600s",
                              *targets], stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "VARUP_NO_PROGRESS": "1"}, preexec_fn=_ctrl_c_reaches_it)
    try:
        wait_for(lambda: "1 of 2 steps (50%) done" in log.read_text() or a.poll() is not None, "A's first job", log)
        assert a.poll() is None and lock.is_file(), log.read_text()[-4000:]
        held = json.loads(lock.read_text())
        assert held["pid"] == a.pid and held["workdir"] == str(a_dir)
        before = tree(results)

        dry = smk(b_dir, cfgfile, "-n", "--cores", "1", *targets)
        assert dry.returncode == 0 and "a run that starts jobs now is refused" in dry.stdout + dry.stderr

        for extra in ([], ["--touch"]):
            r = smk(b_dir, cfgfile, "--cores", "1", *extra, *targets)
            out = r.stdout + r.stderr
            assert r.returncode != 0, out[-3000:]
            assert f"pid {a.pid}" in out and str(a_dir) in out and str(lock) in out and "before any job starts" in out
        assert tree(results) == before  # B wrote nothing: no output, log, benchmark, lock or owner record
        assert "1 of 2 steps" in log.read_text() and "2 of 2 steps" not in log.read_text()

        a.send_signal(signal.SIGINT)  # Ctrl-C: A stops and releases the lock
        wait_for(lambda: not lock.exists(), "A to release its lock", log, timeout=120)
    finally:
        if a.poll() is None:
            a.kill()  # past its release, A only waits for the rate limiter's timer
        a.wait()
    r = smk(b_dir, cfgfile, "--cores", "1", *targets)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (res / "shapes" / "ood_data").is_dir() and (res / "shapes" / "data").is_dir()
    assert not lock.exists()  # released on success
