"""The fast training path changes no result beyond rounding: token-cache batches (prefetched) equal encoding the
images inside the step (the official trainer's plain path), and torch.compile equals eager, on CPU in float32.
The GPU fast paths of the model and the loss, each checked on CPU: attention without the dense L x L mask
(per-scale prefixes, FlexAttention) equals the official dense-mask path, KV-cached sampling needs no mask, q/k and
the KV cache follow the autocast dtype, and a training step reads no value back from the device."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_var, tiny_vqvae
from varup.base.runtime import Dist
from varup.base.seeding import make_generator
from varup.models import var as var_module
from varup.models.common import check_labels
from varup.models.var import attention_segments, flex_api
from varup.models.vqvae import split_tokens
from varup.sampling.sampler import sample
from varup.tokenizer.tokens import TokenCache, encode_split, write_meta
from varup.training.loop import BatchOrder, Prefetcher
from varup.training.losses import LossConfig, UncertaintyLoss
from varup.training.references import build_references


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    torch.manual_seed(0)
    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    imgs = torch.rand(24, 3, 16, 16) * 2 - 1
    labels = [i % 5 for i in range(24)]
    split = encode_split(vae, lambda i, v: imgs[i], labels, d, "train", batch_size=7)
    write_meta(d, vae, {"train": split}, list("abcde"))
    refs = build_references(vae.quantize.embedding.weight.detach(), torch.randint(0, 64, (10, 30)), vae.patch_nums,
                            num_clusters=6)
    return d, vae, imgs, torch.tensor(labels), refs


def _loss_and_grads(model, loss_fn, lab, x, y):
    model.zero_grad(set_to_none=True)
    out = loss_fn(model(lab, x), y)
    out.total.backward()
    return out.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prefetched_token_cache_batches_equal_direct_indexing(setup):
    d, *_ = setup
    cache = TokenCache(d, "train")
    order = BatchOrder(len(cache), 8, seed=1, d=Dist())
    pf = Prefetcher(cache, BatchOrder(len(cache), 8, seed=1, d=Dist()), 0, 9, torch.device("cpu"))
    try:
        for step in range(9):
            tok, lab = pf.get(step)
            idx = order.indices(step)
            assert torch.equal(tok, torch.from_numpy(cache.tokens[idx].astype(np.int64)))
            assert torch.equal(lab, torch.from_numpy(cache.labels[idx]))
    finally:
        pf.close()


def test_token_cache_path_equals_encoding_inside_the_step(setup):
    d, vae, imgs, labels, refs = setup
    cache = TokenCache(d, "train")
    model = tiny_var().train()
    for b in model.blocks:
        b.drop_path.drop_prob = 0.0
    model.cond_drop_rate = 0.0
    loss_fn = UncertaintyLoss(LossConfig(lambda_2nd=0.01, lambda_se=0.02), vae.patch_nums, refs)
    idx = np.array([3, 17, 5, 0, 22, 9])
    # fast: rows of the token cache (encoded once, stored as uint16)
    tok = torch.from_numpy(cache.tokens[idx].astype(np.int64))
    fast = _loss_and_grads(model, loss_fn, labels[idx], vae.idxBl_to_var_input(split_tokens(tok, vae.patch_nums)), tok)
    # plain: the tokenizer runs inside the step, as the official trainer does
    gt = vae.img_to_idxBl(imgs[idx])
    y = torch.cat(gt, 1)
    plain = _loss_and_grads(model, loss_fn, labels[idx], vae.idxBl_to_var_input(gt), y)
    assert torch.equal(tok, y)
    assert torch.equal(fast[0], plain[0])
    assert all(torch.equal(fast[1][k], plain[1][k]) for k in fast[1])


@pytest.mark.slow
def test_compiled_model_equals_eager_in_float32(setup):
    d, vae, imgs, labels, refs = setup
    cache = TokenCache(d, "train")
    model = tiny_var().train()
    for b in model.blocks:
        b.drop_path.drop_prob = 0.0
    model.cond_drop_rate = 0.0
    loss_fn = UncertaintyLoss(LossConfig(lambda_2nd=0.01, lambda_se=0.02), vae.patch_nums, refs)
    tok = torch.from_numpy(cache.tokens[:8].astype(np.int64))
    x = vae.idxBl_to_var_input(split_tokens(tok, vae.patch_nums))
    eager = _loss_and_grads(model, loss_fn, labels[:8], x, tok)
    compiled = torch.compile(model)
    model.zero_grad(set_to_none=True)
    out = loss_fn(compiled(labels[:8], x), tok)
    out.total.backward()
    torch.testing.assert_close(out.total.detach(), eager[0], rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, eager[1][n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- GPU fast paths, checked on CPU
@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every scaled_dot_product_attention call: query length, key length, mask (None, or its dtype and shape) and
    the q/k/v dtypes."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        mask = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))
        calls.append({"q": q.shape[2], "k": k.shape[2], "mask": mask, "dtypes": (q.dtype, k.dtype, v.dtype)})
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def _teacher_batch(vae, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vae.V, (B, sum(p * p for p in vae.patch_nums)), generator=g)
    lab = torch.randint(0, 5, (B,), generator=g)
    return lab, vae.idxBl_to_var_input(split_tokens(tok, vae.patch_nums)), tok


def _deterministic_train_mode(model):
    model.train()
    model.cond_drop_rate = 0.0
    for b in model.blocks:
        b.drop_path.drop_prob = 0.0
    return model


def test_attention_segments_cover_the_block_causal_mask_with_prefixes():
    official = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert attention_segments(official) == [(0, 91, True), (91, 155, False), (155, 255, False), (255, 424, False),
                                            (424, 680, False)]
    assert attention_segments((1, 2, 3, 4), 0) == [(0, 1, False), (1, 5, False), (5, 14, False), (14, 30, False)]
    assert attention_segments((1, 2, 3, 4), 5) == [(0, 5, True), (5, 14, False), (14, 30, False)]
    assert attention_segments((1, 2, 3, 4), 1000) == [(0, 30, True)]
    # each segment's queries see exactly their prefix: the union of the segments is the official mask
    bias = var_module.block_causal_bias(official)[0, 0]
    for qb, qe, masked in attention_segments(official):
        assert torch.all(bias[qb:qe, qe:] == -torch.inf)
        assert masked == bool(torch.any(bias[qb:qe, :qe] == -torch.inf))


def test_the_default_attention_is_the_official_dense_mask_on_cpu(sdpa_calls, monkeypatch):
    model = tiny_var().eval()
    assert model.attn_impl == "auto"
    assert model.resolved_attn_impl("cpu") == "sdpa_dense"
    assert model.resolved_attn_impl(torch.device("cuda", 0)) == "sdpa_prefix"
    with pytest.raises(ValueError, match=r"VAR.attn_impl must be one of .*flex"):
        model.attn_impl = "flash"
    monkeypatch.setattr(var_module, "flex_api", lambda: None)  # a torch without FlexAttention
    model.attn_impl = "flex"
    assert model.resolved_attn_impl("cuda") == "sdpa_prefix"
    model.attn_impl = "auto"
    lab, x, _ = _teacher_batch(tiny_vqvae())
    with torch.no_grad():
        out = model(lab, x)
    L = model.L
    assert sdpa_calls == [{"q": L, "k": L, "mask": (torch.float32, (1, 1, L, L)), "dtypes": (torch.float32,) * 3}] * model.depth
    model.attn_impl = "sdpa_dense"
    with torch.no_grad():
        assert torch.equal(model(lab, x), out)


@pytest.mark.parametrize("impl,group", [("sdpa_prefix", 0), ("sdpa_prefix", 5), ("sdpa_prefix", 128), ("flex", 128)])
def test_each_attention_path_equals_the_dense_path_in_float32(setup, sdpa_calls, impl, group):
    """Training forward logits, loss and gradients (SDPA segments) or eval logits (FlexAttention: no CPU backward)
    of each fast path equal the official dense-mask path within float32 rounding."""
    if impl == "flex" and flex_api() is None:
        pytest.skip("this torch has no FlexAttention")
    d, vae, imgs, labels, refs = setup
    model = _deterministic_train_mode(tiny_var())
    loss_fn = UncertaintyLoss(LossConfig(lambda_2nd=0.01, lambda_se=0.02), vae.patch_nums, refs)
    lab, x, tok = _teacher_batch(vae)
    model.attn_impl = "sdpa_dense"
    dense = _loss_and_grads(model, loss_fn, lab, x, tok)
    with torch.no_grad():
        dense_eval = model.eval()(lab, x)
    model.attn_impl, model.attn_group_tokens = impl, group
    assert model.resolved_attn_impl("cpu") == impl
    sdpa_calls.clear()
    with torch.no_grad():
        fast_eval = model(lab, x)
    segments = attention_segments(model.patch_nums, group)
    if impl == "flex":
        assert sdpa_calls == []  # FlexAttention's block mask served every block
    else:
        expected = [{"q": qe - qb, "k": qe, "mask": (torch.bool, (qe - qb, qe)) if masked else None,
                     "dtypes": (torch.float32,) * 3} for qb, qe, masked in segments]
        assert sdpa_calls == expected * model.depth
    torch.testing.assert_close(fast_eval, dense_eval, rtol=1e-5, atol=1e-5)
    fast = _loss_and_grads(_deterministic_train_mode(model), loss_fn, lab, x, tok)  # flex: SDPA segments (backward)
    torch.testing.assert_close(fast[0], dense[0], rtol=1e-5, atol=1e-6)
    assert fast[1].keys() == dense[1].keys()
    for n in dense[1]:
        torch.testing.assert_close(fast[1][n], dense[1][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa_dense", "sdpa_prefix", "flex"])
@torch.no_grad()
def test_kv_cached_sampling_needs_no_mask_and_equals_teacher_forcing_on_each_path(setup, sdpa_calls, impl):
    if impl == "flex" and flex_api() is None:
        pytest.skip("this torch has no FlexAttention")
    _, vae, *_ = setup
    var = tiny_var().eval()
    var.attn_impl, var.attn_group_tokens = impl, 5
    assert var.resolved_attn_impl("cpu") == impl
    labels = torch.tensor([0, 3, 4])
    out = sample(var, vae, labels, cfg=2.0, top_k=20, generator=make_generator(0, "cpu"), return_raw_logits=True,
                 decode=False)
    ends = [b for _, b in var.begin_ends]
    # each scale attends to every cached token and itself: no mask at all
    assert sdpa_calls == [{"q": pn * pn, "k": end, "mask": None, "dtypes": (torch.float32,) * 3}
                          for pn, end in zip(var.patch_nums, ends) for _ in range(var.depth)]
    var.attn_impl = "sdpa_dense"
    again = sample(var, vae, labels, cfg=2.0, top_k=20, generator=make_generator(0, "cpu"), decode=False)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, again.tokens))
    var.attn_impl = impl
    x = vae.idxBl_to_var_input(out.tokens)
    tf = var(torch.cat((labels, torch.full_like(labels, var.num_classes))), x.repeat(2, 1, 1))
    for si, (a, b) in enumerate(var.begin_ends):
        torch.testing.assert_close(out.raw_logits[si], tf[:, a:b], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_q_k_and_the_kv_cache_follow_the_autocast_dtype(setup, sdpa_calls):
    """Under bf16 autocast SDPA gets bf16 q, k and v (F.normalize alone would return float32), in the teacher-forced
    forward and from the KV cache; the results stay within bf16 rounding of float32."""
    _, vae, *_ = setup
    var = tiny_var().eval()
    lab, x, tok = _teacher_batch(vae, B=3)
    tokens = split_tokens(tok, vae.patch_nums)
    force = [torch.ones_like(t, dtype=torch.bool) for t in tokens]  # teacher-forced: the same tokens in both runs

    def run():
        sdpa_calls.clear()
        logits = var(lab, x)
        raw = sample(var, vae, lab, cfg=1.5, generator=make_generator(0, "cpu"), teacher_tokens=tokens,
                     force_masks=force, return_raw_logits=True, decode=False).raw_logits
        return logits, torch.cat(raw, 1), list(sdpa_calls)

    ref_logits, ref_raw, ref_calls = run()
    assert {c["dtypes"] for c in ref_calls} == {(torch.float32,) * 3}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, raw, calls = run()
    assert {c["dtypes"] for c in calls} == {(torch.bfloat16,) * 3}  # the cached k/v reach SDPA as the cache holds them
    for low, ref in ((logits, ref_logits), (raw, ref_raw)):
        assert low.dtype == torch.float32
        err = (low - ref).abs().max() / ref.abs().max()
        assert 0 < err < 0.03, err  # bf16 carries 8 bits of mantissa: ~0.4 % per rounding


@pytest.mark.parametrize("impl", ["auto", "sdpa_prefix"])
@pytest.mark.parametrize("lambdas", [(0.0, 0.0), (0.01, 0.02)])
def test_a_training_step_reads_no_value_back_from_the_device(setup, lambdas, impl, monkeypatch):
    """Forward and backward of VAR + UncertaintyLoss on the meta device (where any read of a value fails, as a
    host sync would stall a GPU), with the ways Python reads a tensor's value patched to fail as well."""
    _, vae, _, _, refs = setup
    model = tiny_var().train().to("meta")  # class dropout and DropPath on, as in training
    model.attn_impl, model.attn_group_tokens = impl, 5
    loss_fn = UncertaintyLoss(LossConfig(lambda_2nd=lambdas[0], lambda_se=lambdas[1]), vae.patch_nums, refs).to("meta")
    lab = torch.empty(4, dtype=torch.long, device="meta")
    x = torch.empty(4, model.L - 1, model.Cvae, device="meta")
    tok = torch.empty(4, model.L, dtype=torch.long, device="meta")

    def sync(name):
        def fail(*a, **k):
            raise AssertionError(f"host sync in a training step: {name}")
        return fail

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "bincount", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync(f"Tensor.{name}"))
    for name in ("bincount", "nonzero", "unique"):
        monkeypatch.setattr(torch, name, sync(f"torch.{name}"))
    out = loss_fn(model(lab, x), tok)
    out.total.backward()
    assert out.per_scale.shape == (3, len(vae.patch_nums))
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_a_training_step_compiles_as_one_graph(setup):
    """torch.compile(fullgraph=True) of forward and backward of VAR + UncertaintyLoss: no graph break (a host sync
    breaks the graph), and the same loss, per-scale terms and gradients as eager."""
    _, vae, _, _, refs = setup
    model = _deterministic_train_mode(tiny_var())
    loss_fn = UncertaintyLoss(LossConfig(lambda_2nd=0.01, lambda_se=0.02), vae.patch_nums, refs)
    lab, x, tok = _teacher_batch(vae)

    def step(lab, x, tok):
        out = loss_fn(model(lab, x), tok)
        return out.total, out.per_scale

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        total, per_scale = fn(lab, x, tok)
        total.backward()
        results.append((total.detach(), per_scale, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (t0, s0, g0), (t1, s1, g1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_label_checks_name_the_source_and_skip_device_reads_only_when_asked():
    with pytest.raises(ValueError, match=r"^data/train_labels.npy: class label out of range: got \[0, 5\]"):
        check_labels(torch.tensor([0, 5]), 5, allow_null=False, where="data/train_labels.npy")
    with pytest.raises(ValueError, match="class label out of range"):
        check_labels(torch.tensor([0, 6]), 5, sync_free=True)  # a CPU tensor outside compilation: still checked
    check_labels(torch.empty(2, dtype=torch.long, device="meta"), 5, sync_free=True)  # a device tensor: not read
    with pytest.raises(TypeError, match="integer tensor"):
        check_labels(torch.empty(2, device="meta"), 5, sync_free=True)
