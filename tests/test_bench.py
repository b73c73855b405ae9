"""Benchmarks: the FLOP counter against torch's FlopCounterMode, the CLI (`all` → JSON + Markdown), the Markdown
upsert. No timing is asserted here: speed targets live in the benchmark output only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_vqvae
from varup.base.seeding import make_generator
from varup.bench import flops
from varup.bench import suite as bench
from varup.models.var import VAR, VARConfig
from varup.sampling.sampler import sample

PN = (1, 2, 3, 4)


def _var(depth=2, width=64, heads=2, vocab=64, z=8, pn=PN) -> VAR:
    torch.manual_seed(0)
    return VAR(VARConfig(vocab_size=vocab, z_channels=z, num_classes=5, depth=depth, embed_dim=width, num_heads=heads,
                         patch_nums=pn)).init_weights(init_adaln_gamma=0.5)


def _count(fn) -> dict[str, int]:
    """FlopCounterMode counts by op. SDPA is forced to the math backend: on CPU the fused kernel
    (_scaled_dot_product_flash_attention_for_cpu) has no FLOP formula and would count 0, while the math backend
    runs the two products as bmm/matmul, over the dense L×L score matrix (the block-causal mask is additive)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    counts = {str(k).split(".")[-1]: int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    counts["total"] = int(fc.get_total_flops())
    return counts


@pytest.mark.parametrize("depth,width,heads,pn,vocab", [(2, 64, 2, PN, 64), (3, 96, 3, (1, 2, 4), 50),
                                                        (1, 32, 1, (1, 2, 3, 4, 5), 128)])
def test_var_forward_flops_match_flop_counter(depth, width, heads, pn, vocab):
    m = _var(depth, width, heads, vocab, 8, pn).eval()
    B, L = 3, sum(p * p for p in pn)
    x, lab = torch.randn(B, L - 1, 8), torch.randint(0, 5, (B,))
    c = _count(lambda: m(lab, x))
    dense = flops.var_forward_breakdown(depth, B, pn, vocab, 8, width, heads, attention="dense")
    causal = flops.var_forward_breakdown(depth, B, pn, vocab, 8, width, heads)
    # every linear layer is one addmm: exactly the analytic count without attention
    assert c["addmm"] == dense["total"] - dense["attention"] == causal["total"] - causal["attention"]
    # the attention products over the dense (masked) L×L scores
    assert c["bmm"] == dense["attention"]
    assert c["total"] == dense["total"] == flops.var_forward_flops(depth, B, pn, vocab, 8, width, heads, attention="dense")
    # the model count keeps only the block-causal pairs: the mask's -inf half of the scores is wasted work
    assert causal["attention"] * L * L == dense["attention"] * flops.block_causal_pairs(pn)
    assert causal["total"] < dense["total"]


def test_var_train_flops_are_three_forwards():
    m = _var().train()
    B, L = 2, sum(p * p for p in PN)
    x, lab = torch.randn(B, L - 1, 8), torch.randint(0, 5, (B,))
    c = _count(lambda: m(lab, x).sum().backward())
    fwd = flops.var_forward_flops(2, B, PN, 64, 8, 64, 2, attention="dense")
    word_embed_dgrad = 2 * B * (L - 1) * 8 * 64  # its input (teacher forcing) needs no gradient
    assert c["total"] == 3 * fwd - word_embed_dgrad
    assert flops.var_train_flops(2, B, PN, 64, 8, 64, 2, attention="dense") == 3 * fwd
    assert abs(c["total"] / (3 * fwd) - 1) < 0.01


def test_sampling_flops_match_flop_counter():
    var, vae = _var(vocab=64, z=8), tiny_vqvae()  # tiny_vqvae: V 64, Cvae 8, patch_nums (1, 2, 3, 4)
    var.eval()
    B = 3
    c = _count(lambda: sample(var, vae, torch.arange(B) % 5, cfg=1.5, top_k=20, top_p=0.9,
                              generator=make_generator(0, "cpu"), decode=False))
    exp = flops.var_sampling_breakdown(2, B, PN, 64, 8, 64, 2, cfg=True)
    phi = flops.quantizer_sampling_flops(B, PN, 8)
    assert c["convolution"] == phi  # the Phi convs that accumulate f_hat
    assert c["bmm"] == exp["attention"]  # KV cache: the new tokens attend to exactly the cached + current ones
    # the linears are addmm; word_embed sees a transposed (non-contiguous) map, so it runs as mm + bias add
    assert c["addmm"] + c.get("mm", 0) == exp["total"] - exp["attention"]
    assert c["total"] == exp["total"] + phi == flops.var_sampling_flops(2, B, PN, 64, cfg=True, z_channels=8,
                                                                         width=64, heads=2) + phi
    # without CFG every row-proportional term halves (word_embed already runs on B rows)
    half = flops.var_sampling_breakdown(2, B, PN, 64, 8, 64, 2, cfg=False)
    assert 2 * (half["total"] - half["word_embed"]) == exp["total"] - exp["word_embed"]


@pytest.mark.parametrize("kw", [{}, {"using_sa": False, "using_mid_sa": False, "ch_mult": (1, 2)},
                                {"num_res_blocks": 2, "ch": 16}])
def test_vqvae_flops_match_flop_counter(kw):
    vae = tiny_vqvae(**kw).freeze()
    cfg, B = vae.cfg, 2
    side = cfg.patch_nums[-1]
    c = _count(lambda: vae.fhat_to_img(torch.randn(B, cfg.z_channels, side, side)))
    assert c["total"] == flops.vqvae_decode_flops(cfg, B)
    img = torch.rand(B, 3, cfg.resolution, cfg.resolution) * 2 - 1
    c = _count(lambda: vae.img_to_idxBl(img))
    # the nearest-code search is an in-place addmm_ (distance update), for which FlopCounterMode has no formula
    nearest = sum(2 * B * p * p * cfg.vocab_size * cfg.z_channels for p in cfg.patch_nums)
    assert c["total"] + nearest == flops.vqvae_encode_flops(cfg, B)


def test_official_sizes_are_sane():
    # the per-token linears of the official layout (d4 here: fast to build) cost 2·params·L, the rest is
    # attention, the per-sample AdaLN linears and word_embed skipping the first (class) token
    m = VAR(VARConfig(depth=4))
    L, f = 680, flops.var_forward_breakdown(4, 1)
    per_token = sum(p.numel() for n, p in m.named_parameters()
                    if n.endswith("weight") and any(k in n for k in ("mat_qkv", "proj", "fc1", "fc2", "head.", "word_embed")))
    ada = sum(p.numel() for n, p in m.named_parameters() if "ada_lin" in n and n.endswith("weight"))
    assert f["ada_lin"] + f["head_ada_lin"] == 2 * ada
    assert f["total"] - f["attention"] - 2 * ada == 2 * per_token * L - 2 * 1 * 32 * m.C
    assert flops.var_train_flops(16, 64) == 3 * flops.var_forward_flops(16, 64)
    assert flops.var_sampling_flops(16, 2) == 2 * flops.var_sampling_flops(16, 1)
    assert flops.vqvae_decode_flops(batch=4) == 4 * flops.vqvae_decode_flops(batch=1) > 0


def test_the_official_recipe_scales_fp16_gradients_and_the_compile_backend_can_be_named():
    # the GradScaler path of plain mode on a CPU (fp16 autocast is CUDA's official recipe; CPU autocast has fp16 too)
    dev = torch.device("cpu")
    m = _var(depth=1, width=32, heads=2, vocab=64, z=8).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**11, growth_interval=1000)
    quant, feed = bench._train_feed(None, dev, 2, 64, 8, PN)
    lf = bench.UncertaintyLoss(bench.LossConfig(), PN, bench.benchmark_references(64, 4))
    seen = []
    step = bench._train_step(m, m, opt, lf, torch.tensor([0, 1]), quant, feed, dev, None, 2.0, scaler, seen.append)
    before = [p.detach().clone() for p in m.parameters()]
    step()
    assert len(seen) == 1 and torch.isfinite(seen[0]) and scaler.get_scale() == 2.0**11
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))  # the scaled step updated the weights
    assert bench.official_recipe(torch.device("cuda"))["precision"] == "fp16"
    assert bench.official_recipe(dev)["precision"] == "fp32"
    r = bench.train_benchmark(1, 2, patch_nums=PN, vocab=64, num_classes=5, device="cpu", compile="eager", warmup=1,
                              repeats=1, peak=1.0)
    assert r["mode"] == "compile" and r["compile"] and r["loss_ce_only"] > 0


