"""The sampler: KV-cache equivalence with teacher forcing, determinism, top-k/top-p, masks, MC-dropout."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_var, tiny_vqvae
from varup.base.seeding import make_generator
from varup.sampling.sampler import box_mask, edit_masks, mc_dropout, sample, top_k_top_p_filter_

PN = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def models():
    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    var = tiny_var().eval()
    return vae, var


@torch.no_grad()
def test_kv_cache_logits_equal_teacher_forced_logits_for_both_cfg_halves(models):
    vae, var = models
    B = 3
    labels = torch.tensor([0, 2, 4])
    tokens = [torch.randint(0, 64, (B, pn * pn)) for pn in PN]
    force = [torch.ones(B, pn * pn, dtype=torch.bool) for pn in PN]
    out = sample(var, vae, labels, cfg=2.0, generator=make_generator(0, "cpu"), teacher_tokens=tokens,
                 force_masks=force, return_raw_logits=True)
    for a, b in zip(out.tokens, tokens):
        assert torch.equal(a, b)
    x = vae.idxBl_to_var_input(tokens)
    tf = var(torch.cat([labels, torch.full((B,), 5)]), x.repeat(2, 1, 1))  # (2B, L, V)
    for si, (a, b) in enumerate(var.begin_ends):
        torch.testing.assert_close(out.raw_logits[si], tf[:, a:b], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_same_seed_same_samples_different_seed_different(models):
    vae, var = models
    labels = torch.tensor([1, 1, 3, 0])
    kw = dict(cfg=1.5, top_k=20, top_p=0.95)
    a = sample(var, vae, labels, generator=make_generator(123, "cpu"), **kw)
    b = sample(var, vae, labels, generator=make_generator(123, "cpu"), **kw)
    c = sample(var, vae, labels, generator=make_generator(124, "cpu"), **kw)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (4, 3, 16, 16) and 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    smooth = sample(var, vae, labels, generator=make_generator(123, "cpu"), more_smooth=True, **kw)
    again = sample(var, vae, labels, generator=make_generator(123, "cpu"), more_smooth=True, **kw)
    assert torch.equal(smooth.images, again.images) and not torch.equal(smooth.images, a.images)


def test_top_k_top_p_semantics():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50)
    logits[0, 0, :3] = 5.0  # a tie at the k-th value is kept
    k, p = 5, 0.8
    out = top_k_top_p_filter_(logits.clone(), top_k=k, top_p=p)
    for b in range(2):
        for t in range(3):
            row = logits[b, t]
            kth = row.topk(k).values.min()
            keep_k = row >= kth
            masked = torch.where(keep_k, row, torch.tensor(-torch.inf))
            probs = masked.softmax(-1)
            order = probs.argsort()  # ascending
            cum = probs[order].cumsum(0)
            remove = cum <= 1 - p
            remove[-1] = False
            keep = keep_k.clone()
            keep[order[remove]] = False
            assert torch.equal(torch.isfinite(out[b, t]), keep)
    assert torch.isfinite(out).sum(-1).min() >= 1
    assert torch.isfinite(out[0, 0]).sum() >= 3  # the tied top values survive top-k


def test_edit_masks_follow_the_official_demo():
    m = box_mask(PN, 0.25, 0.25, 0.75, 0.75, inpainting=True)  # regenerate the centre
    assert m.shape == (4, 4) and m[1:3, 1:3].sum() == 0 and m.sum() == 12
    masks = edit_masks(PN, m)
    assert masks[0].all()  # pn*pn <= 3: always forced
    assert [t.shape for t in masks] == [(1, pn * pn) for pn in PN]
    assert torch.equal(masks[-1].view(4, 4), m.bool())


@torch.no_grad()
def test_masked_sampling_keeps_forced_tokens_and_changes_the_rest(models):
    vae, var = models
    B = 2
    labels = torch.tensor([0, 1])
    tokens = [torch.randint(0, 64, (B, pn * pn)) for pn in PN]
    masks = [m.expand(B, -1) for m in edit_masks(PN, box_mask(PN, 0.25, 0.25, 0.75, 0.75, inpainting=True))]
    out = sample(var, vae, labels, cfg=1.0, generator=make_generator(0, "cpu"), teacher_tokens=tokens, force_masks=masks)
    for t, g, m in zip(out.tokens, tokens, masks):
        assert torch.equal(t[m], g[m])
    free = ~masks[-1]
    assert (out.tokens[-1][free] != tokens[-1][free]).any()


@torch.no_grad()
def test_mc_dropout_is_seeded_and_cleaned_up(models):
    vae, var = models
    labels = torch.tensor([2, 2])

    def run(rate, drop_seed):
        with mc_dropout(var, rate, batch_size=2, generator=make_generator(drop_seed, "cpu")):
            return sample(var, vae, labels, cfg=1.0, top_k=10, generator=make_generator(5, "cpu")).images

    base = sample(var, vae, labels, cfg=1.0, top_k=10, generator=make_generator(5, "cpu")).images
    assert torch.equal(run(0.0, 1), base)
    a, b, c = run(0.5, 1), run(0.5, 1), run(0.5, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert all(blk.drop_path.mc_mask is None for blk in var.blocks)
    with pytest.raises(ValueError, match="rate"):
        with mc_dropout(var, 1.0, 2, None):
            pass


@torch.no_grad()
def test_class_weights_one_hot_equals_labels(models):
    vae, var = models
    labels = torch.tensor([3, 1])
    w = torch.nn.functional.one_hot(labels, 6).float()
    a = sample(var, vae, labels, generator=make_generator(9, "cpu"))
    b = sample(var, vae, labels, generator=make_generator(9, "cpu"), class_weights=w)
    torch.testing.assert_close(a.images, b.images)


def test_sampler_input_errors(models):
    vae, var = models
    with pytest.raises(ValueError, match="class label out of range"):
        sample(var, vae, torch.tensor([7]))
    with pytest.raises(ValueError, match="together"):
        sample(var, vae, torch.tensor([1]), teacher_tokens=[torch.zeros(1, 1, dtype=torch.long)] * 4)
    other = tiny_vqvae(patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="does not match"):
        sample(var, other, torch.tensor([1]))


def test_the_pipeline_and_the_benchmark_sample_under_one_precision_context(models, monkeypatch):
    """`varup sample` (sample_shard, config sample.precision) and `bench` (sample_benchmark) enter the same
    sampling_precision context with the configured precision, so the benchmark's img/s describe the pipeline; on CPU
    `auto` is fp32: the samples equal those of an explicit fp32 call bit for bit."""
    import varup.bench.suite as bench
    import varup.sampling.sampler as sampler

    vae, var = models
    entered, real = [], sampler.sampling_precision

    def recording(device, precision="auto"):
        entered.append((torch.device(device).type, precision))
        return real(device, precision)

    monkeypatch.setattr(sampler, "sampling_precision", recording)
    kw = dict(n_per_class=2, batch_size=4, seed=3, cfg=1.5, top_k=8, top_p=0.9, device="cpu")
    auto = sampler.sample_shard(var, vae, **kw)
    assert entered == [("cpu", "auto")] * len(auto["batch_index"])  # once per batch
    fp32 = sampler.sample_shard(var, vae, precision="fp32", **kw)
    assert all((auto[k] == fp32[k]).all() for k in ("images", "tokens", "labels"))
    entered.clear()
    bench.sample_benchmark(1, 2, patch_nums=PN, vocab=16, z_channels=8, num_classes=4, width=32, device="cpu",
                           precision="bf16", vae="small", top_k=8, warmup=0, repeats=1)
    assert entered and set(entered) == {("cpu", "bf16")}


def test_tf32_is_on_for_cuda_sampling_only_and_restored():
    from varup.base.runtime import tf32_matmuls

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with tf32_matmuls(torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32
        with tf32_matmuls(torch.device("cuda")):  # flags only: no CUDA tensor is made
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
