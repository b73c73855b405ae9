"""Fault trials of the three trainers (issue 22): a kill while a job finishes (between publishing its loss curve and
discarding its checkpoint) and the retry Snakemake makes after deleting the job's outputs, a full disk while a
checkpoint or a model is written, a non-finite loss before the first checkpoint, and the temporary files a killed
job leaves behind."""
from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import varup.lm.sft as sft_mod
import varup.tokenizer.train as tok_mod
import varup.training.loop as loop_mod
from test_train import assets, run_train, same_weights, spec  # noqa: F401  (assets: the tiny token cache fixture)
from varup.base.runtime import NonFiniteLossError, ResumableLog, save_training_state
from varup.base.utils import NoSpaceError, atomic_torch_save
from varup.config.lmplan import TOY_TEMPLATE

torch.set_num_threads(1)
TIMING = ("imgs_per_s", "tokens_per_s", "elapsed_s")


class Killed(BaseException):
    """Stands for SIGKILL at the point it is raised: nothing of the job's own runs after it."""


def _kill(*args, **kwargs):
    raise Killed("killed while the job finishes")


def curve(path: Path) -> list[dict]:
    """A published loss curve without its timing fields."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def delete_outputs(*paths: Path) -> None:
    """What Snakemake does before it retries a failed job: delete the job's declared outputs."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def temp_files(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------ the three trainers, quickly
def _var(assets, out: Path, **kw):  # noqa: F811
    return run_train(assets, out, spec(steps=12, ckpt_every=4, log_every=2), **kw)  # checkpoints at 4 and 8


def _var_outputs(out: Path) -> tuple[Path, ...]:
    return out / "model.pt", out / "model.pt.prov.json", out / "train" / "metrics.jsonl", out / "train" / "summary.json"


def _tokenizer(out: Path, get_batch=None, **kw):
    vq = dict(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4, 8),
              share_quant_resi=4, norm_groups=8, using_sa=False, using_mid_sa=False)
    tc = dict(steps=8, batch_size=4, warmup_steps=2, log_every=1, ckpt_every=2, dead_code_every=0)  # ckpts 2, 4, 6
    imgs = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return tok_mod.train_tokenizer(vq, tc, get_batch or (lambda idx: imgs[torch.as_tensor(idx)]), len(imgs),
                                   out_model=out / "vqvae.pt", work_dir=out, device="cpu", **kw)


def _tokenizer_outputs(out: Path) -> tuple[Path, ...]:
    return out / "vqvae.pt", out / "vqvae.pt.prov.json", out / "metrics.jsonl", out / "summary.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from varup.lm.grammar import make_corpus

    d = tmp_path_factory.mktemp("corpus")
    make_corpus(d, seed=0, n_train=16, eval_per_prompt=1, n_pretrain=64, template=TOY_TEMPLATE)
    return d


def _lm(corpus: Path, out: Path):
    """The LM trainer (:func:`varup.lm.sft.fit`) as the toy base model's pre-training runs it: 8 steps of a
    one-layer Qwen2, checkpoints at 3 and 6."""
    from varup.lm.stages import pretrain_toy

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    return pretrain_toy(corpus, out / "model", out / "train", model_cfg=small, template=TOY_TEMPLATE, device="cpu",
                        train_cfg={"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "max_length": 24,
                                   "log_every": 1, "ckpt_every": 3})


def _lm_outputs(out: Path) -> tuple[Path, ...]:
    return out / "model", out / "model.prov.json", out / "train" / "metrics.jsonl", out / "train" / "summary.json"


def _lm_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------- 5: a kill while the job finishes
@pytest.mark.parametrize("where, name, resumed_from", [
    (loop_mod, "discard_training_state", 8),  # the outputs are written, the checkpoint not yet discarded: resume
    (ResumableLog, "discard", 0),  # the checkpoint is gone, the live log not yet: start afresh
])
def test_var_trainer_killed_while_it_finishes_retries_to_the_whole_curve(
        assets, tmp_path, monkeypatch, where, name, resumed_from):  # noqa: F811
    _var(assets, tmp_path / "ref")
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(where, name, _kill)
        with pytest.raises(Killed):
            _var(assets, cut)
    assert (cut / "train" / "metrics.jsonl").exists()  # the curve was published before the kill
    delete_outputs(*_var_outputs(cut))
    summary = _var(assets, cut)
    assert summary["resumed_from"] == resumed_from
    assert [r["step"] for r in curve(cut / "train" / "metrics.jsonl")] == list(range(2, 13, 2))
    assert curve(cut / "train" / "metrics.jsonl") == curve(tmp_path / "ref" / "train" / "metrics.jsonl")
    assert same_weights(tmp_path / "ref" / "model.pt", cut / "model.pt")
    assert sorted(p.name for p in (cut / "train" / "ckpt").iterdir()) == []  # checkpoints and live log discarded


