"""Config ``deterministic``: varup.base.runtime.set_deterministic sets torch's deterministic algorithms, cuDNN's flags
and the cuBLAS workspace variable, says so in the log, and leaves torch's defaults when off; a CPU training step runs
under it with the weights of the step without it; the command line (--deterministic) and the workflow's variable
(VARUP_DETERMINISTIC, set by workflow/rules/common.smk from the config) switch it on before the command runs."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import varup.cli as cli
from helpers import tiny_var
from varup.base.runtime import CUBLAS_WORKSPACE, DETERMINISTIC_ENV, deterministic_requested, set_deterministic

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def torch_settings() -> dict:
    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn.deterministic": torch.backends.cudnn.deterministic, "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@pytest.fixture
def restore(monkeypatch):
    """torch's global settings and the environment as they were, whatever the test switched on."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    before = torch_settings()
    yield before
    torch.use_deterministic_algorithms(before["algorithms"], warn_only=before["warn_only"])
    torch.backends.cudnn.deterministic = before["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = before["cudnn.benchmark"]


def train_step() -> dict[str, torch.Tensor]:
    """One AdamW step of a tiny class-conditional VAR on a fixed random batch (forward, cross-entropy, backward)."""
    model = tiny_var().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    B, L = 4, model.L
    x = torch.randn(B, L - model.first_l, model.Cvae, generator=g)
    labels, targets = torch.randint(0, 5, (B,), generator=g), torch.randint(0, 64, (B, L), generator=g)
    torch.manual_seed(2)
    logits = model(labels, x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_on_sets_the_flags_says_so_and_a_cpu_training_step_keeps_its_weights(restore, caplog):
    off = train_step()
    assert torch_settings() == restore  # nothing changed by itself
    with caplog.at_level(logging.INFO, logger="varup.base.runtime"):
        done = set_deterministic(True)
    assert torch_settings() == {"algorithms": True, "warn_only": False, "cudnn.deterministic": True,
                                "cudnn.benchmark": False, "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}
    assert done["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and done["use_deterministic_algorithms"] is True
    assert "deterministic: use_deterministic_algorithms=True, CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text
    on = train_step()  # every operation of the step has a deterministic CPU implementation (else torch raises)
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)  # CPU numerics unchanged
    assert any(not torch.equal(on[k], tiny_var().state_dict()[k]) for k in on)  # the step did train


def test_off_leaves_torch_defaults(restore):
    assert set_deterministic(False) == {}
    assert torch_settings() == restore and restore["algorithms"] is False
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_a_workspace_setting_of_the_user_is_kept(restore, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert set_deterministic(True)["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" == os.environ["CUBLAS_WORKSPACE_CONFIG"]


def test_the_workflow_variable_is_read_strictly():
    assert [deterministic_requested({DETERMINISTIC_ENV: v}) for v in ("1", "true", "0", "false", "")] == [
        True, True, False, False, False]
    assert deterministic_requested({}) is False
    with pytest.raises(ValueError, match=f"{DETERMINISTIC_ENV}='yes'.*config key `deterministic`"):
        deterministic_requested({DETERMINISTIC_ENV: "yes"})


@pytest.mark.parametrize(("flag", "env", "expected"), [
    (True, None, True),  # varup <command> --deterministic
    (False, "1", True),  # config deterministic: true, passed by the workflow
    (False, "0", False),  # config deterministic: false (the default)
    (False, None, False),
])
def test_the_command_line_and_the_workflow_variable_switch_it_on_before_the_command(restore, monkeypatch, tmp_path,
                                                                                    flag, env, expected):
    seen = []
    monkeypatch.setattr(cli, "cmd_lm_refs", lambda a: seen.append(torch_settings()))
    if env is not None:
        monkeypatch.setenv(DETERMINISTIC_ENV, env)
    argv = ["lm-refs", "--base", str(tmp_path), "--corpus", str(tmp_path), "--out", str(tmp_path / "refs.pt"),
            "--params", json.dumps({"num_clusters": 4})] + (["--deterministic"] if flag else [])
    assert cli.main(argv) == 0
    assert len(seen) == 1 and seen[0]["algorithms"] is expected
    assert seen[0]["CUBLAS_WORKSPACE_CONFIG"] == (CUBLAS_WORKSPACE if expected else None)


PROBE = """configfile: "{repo}/config/config.yaml"
include: "{repo}/workflow/rules/common.smk"

rule probe:
    output: "probe.txt"
    shell: "echo $VARUP_DETERMINISTIC > {{output}}"
"""


@pytest.mark.parametrize(("config", "expected"), [([], "0"), (["--config", "deterministic=true"], "1")])
def test_the_workflow_passes_config_deterministic_to_its_jobs(tmp_path, config, expected):
    """A job of a workflow built on workflow/rules/common.smk sees VARUP_DETERMINISTIC as the config says (a user's
    own value in the environment does not count)."""
    (tmp_path / "Snakefile").write_text(PROBE.format(repo=REPO))
    env = {**os.environ, DETERMINISTIC_ENV: "1" if expected == "0" else "0"}
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path / "w"),
                        "--cores", "1", "-q", *config], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "w" / "probe.txt").read_text().strip() == expected
