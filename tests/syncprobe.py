"""Host syncs of a training run, recorded by the phase of the run they happen in (tests/test_train.py).

Recorded: reads of a tensor's value on the host (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``/``float``/``int``
of a tensor) made by varup code, and torch.distributed collectives called by varup code. Each is recorded with the
phase of the run: ``setup`` (before the first step), ``in_step`` s (inside ``varup.training.loop._train_step`` of the
step that ends with s done), ``after_step`` s (after it, before the next step). On a GPU each read is a device sync;
on the CPU these are the same calls. torch.optim's own reads are not varup's (its CPU AdamW reads its step counter;
the fused CUDA AdamW the trainer uses on a GPU reads nothing), nor are the reads inside a collective (the collective
is recorded). Nor is :func:`varup.models.common.check_labels`'s read in a model's forward: with ``sync_free`` it
reads the label range of a CPU tensor only (a device tensor's is not read: tests/test_fastpath.py runs the step on
the meta device), and a run's labels are checked once when the token cache is loaded.

Run as a script (``torchrun … tests/syncprobe.py OUT_DIR <varup arguments>``) it runs ``varup`` with the probe
installed and writes ``OUT_DIR/rank<R>.json``: the list of ``[phase, done, what]``.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import varup
import varup.training.loop as loop

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather", "scatter", "all_to_all")
VARUP = str(Path(varup.__file__).resolve().parent) + os.sep
NOT_OURS = (f"{os.sep}torch{os.sep}optim{os.sep}", f"{os.sep}torch{os.sep}distributed{os.sep}")
CPU_ONLY_READS = {(os.path.join(VARUP, "models", "common.py"), "check_labels")}


def _called_by_varup(depth: int) -> bool:
    """Whether the call ``depth`` frames up comes from varup code (through torch code other than torch.optim and
    torch.distributed)."""
    f = sys._getframe(depth)
    while f is not None:
        name = os.path.realpath(f.f_code.co_filename)
        if any(part in name for part in NOT_OURS) or (name, f.f_code.co_name) in CPU_ONLY_READS:
            return False
        if name.startswith(VARUP):
            return True
        f = f.f_back
    return False


class SyncProbe:
    def __init__(self):
        self.phase: tuple[str, int | None] = ("setup", None)
        self.events: list[tuple[str, int | None, str]] = []

    def install(self, setattr_=setattr) -> "SyncProbe":
        """Patch the reads, the collectives and the trainer's step (``setattr_``: e.g. pytest's monkeypatch)."""
        for name in READS:
            setattr_(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr_(dist, name, self._wrap(getattr(dist, name), name))
        real_step = loop._train_step

        def step(r, net, s, tok, lab, **kw):
            self.phase = ("in_step", s + 1)
            try:
                return real_step(r, net, s, tok, lab, **kw)
            finally:
                self.phase = ("after_step", s + 1)

        setattr_(loop, "_train_step", step)
        return self

    def _wrap(self, fn, what: str):
        def wrapper(*args, **kwargs):
            # the prefetch thread (varup.training.loop.Prefetcher) gathers the next steps' rows from the memory-mapped
            # cache in host memory: its reads are of CPU tensors by construction, not device syncs of the step
            if threading.current_thread() is threading.main_thread() and _called_by_varup(2):
                self.events.append((*self.phase, what))
            return fn(*args, **kwargs)

        return wrapper

    def steps_with_syncs(self) -> dict[str, set]:
        """{phase: the steps (done) with a sync in that phase}."""
        out: dict[str, set] = {}
        for phase, done, _ in self.events:
            out.setdefault(phase, set()).add(done)
        return out


def main(argv: list[str]) -> int:
    out_dir, args = Path(argv[0]), argv[1:]
    probe = SyncProbe().install()
    from varup.cli import main as varup_main

    try:
        return varup_main(args)
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(probe.events))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
