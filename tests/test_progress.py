"""Progress in logs: when stderr is not a terminal (a Snakemake log), varup.base.utils.progress writes plain
newline-terminated lines at about every 10 % (or every few minutes), never tqdm's carriage-return updates."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from varup.base.utils import LineProgress, progress


@pytest.fixture(autouse=True)
def progress_on(monkeypatch):
    monkeypatch.delenv("VARUP_NO_PROGRESS", raising=False)


def test_a_file_gets_one_line_per_tenth_and_no_carriage_returns():
    f = io.StringIO()
    bar = progress(total=1000, desc="train", unit="step", file=f)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    bar.close()
    bar.close()  # a second close writes nothing
    text = f.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert [ln.split("%")[0].split(":")[1].strip() for ln in lines] == [str(p) for p in range(0, 101, 10)]
    assert lines[0].startswith("train:   0% 0/1000 step") and lines[-1].startswith("train: 100% 1000/1000 step")
    assert lines[-1].endswith("loss=0.001") and " left" in lines[5] and "step/s" in lines[5]


def test_iteration_resume_offset_and_early_break():
    f = io.StringIO()
    assert list(progress(range(5), desc="x", file=f)) == [0, 1, 2, 3, 4]
    assert f.getvalue().splitlines()[-1].startswith("x: 100% 5/5 it")
    f = io.StringIO()
    bar = progress(total=100, initial=40, desc="resumed", file=f)  # resumed at 40 %: no line for 10 .. 40 %
    bar.update(25)
    bar.close()
    assert [ln.split()[1] for ln in f.getvalue().splitlines()] == ["40%", "65%"]
    f = io.StringIO()
    for x in progress(range(100), desc="b", file=f):
        if x == 54:
            break
    assert f.getvalue().splitlines()[-1].startswith("b:  54% 54/100")  # the last line says where it stopped


def test_without_a_total_it_writes_every_n_seconds():
    now = [0.0]
    f = io.StringIO()
    bar = LineProgress(total=None, desc="download", unit="B", unit_scale=True, file=f, every_s=60.0,
                       clock=lambda: now[0])
    for _ in range(10):  # 10 updates, 25 s apart: a line at 0 s, then at 75, 150 and 225 s, then the close
        now[0] += 25.0
        bar.update(1_000_000)
    bar.close()
    lines = f.getvalue().splitlines()
    assert len(lines) == 5 and lines[1].startswith("download: 3.00MB [01:15 elapsed")
    assert lines[-1].startswith("download: 10.0MB [04:10 elapsed") and "40.0kB/s" in lines[-1]


def test_disabled_writes_nothing(monkeypatch):
    f = io.StringIO()
    bar = progress(total=10, file=f, disable=True)
    bar.update(10)
    bar.close()
    monkeypatch.setenv("VARUP_NO_PROGRESS", "1")
    for _ in progress(range(3), file=f):
        pass
    assert f.getvalue() == ""


def test_a_terminal_still_gets_tqdm():
    from tqdm import tqdm

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = progress(total=3, file=tty)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(master)


def test_stderr_redirected_to_a_log_file_has_lines(tmp_path):
    """What a Snakemake rule sees: ``varup ... > {log} 2>&1``."""
    log = tmp_path / "job.log"
    code = ("from varup.base.utils import progress\n"
            "bar = progress(total=200, desc='encode', unit='img')\n"
            "for _ in range(200): bar.update(1)\n"
            "bar.close()\n")
    env = {k: v for k, v in os.environ.items() if k != "VARUP_NO_PROGRESS"}
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, env=env, timeout=60)
    text = log.read_text()
    assert "\r" not in text and len(text.splitlines()) == 11 and text.splitlines()[-1].startswith("encode: 100%")
