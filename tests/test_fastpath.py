"""The fast training path changes no result beyond rounding: token-cache batches (prefetched) equal encoding the
images inside the step (the official trainer's plain path), and torch.compile equals eager, on CPU in float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_var, tiny_vqvae
from varup.base.runtime import Dist
from varup.models.vqvae import split_tokens
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
