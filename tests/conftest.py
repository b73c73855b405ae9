"""Fixtures shared across test files, and how the suite spreads over the cores.

`finished`: one tiny toy DAG run to the end once per session (about 3 minutes on 2 cores), read by the end-to-end
tests (test_e2e.py), the rerun matrix (test_rerun_matrix.py) and the Slurm tests (test_slurm.py). A test that adds
results to that run (the prompt study) is marked `extends_finished` and runs after every other test, so the others see
the DAG as `all` left it.

Under pytest-xdist (`VARUP_TEST_WORKERS=N bash scripts/test.sh` runs `-n N --dist loadgroup`) each test file goes to one worker as a unit,
so its module fixtures are built once; every test that reads `finished` or needs the local Slurm joins one group,
`tinydag`, so the DAG is built once, by one worker, and the Slurm tests never share the one Slurm with each other. Each
worker's torch gets its share of the cores, so two workers do not oversubscribe them."""
from __future__ import annotations

import os

import pytest

from tinydag import finish_tiny_dag


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: per-op overhead dominates them, so one intra-op thread is as
    fast on an idle machine and several times faster on a busy 2-core one. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the previous count is restored after it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    return finish_tiny_dag(tmp_path_factory.mktemp("e2e"))


@pytest.hookimpl(tryfirst=True)  # before xdist's hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "finished" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("tinydag"))
    items.sort(key=lambda item: item.get_closest_marker("extends_finished") is not None)  # stable: order kept
