"""Training: schedule, parameter groups, data order, resume after a real kill, preemption, non-finite loss."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_vqvae
from varup.base.runtime import EXIT_PREEMPTED, Dist, NonFiniteLossError
from varup.models.checkpoint import load_model
from varup.models.vqvae import split_tokens
from varup.tokenizer.tokens import TokenCache, encode_split, write_meta
from varup.training.loop import BatchOrder, OptimConfig, RunSpec, lr_at, param_groups, train
from varup.training.references import build_references

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny tokenizer, a token cache of 96 random images (4 classes) and the loss references."""
    d = tmp_path_factory.mktemp("assets")
    vae = tiny_vqvae().eval()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    torch.save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, d / "vqvae.pt")
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(96, 3, 16, 16, generator=g) * 2 - 1
    labels = [i % 4 for i in range(96)]
    splits = {"train": encode_split(vae, lambda i, v: imgs[i], labels, d / "tokens", "train", batch_size=32),
              "val": encode_split(vae, lambda i, v: imgs[i], labels, d / "tokens", "val", batch_size=32)}
    write_meta(d / "tokens", vae, splits, ["a", "b", "c", "d"])
    cache = TokenCache(d / "tokens")
    refs = build_references(vae.quantize.embedding.weight.detach(), torch.from_numpy(cache.tokens.astype(np.int64)),
                            vae.patch_nums, num_clusters=8)
    torch.save(refs, d / "refs.pt")
    return d


def spec(steps=12, **optim) -> RunSpec:
    o = dict(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, log_every=2, ckpt_every=4, precision="fp32")
    o.update(optim)
    return RunSpec(model={"depth": 1, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.1, "cond_drop_rate": 0.1},
                   loss={"lambda_2nd": 0.01, "lambda_se": 0.02, "reference": "semantic"}, optim=o, seed=3)


def run_train(assets, out: Path, s: RunSpec, **kw):
    return train(s, tokens_dir=assets / "tokens", tokenizer=assets / "vqvae.pt", references=assets / "refs.pt",
                 out_model=out / "model.pt", work_dir=out / "train", device="cpu", **kw)


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_token_cache_roundtrip(assets):
    c = TokenCache(assets / "tokens", "train")
    assert len(c) == 96 and c.tokens.shape == (96, 30) and c.num_classes == 4 and c.patch_nums == (1, 2, 3, 4)
    assert c.tokens.dtype == np.uint16 and int(c.tokens.max()) < 64
    assert not (assets / "tokens" / ".shards").exists()
    with pytest.raises(KeyError, match="no split 'test'"):
        TokenCache(assets / "tokens", "test")


def test_lin0_schedule():
    c = OptimConfig(steps=101, lr=1.0, warmup_steps=10, warmup_start_ratio=0.1, final_lr_ratio=0.01)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(5, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10, c) == 1.0 and lr_at(13, c) == 1.0  # constant for the first 5% after warm-up
    assert lr_at(100, c) == pytest.approx(0.01)  # last step reaches the final ratio
    assert lr_at(55, c) == pytest.approx(0.01 + 0.99 * (1 - 0.5) / 0.95)
    assert lr_at(50, OptimConfig(steps=101, lr=2.0, lr_schedule="constant")) == 2.0


