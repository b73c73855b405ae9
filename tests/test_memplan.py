"""Memory that fits by construction: gradient accumulation (train.micro_batch), activation checkpointing, and the
memory plan (varup.training.memplan, varup plan-memory)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from test_train import assets  # noqa: F401  (the tiny tokenizer, token cache and references)
from varup.cli import main as cli_main
from varup.models.var import VAR, VARConfig
from varup.training.loop import RunSpec, train
from varup.training.losses import LossConfig, UncertaintyLoss
from varup.training.memplan import choose_micro_batch, fits, plan_step, tensor_bytes, track_live_bytes

REPO = Path(__file__).resolve().parents[1]


def _run(assets, out: Path, **optim) -> tuple[dict, list[dict]]:  # noqa: F811
    # class dropout and DropPath off: a split batch draws their masks in another order (statistically the same)
    o = dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, ckpt_every=4, precision="fp32")
    o.update(optim)
    s = RunSpec(model={"depth": 2, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.0, "cond_drop_rate": 0.0},
                loss={"lambda_2nd": 0.5, "lambda_se": 0.2, "reference": "semantic", "l2nd_reduction": "image_sum"},
                optim=o, seed=1)
    train(s, tokens_dir=assets / "tokens", tokenizer=assets / "vqvae.pt", references=assets / "refs.pt",
          out_model=out / "model.pt", work_dir=out / "train", device="cpu")
    curve = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return torch.load(out / "model.pt", weights_only=True)["model"], curve


@pytest.mark.parametrize("micro", [2, 4])
def test_micro_batches_train_like_the_whole_batch(assets, tmp_path, micro):  # noqa: F811
    whole, c_whole = _run(assets, tmp_path / "whole")
    split, c_split = _run(assets, tmp_path / f"m{micro}", micro_batch=micro)
    assert whole.keys() == split.keys()
    for k in whole:
        assert torch.allclose(whole[k], split[k], atol=1e-5, rtol=1e-5), k
    for a, b in zip(c_whole, c_split, strict=True):
        for key in ("loss", "ce", "l2nd", "lse", "grad_norm", "acc_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert a["per_scale"]["l2nd"] == pytest.approx(b["per_scale"]["l2nd"], rel=1e-5, abs=1e-9)
    assert c_whole[0]["l2nd"] > 0 and c_whole[0]["lse"] > 0  # the full objective, not CE alone


def test_activation_checkpointing_gives_equal_gradients_with_droppath():
    pn = (1, 2, 3, 4)
    L = sum(p * p for p in pn)

    def grads(ckpt: bool):
        torch.manual_seed(0)
        m = VAR(VARConfig(vocab_size=64, z_channels=8, num_classes=4, depth=3, embed_dim=32, num_heads=2,
                          patch_nums=pn, drop_path_rate=0.5, drop_rate=0.2)).train()
        m.activation_checkpointing = ckpt
        g = torch.Generator().manual_seed(1)
        x, lab = torch.randn(6, L - 1, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
        tok = torch.randint(0, 64, (6, L), generator=g)
        torch.manual_seed(7)  # the same DropPath/dropout/class-dropout draws in the forward
        with track_live_bytes() as t:
            logits = m(lab, x)
        kept = t.live  # what the forward keeps for the backward
        UncertaintyLoss(LossConfig(), pn)(logits, tok).total.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}, kept

    (plain, kept_plain), (ckpt, kept_ckpt) = grads(False), grads(True)
    assert kept_ckpt < 0.6 * kept_plain  # the blocks really were checkpointed
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5), n
    assert any(p.abs().sum() > 0 for p in plain.values())


def _measured_peak(depth, B, C, heads, pn, V, ckpt=False) -> int:
    torch.manual_seed(0)
    m = VAR(VARConfig(vocab_size=V, z_channels=8, num_classes=10, depth=depth, embed_dim=C, num_heads=heads,
                      patch_nums=pn)).train()
    m.activation_checkpointing = ckpt
    L = sum(p * p for p in pn)
    lf, opt = UncertaintyLoss(LossConfig(), pn), torch.optim.AdamW(m.parameters(), lr=1e-4)
    x, lab, tok = torch.randn(B, L - 1, 8), torch.randint(0, 10, (B,)), torch.randint(0, V, (B, L))

    def step():
        opt.zero_grad(set_to_none=False)  # as under DDP: the gradients stay between steps
        lf(m(lab, x), tok).total.backward()
        opt.step()

    step()  # AdamW's state exists from here on: the steady state
    state = [*m.parameters(), *(p.grad for p in m.parameters()), *(t for s in opt.state.values() for t in s.values())]
    with track_live_bytes() as t:
        step()
    return tensor_bytes(state) + t.peak


@pytest.mark.parametrize("depth,B,C,heads,ckpt", [(2, 8, 128, 4, False), (3, 8, 192, 6, False), (2, 4, 256, 4, False),
                                                  (3, 8, 192, 6, True)])
def test_the_plan_matches_the_measured_cpu_peak(depth, B, C, heads, ckpt):
    pn, V = (1, 2, 3, 4, 6, 8), 512
    measured = _measured_peak(depth, B, C, heads, pn, V, ckpt)
    est = plan_step(depth, B, precision="fp32", patch_nums=pn, vocab=V, width=C, heads=heads, z_channels=8,
                    num_classes=10, device="cpu", activation_checkpointing=ckpt)["peak"]
    assert 0.97 * measured <= est <= 1.25 * measured, (est / measured)


def test_checkpointing_and_micro_batches_lower_the_plan():
    full = plan_step(20, 96)["peak"]
    assert plan_step(20, 96, micro_batch=24)["peak"] < full
    assert plan_step(20, 96, activation_checkpointing=True)["peak"] < 0.5 * full


def test_auto_picks_the_largest_fitting_micro_batch():
    m = choose_micro_batch(20, 96, 80)
    assert m is not None and 96 % m == 0
    assert fits(plan_step(20, 96, micro_batch=m)["peak"], 80)
    bigger = [d for d in range(m + 1, 97) if 96 % d == 0]
    assert all(not fits(plan_step(20, 96, micro_batch=d)["peak"], 80) for d in bigger)
    assert choose_micro_batch(20, 96, 4) is None  # weights and optimizer alone are over 4 GB


def test_plan_memory_of_the_paper_config_fits_80gb(capsys):
    assert cli_main(["plan-memory", "--configfile", str(REPO / "config" / "paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "imagenet100/d20" in out and "NO" not in out


def test_plan_memory_names_a_run_that_cannot_fit(tmp_path, capsys):
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cfg["datasets"]["imagenet100"]["train"] = {"batch_size": 768}  # 96 images per GPU at once
    f = tmp_path / "big.yaml"
    f.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        cli_main(["plan-memory", "--configfile", str(f)])
    assert e.value.code == 1
    assert "run imagenet100/d20/baseline/seed0" in capsys.readouterr().err
