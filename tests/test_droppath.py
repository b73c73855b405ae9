"""MC-Dropout's DropPath masks and σ readings (issue 24, items 3-5): VAR's per-call draw (per branch, scale and CFG
row), the former per-pass masks reproduced exactly, the dropout vs samples σ readings, and the DropPath rate of the
entanglement / descriptiveness sets."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import varup.models.var as var_module
from helpers import informative_pair
from varup.base.seeding import derive_seed, make_generator
from varup.data.folder import to_uint8
from varup.models.common import eval_mode
from varup.models.var import call_mask
from varup.sampling.sampler import mc_dropout, sample
from varup.studies.prompts import prompt_sets
from varup.studies.uncertainty import droppath_sweep, entanglement_sets, mc_passes, readings_of, sigma_map

KW = dict(cfg=1.5, top_k=0, top_p=0.0)

# The masks the former mc_dropout (one mask per image and block, held per pass; commit abb30c7) installed for
# rate 0.3, batch 3, depth 4, generator(s) derive_seed(7, 'mc', t): block i's (2B,) mask, both CFG halves.
K1, K2, K3 = 1 / (1 - 0.1), 1 / (1 - 0.2), 1 / (1 - 0.3)
FORMER_MASKS = {"single": [[1.0] * 6, [K1] * 6, [K2, 0.0, K2, K2, 0.0, K2], [K3] * 6],
                "list": [[1.0] * 6, [K1] * 6, [K2, K2, 0.0, K2, K2, 0.0], [K3] * 6]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models():
    return informative_pair()


@contextlib.contextmanager
def former_mc_dropout(var, rate, batch_size, generator):
    """The former mc_dropout, verbatim in effect: one mask per image and block, from ``generator`` (or one per
    image), held for every call and shared by both CFG halves."""
    rates = torch.linspace(0, rate, len(var.blocks)).tolist()
    try:
        for b, p in zip(var.blocks, rates):
            keep = 1.0 - p
            if isinstance(generator, list):
                m = torch.cat([torch.empty(1, 1, 1).bernoulli_(keep, generator=g) for g in generator])
            else:
                m = torch.empty(batch_size, 1, 1).bernoulli_(keep, generator=generator)
            b.drop_path.set_mc_mask(m.div_(keep).repeat(2, 1, 1))
        yield
    finally:
        for b in var.blocks:
            b.drop_path.set_mc_mask(None)


def record_draws(monkeypatch):
    """Every per-call mask DropPath draws, in order: (keep, the (rows,) mask)."""
    draws = []

    def recording(rows, keep, generator, device):
        m = call_mask(rows, keep, generator, device)
        draws.append((keep, m.flatten().clone()))
        return m

    monkeypatch.setattr(var_module, "call_mask", recording)
    return draws


@torch.no_grad()
def test_per_call_masks_differ_per_branch_scale_and_cfg_row(models, monkeypatch):
    var, vae = models
    draws = record_draws(monkeypatch)
    B, rate = 4, 0.5
    with eval_mode(var, vae), mc_dropout(var, rate, B, make_generator(3, "cpu"), masks="per_call"):
        sample(var, vae, torch.tensor([0, 1, 2, 3]), generator=make_generator(1, "cpu"), **KW)
    scales, dropping = len(var.patch_nums), len(var.blocks) - 1  # block 0 has rate 0: no draw (as nn.Identity)
    assert len(draws) == scales * dropping * 2  # a fresh mask per call: both branches of every block, every scale
    keeps = [1 - p for p in torch.linspace(0, rate, len(var.blocks)).tolist()[1:]]
    per_scale = [draws[i * dropping * 2:(i + 1) * dropping * 2] for i in range(scales)]
    for calls in per_scale:  # in each scale: block 1 attn, block 1 FFN, block 2 attn, ...
        assert [k for k, _ in calls] == pytest.approx([k for k in keeps for _ in (0, 1)])
    masks = [[m for _, m in calls] for calls in per_scale]  # [scale][2 * block + branch] -> (2B,) mask
    for m in (m for calls in masks for m in calls):
        assert m.shape == (2 * B,)
    for k, keep in zip(range(dropping), keeps):  # values: 0 or 1/keep (scaled as in training)
        vals = {round(float(v), 5) for calls in masks for v in calls[2 * k]}
        assert vals <= {0.0, round(1 / keep, 5)}
    # attention and FFN branch of one block draw their own masks
    assert any(not torch.equal(calls[2 * k], calls[2 * k + 1]) for calls in masks for k in range(dropping))
    # scales draw their own: the same (block, branch) differs between scales
    assert any(not torch.equal(masks[0][j], masks[s][j]) for s in range(1, scales) for j in range(2 * dropping))
    # the cond row b and the uncond row B + b of one image draw their own
    assert any(not torch.equal(m[:B], m[B:]) for calls in masks for m in calls)
    assert all(blk.drop_path.mc_draw is None and blk.drop_path.mc_mask is None for blk in var.blocks)  # cleaned up


@torch.no_grad()
def test_per_pass_installs_one_mask_and_draws_nothing_per_call(models, monkeypatch):
    var, vae = models
    draws = record_draws(monkeypatch)
    for key, gen in (("single", make_generator(derive_seed(7, "mc", 0), "cpu")),
                     ("list", [make_generator(derive_seed(7, "mc", t), "cpu") for t in range(3)])):
        with mc_dropout(var, 0.3, 3, gen, masks="per_pass"):
            got = [b.drop_path.mc_mask.flatten().tolist() for b in var.blocks]
            sample(var, vae, torch.tensor([0, 1, 2]), generator=make_generator(1, "cpu"), **KW)
        np.testing.assert_allclose(got, FORMER_MASKS[key], atol=1e-6)  # the former draws, value for value
    assert draws == []
    with pytest.raises(ValueError, match="uncertainty.droppath_masks"):
        with mc_dropout(var, 0.3, 3, None, masks="per_image"):
            pass


@torch.no_grad()
def test_per_pass_reproduces_the_former_passes_and_sets_exactly(models):
    var, vae = models
    T, rate, seed = 4, 0.3, 0
    former = []
    with eval_mode(var, vae):
        for t in range(T):
            with former_mc_dropout(var, rate, 1, make_generator(derive_seed(seed, "mc", t), "cpu")):
                former.append(sample(var, vae, torch.tensor([1]), **KW,
                                     generator=make_generator(derive_seed(seed, "sample"), "cpu")).images)
    former = torch.cat(former)
    assert torch.equal(mc_passes(var, vae, 1, T=T, rate=rate, seed=seed, masks="per_pass", **KW), former)
    assert not torch.equal(mc_passes(var, vae, 1, T=T, rate=rate, seed=seed, masks="per_call", **KW), former)
    # a DropPath set (batch b: sampling derive_seed(seed, 'sample', b), masks derive_seed(seed, 'droppath', b))
    got = droppath_sweep(var, vae, rates=(rate,), n_per_class=1, seed=3, batch_size=4, sigma_pairs=(), T=2,
                         masks="per_pass", **KW)[0]["images"]
    labels = torch.arange(5)
    want = []
    with eval_mode(var, vae):
        for b, s in enumerate(range(0, 5, 4)):
            with former_mc_dropout(var, rate, len(labels[s:s + 4]), make_generator(derive_seed(3, "droppath", b), "cpu")):
                o = sample(var, vae, labels[s:s + 4], generator=make_generator(derive_seed(3, "sample", b), "cpu"), **KW)
            want.append(to_uint8(o.images))
    assert np.array_equal(got, np.concatenate(want))


def test_per_image_generators_draw_each_image_as_a_batch_of_one():
    keep = 0.6
    gens = [make_generator(derive_seed(2, "g", b), "cpu") for b in range(3)]
    both = call_mask(6, keep, gens, "cpu").flatten()
    for b in range(3):
        alone = call_mask(2, keep, make_generator(derive_seed(2, "g", b), "cpu"), "cpu").flatten()
        assert torch.equal(torch.stack([both[b], both[3 + b]]), alone)  # its cond and uncond row
    big = call_mask(20000, keep, make_generator(0, "cpu"), "cpu")
    assert sorted(big.unique().tolist()) == pytest.approx([0.0, 1 / keep])
    assert float(big.mean()) == pytest.approx(1.0, abs=0.03)  # scaled by 1/keep: unbiased
    with pytest.raises(ValueError, match="3 DropPath generators .* 4 rows: need 2"):
        call_mask(4, keep, gens, "cpu")


@torch.no_grad()
def test_samples_reading_measures_sample_spread_and_exceeds_the_dropout_reading(models):
    var, vae = models
    for masks in ("per_call", "per_pass"):
        d = float(sigma_map(mc_passes(var, vae, 1, T=8, rate=0.1, seed=0, masks=masks, reading="dropout", **KW))[1]
                  .mean())
        s = float(sigma_map(mc_passes(var, vae, 1, T=8, rate=0.1, seed=0, masks=masks, reading="samples", **KW))[1]
                  .mean())
        assert 0 < d < s, (masks, d, s)
    # rate 0: no DropPath -- the dropout reading is 0, the samples reading the spread of ordinary samples
    z = mc_passes(var, vae, 2, T=3, rate=0.0, seed=4, reading="samples", **KW)
    assert float(sigma_map(z)[1].mean()) > 0
    for t in range(3):
        ref = sample(var, vae, torch.tensor([2]), generator=make_generator(derive_seed(4, "sample", t), "cpu"), **KW)
        assert torch.equal(z[t], ref.images[0])
    assert float(sigma_map(mc_passes(var, vae, 2, T=3, rate=0.0, seed=4, reading="dropout", **KW))[1].max()) == 0
    assert readings_of("both") == ("dropout", "samples") and readings_of("samples") == ("samples",)
    with pytest.raises(ValueError, match="sigma_reading"):
        readings_of("either")


@torch.no_grad()
def test_entanglement_sets_are_generated_at_the_set_droppath_rate(models):
    var, vae = models
    rate = 0.3
    one = entanglement_sets(var, vae, [[2]], n=4, seed=5, batch_size=4, rate=rate, T=2, sigma_seeds=(0,),
                            readings=("dropout", "samples"), **KW)[0]
    with eval_mode(var, vae), mc_dropout(var, rate, 4, make_generator(derive_seed(5, "droppath", 0), "cpu")):
        on = sample(var, vae, torch.full((4,), 2), generator=make_generator(derive_seed(5, "sample", 0), "cpu"), **KW)
    off = sample(var, vae, torch.full((4,), 2), generator=make_generator(derive_seed(5, "sample", 0), "cpu"), **KW)
    assert np.array_equal(one["images"], to_uint8(on.images))
    assert not np.array_equal(one["images"], to_uint8(off.images))
    assert one["mean_sigma"] > 0 and one["mean_sigma_samples"] > 0 and len(one["sigma_per_seed_samples"]) == 1


def test_prompt_study_sets_use_the_set_droppath_rate():
    params = {"droppath": {"prompt": "a circle", "rates": [0.05, 0.1]}, "entanglement": ["a circle", "a circle or a square"],
              "descriptiveness": ["a shape", "a circle"], "set_droppath_rate": 0.05}
    sets = prompt_sets(params)
    assert [s["rate"] for s in sets if s["study"] != "droppath"] == [0.05] * 4
    by = {(s["study"], s["prompt"], s["rate"]): s["set"] for s in sets}
    # "a circle" at 0.05 is one image set for the sweep's 0.05 row, entanglement and descriptiveness (as the study)
    same = {by[("droppath", "a circle", 0.05)], by[("entanglement", "a circle", 0.05)],
            by[("descriptiveness", "a circle", 0.05)]}
    assert len(same) == 1 and by[("droppath", "a circle", 0.1)] not in same
    assert len({s["set"] for s in sets}) == 4  # circle@0.05, circle@0.1, circle-or-square, shape