def test_param_groups_follow_the_official_split():
    from varup.models.var import VAR

    m = VAR(vocab_size=16, z_channels=4, num_classes=2, depth=1, embed_dim=16, num_heads=1, patch_nums=(1, 2))
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.mat_qkv.weight" in dn and "class_emb.weight" in dn and "word_embed.weight" in dn
    assert {"pos_1LC", "pos_start", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "head.bias"} <= nn_
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_batch_order_is_deterministic_and_shards_the_global_batch():
    a, b = BatchOrder(50, 8, seed=1, d=Dist()), BatchOrder(50, 8, seed=1, d=Dist())
    assert all(np.array_equal(a.indices(s), b.indices(s)) for s in range(20))
    epoch0 = np.concatenate([a.indices(s) for s in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no repeats within an epoch (drop last)
    assert not np.array_equal(a.indices(0), a.indices(6))  # a new permutation per epoch
    r0, r1 = BatchOrder(50, 8, 1, Dist(0, 2)), BatchOrder(50, 8, 1, Dist(1, 2))
    assert np.array_equal(np.concatenate([r0.indices(3), r1.indices(3)]), a.indices(3))
    with pytest.raises(ValueError, match="divisible"):
        BatchOrder(50, 7, 1, Dist(0, 2))


def test_training_writes_model_log_and_summary(assets, tmp_path):
    s = run_train(assets, tmp_path, spec())
    m = load_model(tmp_path / "model.pt")
    assert m.depth == 1 and m.num_classes == 4
    lines = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert all(len(r["per_scale"]["ce"]) == 4 for r in lines)
    assert lines[-1]["loss"] == pytest.approx(lines[-1]["ce"] + 0.01 * lines[-1]["l2nd"] + 0.02 * lines[-1]["lse"], rel=1e-5)
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["params"] == m.num_params() and s["global_batch"] == 16
    assert not (tmp_path / "train" / "ckpt" / "last.pt").exists()  # finished runs keep only the model
    assert (tmp_path / "model.pt.prov.json").exists()


def _cli_train(assets, out: Path, s: RunSpec) -> list[str]:
    return [sys.executable, "-m", "varup", "train", "--threads", "1", "--device", "cpu", "--spec", json.dumps(asdict(s)),
            "--tokens", str(assets / "tokens"), "--tokenizer", str(assets / "vqvae.pt"), "--refs",
            str(assets / "refs.pt"), "--out", str(out / "model.pt"), "--work", str(out / "train")]


_TIMING = ("imgs_per_s", "tokens_per_s", "elapsed_s")


def _curve(run: Path) -> list[dict]:
    """The published loss curve without its timing fields."""
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in rows]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before {path} appeared"
        assert time.time() - t0 < timeout, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def test_killed_training_resumes_to_the_same_weights(assets, tmp_path):
    """SIGKILL after the first checkpoint; the rerun resumes and ends with bit-identical weights."""
    s = spec(steps=400, ckpt_every=100, log_every=50)
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli_train(assets, ref, s), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli_train(assets, killed, s), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(killed / "train" / "ckpt" / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").exists()
    resumed = subprocess.run(_cli_train(assets, killed, s), check=True, env=env, capture_output=True, text=True)
    assert "resumed from" in resumed.stderr
    assert same_weights(ref / "model.pt", killed / "model.pt")
    # the whole loss curve survives the kill (it lived beside the checkpoint), without duplicated lines
    assert _curve(killed) == _curve(ref) and [r["step"] for r in _curve(killed)] == list(range(50, 401, 50))


def test_sigterm_checkpoints_exits_75_and_the_retry_finishes_identically(assets, tmp_path):
    s = spec(steps=400, ckpt_every=1000, log_every=50)
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli_train(assets, ref, s), check=True, env=env, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_train(assets, run, s), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "train" / "ckpt" / "metrics.jsonl", proc)  # training has started (the live log)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM" in err and (run / "train" / "ckpt" / "last.pt").exists()
    subprocess.run(_cli_train(assets, run, s), check=True, env=env, capture_output=True)
    assert same_weights(ref / "model.pt", run / "model.pt")
    assert _curve(run) == _curve(ref) and not (run / "train" / "ckpt" / "metrics.jsonl").exists()


def _poison_loss(monkeypatch, at_call: int, then=None) -> None:
    """Make the loss's ``at_call``-th forward see NaN logits (and run ``then`` at that moment)."""
    import varup.training.loop as T

    calls = {"n": 0}
    real_forward = T.UncertaintyLoss.forward

    def poisoned(self, logits, targets):
        calls["n"] += 1
        if calls["n"] == at_call:
            logits = logits * float("nan")
            if then is not None:
                then()
        return real_forward(self, logits, targets)

    monkeypatch.setattr(T.UncertaintyLoss, "forward", poisoned)


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(assets, tmp_path, monkeypatch):
    _poison_loss(monkeypatch, at_call=7)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at or before step 7.*step 4"):
        run_train(assets, tmp_path, spec(nonfinite_check_every=1))
    ckpt = torch.load(tmp_path / "train" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for k, v in ckpt["model"].items() if k != "attn_bias_for_masking")
    assert not (tmp_path / "model.pt").exists()


def test_nan_before_a_sigterm_leaves_the_previous_good_checkpoint(assets, tmp_path, monkeypatch):
    """A NaN at step 6 (checks every 4 steps) and SIGTERM in the same step: the preemption checkpoint checks the
    flag first, so last.pt stays the good step-4 one instead of NaN weights."""
    _poison_loss(monkeypatch, at_call=6, then=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(NonFiniteLossError, match=r"at or before step 6.*step 4"):
        run_train(assets, tmp_path, spec(ckpt_every=4, nonfinite_check_every=4, log_every=100))
    ckpt = torch.load(tmp_path / "train" / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for k, v in ckpt["model"].items() if k != "attn_bias_for_masking")


def test_ckpt_every_must_be_a_multiple_of_the_nonfinite_check():
    with pytest.raises(ValueError, match="ckpt_every.*multiple.*nonfinite_check_every"):
        OptimConfig(ckpt_every=10, nonfinite_check_every=4)
    OptimConfig(ckpt_every=12, nonfinite_check_every=4)


def test_unset_the_finite_loss_check_runs_on_log_and_checkpoint_steps():
    """Unset, the check (a host sync) runs every gcd(log_every, ckpt_every) steps: the log interval where the
    checkpoint interval is a multiple of it (the toy's 25 / 350, the paper's 100 / 2000), never every step."""
    assert OptimConfig(log_every=25, ckpt_every=350).nonfinite_check_every == 25
    assert OptimConfig(log_every=100, ckpt_every=2000).nonfinite_check_every == 100
    assert OptimConfig(log_every=30, ckpt_every=100).nonfinite_check_every == 10  # every log and checkpoint step
    assert OptimConfig(log_every=30, ckpt_every=100, nonfinite_check_every=50).nonfinite_check_every == 50


def test_log_lines_carry_gradient_shares_and_dispersion(assets, tmp_path):
    run_train(assets, tmp_path, spec(steps=4))
    rows = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    # lambda_2nd 0.01, lambda_se 0.02: the weighted share is lambda times the per-unit share
    assert last["gshare_2nd"] == pytest.approx(0.01 * last["gshare_2nd_per_lambda"], rel=1e-6)
    assert last["gshare_se"] == pytest.approx(0.02 * last["gshare_se_per_lambda"], rel=1e-6)
    assert 0 < last["pred_dispersion"] < 1 and 0 < last["pred_entropy"] < np.log(64) + 1e-6
    assert last["ref_dispersion"] is not None and last["ref_entropy"] is not None


def test_checkpoint_of_another_config_is_set_aside(assets, tmp_path):
    run_train(assets, tmp_path, spec(steps=12), stop_after=5)
    assert (tmp_path / "train" / "ckpt" / "last.pt").exists()
    other = spec(steps=12, lr=1e-3)  # e.g. an edited hyper-parameter
    summary = run_train(assets, tmp_path, other)
    assert summary["resumed_from"] == 0
    assert list((tmp_path / "train" / "ckpt").glob("stale-*.pt"))


def test_two_gloo_processes_follow_the_single_process_loss_curve(assets, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch: the same logged losses (global-batch means)
    and the same final weights as one process, up to float reduction order."""
    s = RunSpec(model={"depth": 1, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.0, "cond_drop_rate": 0.0},
                loss={"lambda_2nd": 0.01, "lambda_se": 0.02, "reference": "semantic"},
                optim=dict(steps=10, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1, ckpt_every=5,
                           precision="fp32"), seed=3)
    env = {**os.environ, "VARUP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run(_cli_train(assets, single, s), check=True, env=env, capture_output=True)
    ddp = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "varup"]
    r = subprocess.run(torchrun + _cli_train(assets, ddp, s)[3:], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(x) for x in (single / "train" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (ddp / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 11))  # rank 0 logs once per step
    for x, y in zip(a, b):
        for k in ("loss", "ce", "l2nd", "lse"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    summary = json.loads((ddp / "train" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16
    wa, wb = (torch.load(p / "model.pt", weights_only=True)["model"] for p in (single, ddp))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ every family under DDP, no host sync in a step
CAPTIONS = ["a circle", "a red circle", "a square", "a large blue square", "a circle or a square"]


@pytest.fixture(scope="module")
def captions(assets):
    """A caption table for the 96 training images: two true captions each, drawn 0.7 / 0.3."""
    d = assets / "captions"
    d.mkdir(exist_ok=True)
    n = 96
    ids = np.array([[i % 5, (i + 2) % 5] for i in range(n)], np.int64).reshape(-1)
    np.savez(d / "captions.npz", offsets=np.arange(0, 2 * n + 1, 2, dtype=np.int64), ids=ids,
             weights=np.tile([0.7, 0.3], n))
    (d / "captions.json").write_text(json.dumps({"source": "test", "split": "train", "n_images": n,
                                                 "captions": CAPTIONS, "kinds": ["test"] * 5, "n_modes": [None] * 5}))
    return d


def text_spec(null_condition: str, cond_drop_rate: float, steps=12, **optim) -> RunSpec:
    s = spec(steps, **optim)
    s.model.update(drop_path_rate=0.0, cond_drop_rate=cond_drop_rate)
    s.text = {"encoder": {"kind": "toy", "dim": 16, "width": 16, "max_len": 8}, "null_condition": null_condition}
    return s


def _one_step(model, vae, cond) -> None:
    """One teacher-forced forward and backward in training mode, as the trainer's step."""
    g = torch.Generator().manual_seed(0)
    tok = torch.cat([torch.randint(0, vae.V, (4, pn * pn), generator=g) for pn in vae.patch_nums], 1)
    model.train()
    logits = model(cond, vae.quantize.idxBl_to_var_input(split_tokens(tok, vae.patch_nums)))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok.flatten()).backward()


FAMILIES = {  # name: (model settings, text settings or None, the parameters it must freeze)
    "class": ({}, None, set()),
    "class, no l2-normalised attention": ({"attn_l2_norm": False}, None, set()),
    "text, empty caption": ({}, {"null_condition": "empty_caption"}, {"var.noise.weight"}),
    "text, learned null": ({}, {"null_condition": "learned"}, set()),
    "text, learned null without caption dropout": ({"cond_drop_rate": 0.0}, {"null_condition": "learned"},
                                                   {"var.noise.weight"}),
    "text, 2-layer toy encoder": ({}, {"null_condition": "learned", "depth": 2}, set()),
    "text, frozen table (CLIP), empty caption": ({}, {"null_condition": "empty_caption", "table": True},
                                                 {"var.noise.weight"}),
    "text, frozen table (CLIP), learned null": ({}, {"null_condition": "learned", "table": True}, set()),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_of_each_family_leaves_no_trainable_parameter_without_a_gradient(assets, captions, family):
    """DDP without find_unused_parameters needs a gradient for every trainable parameter in every step; what a
    configuration never uses is frozen (and still saved: VAR-CLIP's weights have noise.weight)."""
    from varup.data.captions import CaptionTable
    from varup.models.textvar import CaptionedVAR
    from varup.models.vqvae import load_vqvae
    from varup.training.loop import build_captioned, build_model, params_without_grad

    settings, text, frozen = FAMILIES[family]
    vae = load_vqvae(assets / "vqvae.pt")
    s = spec()
    s.model.update(settings)
    if text is None:
        model, cond = build_model(s, vae, 4), torch.tensor([0, 1, 2, 3])
    elif text.get("table"):
        var = build_model(s, vae, 1, 16)
        model = CaptionedVAR(var, CAPTIONS, table=torch.randn(5, 16), empty=torch.randn(16),
                             null_condition=text["null_condition"])
        cond = torch.tensor([0, 4, 2, 1])
    else:
        s.text = {"encoder": {"kind": "toy", "dim": 16, "width": 16, "depth": text.get("depth", 0)},
                  "null_condition": text["null_condition"]}
        model, cond = build_captioned(s, vae, CaptionTable(captions)), torch.tensor([0, 4, 2, 1])
    _one_step(model, vae, cond)
    assert params_without_grad(model) == []
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    if text is not None:
        assert "noise.weight" in model.var.state_dict()


def test_the_trainer_refuses_a_trainable_parameter_without_a_gradient(assets, captions, tmp_path, monkeypatch):
    """The learned null caption left trainable in an empty-caption run (as it was): the first step names it, before
    DDP's 'Expected to have finished reduction' at the second step (and the ranks' unsynchronised first update)."""
    from varup.models.textvar import CaptionedVAR

    monkeypatch.setattr(CaptionedVAR, "trains_learned_null", property(lambda self: True))
    with pytest.raises(RuntimeError, match=r"\['var\.noise\.weight'\] got no gradient in this run's first step"):
        run_train(assets, tmp_path, text_spec("empty_caption", 0.1, steps=4), captions=captions)


def test_freezing_the_unused_null_changes_no_weight(assets, captions, tmp_path, monkeypatch):
    """AdamW skipped the learned null caption before (no gradient): frozen now, the single-process run of an
    empty-caption spec ends with bit-identical weights to one where it stays trainable, as the code had it."""
    import varup.training.loop as T
    from varup.models.textvar import CaptionedVAR

    s = text_spec("empty_caption", 0.5, steps=6)
    run_train(assets, tmp_path / "frozen", s, captions=captions)
    monkeypatch.setattr(CaptionedVAR, "trains_learned_null", property(lambda self: True))
    monkeypatch.setattr(T, "check_all_trained", lambda model: None)
    run_train(assets, tmp_path / "as_before", s, captions=captions)
    assert same_weights(tmp_path / "frozen" / "model.pt", tmp_path / "as_before" / "model.pt")
    a, b = (torch.load(tmp_path / r / "model.pt", weights_only=True)["text"]["encoder"]["state"]
            for r in ("frozen", "as_before"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the toy encoder trained with it: equal too


def test_ddp_broadcasts_no_buffers_per_step_and_every_buffer_is_a_constant(assets, captions, tmp_path):
    """DDP is built with forward_sync_buffers / broadcast_buffers off and gradients as bucket views. That is safe
    because no buffer of any family changes in training: after a run, each equals a freshly built model's."""
    import torch.distributed as dist

    from varup.base.runtime import wrap_ddp
    from varup.data.captions import CaptionTable
    from varup.models.vqvae import load_vqvae
    from varup.training.loop import build_captioned, build_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert ddp.broadcast_buffers is False and ddp.gradient_as_bucket_view is True
    finally:
        dist.destroy_process_group()
    vae = load_vqvae(assets / "vqvae.pt")
    for name, s, fresh in [("class", spec(steps=4), build_model(spec(), vae, 4)),
                           ("text", text_spec("learned", 0.5, steps=4),
                            build_captioned(text_spec("learned", 0.5), vae, CaptionTable(captions)))]:
        run_train(assets, tmp_path / name, s, captions=captions if name == "text" else None)
        saved = torch.load(tmp_path / name / "model.pt", weights_only=True)["model"]
        buffers = dict(fresh.named_buffers())
        persistent = {k.removeprefix("var."): v for k, v in buffers.items() if k.removeprefix("var.") in saved}
        assert {k for k in buffers if k.removeprefix("var.") not in persistent} <= {"caption_ids"}  # non-persistent:
        assert all(torch.equal(saved[k], v) for k, v in persistent.items()), name  # the caption table's word ids
        assert {k.rsplit(".", 1)[-1] for k in persistent} == {"lvl_1L", "attn_bias_for_masking", "zero_k_bias"}


@pytest.mark.parametrize("family", ["class", "text"])
def test_a_training_step_makes_no_host_sync_except_on_log_and_check_steps(assets, captions, tmp_path, monkeypatch,
                                                                          family):
    """12 steps, log every 4, checkpoint every 8 (the finite-loss check unset: every 4): varup reads no tensor on
    the host inside a step, and after one only on steps 4, 8 and 12 (on a GPU each read is a device sync)."""
    from syncprobe import SyncProbe

    probe = SyncProbe().install(monkeypatch.setattr)
    s = spec(steps=12, log_every=4, ckpt_every=8) if family == "class" else text_spec("learned", 0.5, log_every=4,
                                                                                         ckpt_every=8)
    run_train(assets, tmp_path, s, captions=captions if family == "text" else None)
    monkeypatch.undo()
    syncs = probe.steps_with_syncs()
    assert "in_step" not in syncs, [e for e in probe.events if e[0] == "in_step"][:5]
    assert syncs["after_step"] == {4, 8, 12}, [e for e in probe.events if e[0] == "after_step"][:10]


def _initial_weights(assets, s: RunSpec, captions) -> dict:
    """The text generator's weights before the first step (as the trainer builds and initialises them)."""
    from varup.data.captions import CaptionTable
    from varup.models.vqvae import load_vqvae
    from varup.training.loop import build_captioned

    oc = OptimConfig(**s.optim)
    vae = load_vqvae(assets / "vqvae.pt")
    torch.manual_seed(s.seed)
    m = build_captioned(s, vae, CaptionTable(captions))
    m.var.init_weights(oc.init_adaln, oc.init_adaln_gamma, oc.init_head, oc.init_std)
    return m.var.state_dict()


@pytest.mark.parametrize("null_condition, cond_drop_rate", [("empty_caption", 0.0), ("learned", 1.0)])
def test_text_runs_train_under_two_gloo_processes_to_the_single_process_weights(assets, captions, tmp_path,
                                                                                null_condition, cond_drop_rate):
    """torchrun with 2 CPU processes (gloo), the same global batch: the same logged losses and final weights as one
    process (the empty-caption run crashed at step 2: its learned null got no gradient). Caption dropout 1.0 trains
    the learned null in every step, deterministically (per-rank random streams differ from one process's). Each
    rank is probed: no host read and no collective inside a step, and after one only on check steps (4, 8, 12)."""
    s = text_spec(null_condition, cond_drop_rate, steps=12, log_every=4, ckpt_every=8)
    run_train(assets, tmp_path / "single", s, captions=captions)
    env = {**os.environ, "VARUP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "tests" / "syncprobe.py"), str(tmp_path / "probe")]
    args = _cli_train(assets, tmp_path / "ddp", s)[3:] + ["--captions", str(captions)]
    r = subprocess.run(torchrun + args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (_curve(tmp_path / run) for run in ("single", "ddp"))
    assert [x["step"] for x in a] == [x["step"] for x in b] == [4, 8, 12]
    for x, y in zip(a, b):
        for k in ("loss", "ce", "l2nd", "lse"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    wa, wb = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("single", "ddp"))
    for k in wa["model"]:
        torch.testing.assert_close(wa["model"][k], wb["model"][k], rtol=1e-4, atol=1e-5)
    for k, v in wa["text"]["encoder"]["state"].items():
        torch.testing.assert_close(v, wb["text"]["encoder"]["state"][k], rtol=1e-4, atol=1e-5)
    trained = not torch.equal(wa["model"]["noise.weight"], _initial_weights(assets, s, captions)["noise.weight"])
    assert trained == (null_condition == "learned")  # the learned null trained; the unused one stayed frozen
    for rank in (0, 1):
        events = json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text())
        assert not [e for e in events if e[0] == "in_step"], events[:5]
        assert {e[1] for e in events if e[0] == "after_step"} == {4, 8, 12}


def test_a_checkpoint_that_trained_the_unused_null_is_refused_naming_the_file(assets, captions, tmp_path,
                                                                              monkeypatch):
    """A text run checkpointed by the code as it was (the unused learned null trainable, in the optimizer) cannot
    be resumed by a run that freezes it: the error names the checkpoint and says to delete it (not torch's
    'loaded state dict contains a parameter group that doesn't match')."""
    import varup.training.loop as T
    from varup.models.textvar import CaptionedVAR

    s = text_spec("empty_caption", 0.1, steps=12)
    with monkeypatch.context() as m:
        m.setattr(CaptionedVAR, "trains_learned_null", property(lambda self: True))
        m.setattr(T, "check_all_trained", lambda model: None)
        run_train(assets, tmp_path, s, captions=captions, stop_after=5)
    ckpt = tmp_path / "train" / "ckpt" / "last.pt"
    with pytest.raises(RuntimeError, match=rf"^{ckpt}: its optimizer state does not fit.*delete it"):
        run_train(assets, tmp_path, s, captions=captions)


def test_snapshots_keep_the_weights_of_their_step_and_survive_a_resume(assets, tmp_path):
    """The claim study's kept steps: a snapshot loads as a model, differs from the final weights, and a run stopped
    before it and resumed writes the same snapshot as an uninterrupted run."""
    s = spec(steps=8, snapshots=[4, 8])  # step 8 is the model itself: no snapshot of it
    run_train(assets, tmp_path / "ref", s)
    snap = tmp_path / "ref" / "train" / "snapshots" / "step4.pt"
    assert sorted(p.name for p in snap.parent.iterdir()) == ["step4.pt"]
    assert load_model(snap).depth == 1 and torch.load(snap, weights_only=True)["step"] == 4
    assert not same_weights(snap, tmp_path / "ref" / "model.pt")
    assert run_train(assets, tmp_path / "cut", s, stop_after=2) == {"stopped_at": 2}
    run_train(assets, tmp_path / "cut", s)
    assert same_weights(snap, tmp_path / "cut" / "train" / "snapshots" / "step4.pt")
    assert same_weights(tmp_path / "ref" / "model.pt", tmp_path / "cut" / "model.pt")
