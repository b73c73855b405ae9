"""Fixtures shared across test files.

`finished`: one tiny toy DAG run to the end once per session (about 3 minutes on 2 cores), read by the end-to-end
tests (test_e2e.py) and the rerun matrix (test_rerun_matrix.py). A test that adds results to that run (the prompt
study) is marked `extends_finished` and runs after every other test, so the others see the DAG as `all` left it."""
from __future__ import annotations

import pytest

from tinydag import finish_tiny_dag


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    return finish_tiny_dag(tmp_path_factory.mktemp("e2e"))


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("extends_finished") is not None)  # stable: order kept