# ------------------------------------------------------------------------------------------------ CLI
TINY = ["--depth", "1", "--batch", "2", "--patch-nums", "1,2,3,4", "--vocab", "64", "--num-classes", "10",
        "--sample-batch", "2", "--encode-batch", "2", "--repeats", "1", "--warmup", "1", "--matmul-size", "128",
        "--copy-mib", "4", "--threads", "1", "--device", "cpu"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "varup.bench.suite", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _table(md: str) -> list[dict[str, str]]:
    return bench._parse_markdown_rows(md)


@pytest.mark.timeout(300)
def test_cli_all_writes_json_and_markdown_and_updates_rows(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    r = _run(["all", *TINY, "--json", str(out), "--markdown", str(md)], tmp_path)
    # the summary table comes last
    tail = r.stdout.strip().splitlines()
    assert tail[-1].startswith("encode") and any(ln.startswith("Benchmark") for ln in tail[-12:])
    res = json.loads(out.read_text())
    assert {"env", "ceilings", "train", "sample", "encode"} <= set(res)
    assert res["ceilings"]["matmul_tflops"]["fp32"] > 0 and res["ceilings"]["copy_gbps"] > 0
    fast, plain = res["train"]
    assert fast["mode"] == "fast" and plain["mode"] == "plain" and plain["precision"] == "fp32"
    # plain is the official recipe: on CPU fp32 without a GradScaler (fp16 + GradScaler + TF32 on CUDA)
    assert plain["recipe"].startswith("official") and plain["grad_scaler"] is False and fast["recipe"] == "varup"
    assert all(torch.isfinite(torch.tensor(t[f"loss_{k}"])) for t in (fast, plain) for k in ("ce_only", "full_objective"))
    for t in (fast, plain):
        assert t["ce_only_s"] > 0 and t["full_objective_s"] > 0 and t["mfu_ce"] > 0 and t["ce_only_peak_mem_gb"] > 0
        assert t["model_tflop_per_step"] * 1e12 == pytest.approx(flops.var_train_flops(1, 2, PN, 64))
    assert plain["plain_vs_fast_ce_only"] > 0
    assert res["sample"]["imgs_per_s"] > 0 and res["sample"]["top_k"] == 64
    assert res["encode"]["imgs_per_s"] > 0
    text = md.read_text()
    assert bench.MARKDOWN_COMMAND in text.splitlines()[2] and "do not edit by hand" in text
    rows = _table(text)
    assert len(rows) == 2 + 4 + 1 + 1  # matmul, copy; ce, full, plain ce, plain full; sample; encode
    for row in rows:
        assert row["Device"].startswith("CPU") and row["Torch"] == torch.__version__
        assert row["Date (UTC)"][:2] == "20" and row["Benchmark"] in ("ceilings", "train", "sample", "encode")
    assert {row["Batch"] for row in rows if row["Benchmark"] != "ceilings"} == {"2"}
    keys = [tuple(row[k] for k in bench.KEY_COLUMNS) for row in rows]
    assert len(set(keys)) == len(keys)

    # a second run (here: encode only, with another row key added by a foreign machine in between) updates its
    # row in place and keeps every other row
    foreign = dict(rows[0], Device="NVIDIA H100 80GB HBM3", Torch="2.11.0")
    md.write_text(bench.markdown_document(rows + [foreign]))
    _run(["encode", "--batch", "2", "--patch-nums", "1,2,3,4", "--vocab", "64", "--repeats", "1", "--warmup", "0",
          "--threads", "1", "--device", "cpu", "--peak-tflops", "1", "--markdown", str(md)], tmp_path)
    rows2 = _table(md.read_text())
    keys2 = [tuple(row[k] for k in bench.KEY_COLUMNS) for row in rows2]
    assert keys2 == keys + [tuple(foreign[k] for k in bench.KEY_COLUMNS)]
    enc = [row for row in rows2 if row["Benchmark"] == "encode"]
    assert len(enc) == 1 and enc[0]["MFU"] != [row for row in rows if row["Benchmark"] == "encode"][0]["MFU"]


def test_markdown_upsert_keys(tmp_path):
    md = tmp_path / "B.md"
    env = {"device": "cpu", "device_name": "CPU X", "torch": "2.5.0", "date_utc": "2025-01-01 00:00"}
    res = {"env": env, "encode": {"benchmark": "encode", "mode": "small", **env, "depth": None, "batch": 4,
                                  "precision": "fp32", "encode_s": 1.0, "imgs_per_s": 4.0, "tflops": 0.1, "mfu": 0.5,
                                  "peak_mem_gb": 1.0, "resolution": 32, "params_m": 1.0}}
    bench.update_markdown(md, res)
    res["encode"].update(encode_s=0.5, imgs_per_s=8.0, date_utc="2025-01-02 00:00")
    bench.update_markdown(md, res)
    rows = _table(md.read_text())
    assert len(rows) == 1 and rows[0]["Throughput"] == "8 img/s" and rows[0]["Date (UTC)"] == "2025-01-02 00:00"
    res["encode"].update(batch=8)  # another key: appended
    bench.update_markdown(md, res)
    rows = _table(md.read_text())
    assert [r["Batch"] for r in rows] == ["4", "8"]
    res["encode"].update(torch="2.11.0")
    bench.update_markdown(md, res)
    assert len(_table(md.read_text())) == 3


def test_step_cli_keeps_its_output(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench.main(["step", "--depth", "1", "--batch", "2", "--patch-nums", "1,2,3", "--vocab", "32",
                       "--repeats", "1", "--warmup", "1", "--device", "cpu", "--peak-tflops", "1",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for k in ("depth", "batch", "params_m", "tokens", "vocab", "device", "precision", "torch", "ce_only_s",
              "full_objective_s", "ratio_full_vs_ce", "imgs_per_s_ce"):
        assert k in r
    assert r["tokens"] == 14 and r["ratio_full_vs_ce"] > 0
    assert "ratio_full_vs_ce" in capsys.readouterr().out


def test_targets_are_printed_beside_cuda_figures(tmp_path, capsys):
    env = {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "date_utc": "2026-01-01 00:00"}
    train = {"benchmark": "train", "mode": "fast", **env, "depth": 16, "batch": 64, "precision": "bf16",
             "ratio_full_vs_ce": 1.02, "peak_tflops": 700.0}
    for short, name, mfu in (("ce", "ce_only", 0.5), ("full", "full_objective", 0.44)):
        train.update({f"{name}_s": 0.1, f"imgs_per_s_{short}": 640.0, f"tokens_per_s_{short}": 435200.0,
                      f"tflops_{short}": mfu * 700, f"mfu_{short}": mfu, f"{name}_peak_mem_gb": 30.0})
    smp = {"benchmark": "sample", "mode": "cfg", **env, "depth": 16, "batch": 256, "precision": "bf16", "cfg": 1.5,
           "top_k": 900, "top_p": 0.95, "vae": "official", "resolution": 256, "sample_s": 0.5, "imgs_per_s": 512.0,
           "tflops": 300.0, "mfu": 0.43, "peak_mem_gb": 40.0}
    res = {"env": env, "train": [train], "sample": smp}
    bench.print_table(res)
    out = capsys.readouterr().out
    assert "Target" in out and "MFU >= 45% (d16 b64): met" in out and "full/CE <= 1.05: met" in out
    assert ">= 400 img/s at b >= 256 (d16): met" in out and "NOT met" in out  # the full objective's 44 % MFU
    rows = bench.update_markdown(tmp_path / "B.md", res)
    assert [r["Mode"] for r in rows] == ["ce", "full", "cfg"] and rows[0]["Target"].endswith("met")