def test_tokenizer_killed_between_publishing_and_discarding_retries_to_the_whole_curve(tmp_path, monkeypatch):
    from varup.models.vqvae import load_vqvae

    _tokenizer(tmp_path / "ref")
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(tok_mod, "discard_training_state", _kill)
        with pytest.raises(Killed):
            _tokenizer(cut)
    delete_outputs(*_tokenizer_outputs(cut))
    _tokenizer(cut)
    assert [r["step"] for r in curve(cut / "metrics.jsonl")] == list(range(1, 9))
    assert curve(cut / "metrics.jsonl") == curve(tmp_path / "ref" / "metrics.jsonl")
    assert json.loads((cut / "summary.json").read_text())["steps"] == 8
    ref, got = (load_vqvae(d / "vqvae.pt").state_dict() for d in (tmp_path / "ref", cut))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert not (cut / "ckpt" / "last.pt").exists() and not (cut / "ckpt" / "metrics.jsonl").exists()


def test_lm_trainer_killed_between_publishing_and_discarding_retries_to_the_whole_curve(corpus, tmp_path,
                                                                                        monkeypatch):
    _lm(corpus, tmp_path / "ref")
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(sft_mod, "discard_training_state", _kill)
        with pytest.raises(Killed):
            _lm(corpus, cut)
    delete_outputs(*_lm_outputs(cut))
    _lm(corpus, cut)
    assert [r["step"] for r in curve(cut / "train" / "metrics.jsonl")] == list(range(1, 9))
    assert curve(cut / "train" / "metrics.jsonl") == curve(tmp_path / "ref" / "train" / "metrics.jsonl")
    a, b = _lm_weights(tmp_path / "ref" / "model"), _lm_weights(cut / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (cut / "train" / "ckpt" / "last.pt").exists()


# --------------------------------------------------------------------------------- 9: a full disk
def _state(size: int = 300) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(size, size)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """The writer fails with ENOSPC after writing part of the file (as a full disk does)."""
    model, opt = _state(8)
    last = tmp_path / "ckpt" / "last.pt"
    save_training_state(last, model=model, optimizer=opt, step=1, config={}, extra={"run_hash": "h"})
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        Path(f).write_bytes(b"PK\x03\x04" + b"\x00" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(NoSpaceError) as e:
        save_training_state(last, model=model, optimizer=opt, step=2, config={}, extra={"run_hash": "h"})
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and str(last) in msg and "no space left on device" in msg
    assert re.search(rf"free of [\d.]+ \w+ on the file system of {re.escape(str(last.parent))}\.", msg)
    assert "rerun" in msg
    assert torch.load(last, weights_only=True)["step"] == 1  # the previous checkpoint is as it was
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_torch_writer_failing_on_a_full_tmpfs_is_reported_as_no_space(tmp_path):
    """A real full file system (a 640 KiB tmpfs; root only): torch's own error ("unexpected pos …") is turned into
    one naming the file, and neither the checkpoint nor the model output leaves a temporary file."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mnt)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        model, opt = _state(300)  # 352 KiB a checkpoint: the first fits, a second beside it does not
        last = mnt / "last.pt"
        save_training_state(last, model=model, optimizer=opt, step=1, config={}, extra={"run_hash": "h"})
        for write in (lambda: save_training_state(last, model=model, optimizer=opt, step=2, config={}),
                      lambda: atomic_torch_save({"model": model.state_dict()}, mnt / "model.pt")):
            with pytest.raises(NoSpaceError, match="no space left on device") as e:
                write()
            assert re.search(rf"free of 640.0 KiB on the file system of {re.escape(str(mnt))}\.", str(e.value))
            assert torch.load(last, weights_only=True)["step"] == 1
            assert sorted(p.name for p in mnt.iterdir()) == ["last.pt"]
    finally:  # lazily: torch's failed writer may still hold its file open (the exception refers to it)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_the_lm_folder_is_written_names_it_and_leaves_no_temp_folder(tmp_path):
    from varup.lm.sft import save_folder
    from varup.lm.toy import build_toy_model, build_toy_tokenizer

    tok = build_toy_tokenizer(TOY_TEMPLATE)
    model = build_toy_model(tok, {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1})

    def full_disk(folder, **kw):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\x00" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    model.save_pretrained = full_disk
    with pytest.raises(NoSpaceError, match=re.escape(f"no space left on device writing {tmp_path / 'model'} (")):
        save_folder(model, tok, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 9: a NaN before the first checkpoint
def _nan_var(monkeypatch, at_call: int) -> None:
    from varup.training import losses

    real, calls = losses.UncertaintyLoss.forward, {"n": 0}

    def poisoned(self, logits, targets):
        calls["n"] += 1
        return real(self, logits * float("nan") if calls["n"] == at_call else logits, targets)

    monkeypatch.setattr(losses.UncertaintyLoss, "forward", poisoned)


def _nan_lm(monkeypatch, at_call: int) -> None:
    """The LM step applies the objective to its head's chunks of trained positions (one chunk per toy step):
    poisoned there, as the image objective is."""
    _nan_var(monkeypatch, at_call)


def _nan_images(at_call: int):
    imgs, calls = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, {"n": 0}

    def get_batch(idx):
        calls["n"] += 1
        return imgs[torch.as_tensor(idx)] * (float("nan") if calls["n"] == at_call else 1.0)

    return get_batch


@pytest.mark.parametrize("trainer", ["var", "lm", "tokenizer"])
@pytest.mark.parametrize("nan_at", [1, 5])
def test_a_nan_says_which_checkpoint_is_kept_or_that_none_was_written(
        assets, corpus, tmp_path, monkeypatch, trainer, nan_at):  # noqa: F811
    if trainer == "var":
        _nan_var(monkeypatch, nan_at)
        run, ckpt, step = (lambda: _var(assets, tmp_path)), tmp_path / "train" / "ckpt" / "last.pt", 4
    elif trainer == "lm":
        _nan_lm(monkeypatch, nan_at)
        run, ckpt, step = (lambda: _lm(corpus, tmp_path)), tmp_path / "train" / "ckpt" / "last.pt", 3
    else:
        get_batch = _nan_images(nan_at)
        run, ckpt, step = (lambda: _tokenizer(tmp_path, get_batch)), tmp_path / "ckpt" / "last.pt", 4
    with pytest.raises(NonFiniteLossError) as e:
        run()
    msg = str(e.value)
    if nan_at == 1:
        assert "no checkpoint was written yet" in msg and not ckpt.exists() and "is kept" not in msg
    else:
        assert f"the last good checkpoint ({ckpt}, step {step}) is kept" in msg
        assert torch.load(ckpt, weights_only=True)["step"] == step
    assert "lower the learning rate" in msg


# ------------------------------------------------------------------------- 9: a killed job's temp files
def test_a_killed_jobs_temp_files_are_swept_when_the_trainer_starts_again(tmp_path, caplog):
    stale = [tmp_path / "ckpt" / ".last.pt.k2x9_q1z.pt.tmp", tmp_path / "ckpt" / ".prev.pt.4242.tmp",
             tmp_path / "ckpt" / ".metrics.jsonl.a1b2c3d4.jsonl.tmp", tmp_path / ".vqvae.pt.zz81abcd.pt.tmp",
             tmp_path / ".summary.json.0abc_def.json.tmp", tmp_path / ".vqvae.pt.prov.json.q1w2e3r4.json.tmp"]
    others = [tmp_path / ".gate.json.a1b2c3d4.json.tmp", tmp_path / "notes.tmp"]  # another job's, not a temp file
    for p in stale + others:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="varup"):
        _tokenizer(tmp_path)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)
    assert all(f"removed {p}: a temporary file left by an interrupted write" in caplog.text for p in stale)
    assert temp_files(tmp_path, tmp_path / "ckpt") == sorted(p.name for p in others)


def test_a_label_outside_the_classes_is_refused_at_load_naming_the_file(assets, tmp_path):  # noqa: F811
    """The model's forward no longer reads the label range of a GPU tensor (a host sync every step): the trainer
    checks the token cache's labels once, when it loads them, and names the file."""
    import numpy as np

    bad = tmp_path / "assets"
    shutil.copytree(assets, bad)
    labels = np.load(bad / "tokens" / "train_labels.npy")
    labels[5] = 4  # 4 classes: 0..3
    np.save(bad / "tokens" / "train_labels.npy", labels)
    with pytest.raises(ValueError, match=r"train_labels\.npy: class label out of range: got \[0, 4\]"):
        run_train(bad, tmp_path / "run", spec(steps=2))
    assert not (tmp_path / "run" / "model.pt").exists()
