"""MC-Dropout studies: σ maps, determinism of the passes, region σ, object segmentation, the DropPath sweep, class
entanglement, the stage files, tables and figures."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import informative_pair
from varup.base.seeding import derive_seed, make_generator
from varup.data.folder import to_uint8
from varup.data.toy import generate_toy_dataset
from varup.report.uncertainty import droppath_table, entanglement_table, region_table, sigma_figure, sweep_figure
from varup.sampling.sampler import sample, sample_shard
from varup.studies.uncertainty import (
    droppath_sweep,
    entangled_weights,
    entanglement_sets,
    iou,
    mc_passes,
    object_mask,
    region_sigma,
    run_entanglement_sets,
    run_mc_dropout,
    run_sweep_sets,
    segmentation_check,
    sigma_map,
)

KW = dict(cfg=1.5, top_k=0, top_p=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models():
    return informative_pair()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "shapes"
    generate_toy_dataset(d, n_train_per_class=16, n_val_per_class=48, progress=False)
    return d


def test_sigma_map_is_the_mean_over_channels_of_the_per_channel_std():
    rng = np.random.default_rng(0)
    x = rng.random((7, 3, 5, 6))
    mean, sigma = sigma_map(x)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
    direct = np.sqrt(((x - x.mean(0)) ** 2).mean(0)).mean(0)  # population std per channel, then channel mean
    np.testing.assert_allclose(sigma, direct, rtol=1e-5, atol=1e-7)
    assert sigma.shape == (5, 6) and mean.shape == (3, 5, 6)
    _, s_t = sigma_map(torch.from_numpy(x).float())
    np.testing.assert_allclose(s_t, direct, rtol=1e-5, atol=1e-6)
    assert np.all(sigma_map(x[:1])[1] == 0)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        sigma_map(x[:, :2])


def test_mc_passes_are_deterministic_differ_with_dropout_and_rate_zero_gives_zero_sigma(models):
    var, vae = models
    a = mc_passes(var, vae, 1, T=8, rate=0.3, seed=0, **KW)
    b = mc_passes(var, vae, 1, T=8, rate=0.3, seed=0, **KW)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32 and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b)  # same seed: the same T passes
    distinct = {a[t].numpy().tobytes() for t in range(8)}
    assert len(distinct) >= 2  # the dropped sub-networks differ
    assert sigma_map(a)[1].mean() > 0
    assert not torch.equal(a, mc_passes(var, vae, 1, T=8, rate=0.3, seed=1, **KW))
    z = mc_passes(var, vae, 1, T=4, rate=0.0, seed=0, **KW)
    assert np.all(sigma_map(z)[1] == 0)
    # rate 0 = the ordinary sample with the passes' sampling seed
    ref = sample(var, vae, torch.tensor([1]), generator=make_generator(derive_seed(0, "sample"), "cpu"), **KW)
    assert torch.equal(z[0], ref.images[0])
    assert var.blocks[0].drop_path.mc_mask is None and not var.training  # cleaned up


def test_batched_mc_passes_equal_the_passes_made_one_at_a_time(models, monkeypatch):
    """Passes in batches (one mask and one sampling generator per pass) draw what each pass draws alone: the same
    images up to the rounding of batched matmuls (~1e-6, 1e-5 with more_smooth; a different mask or sampling noise changes pixels by
    ~0.1), for a class and a class mix, with top-k / top-p and with more_smooth's Gumbel noise. On the CPU the
    default is the former path, one pass at a time."""
    import varup.studies.uncertainty as unc

    var, vae = models
    batches = []
    real_sample = unc.sample

    def counting_sample(*args, **kw):
        out = real_sample(*args, **kw)
        batches.append(len(out.images))
        return out

    monkeypatch.setattr(unc, "sample", counting_sample)
    for cond, kw in ((1, KW), (entangled_weights(5, [0, 3]), dict(cfg=2.0, top_k=20, top_p=0.9, more_smooth=True))):
        one = mc_passes(var, vae, cond, T=5, rate=0.3, seed=3, batch_size=1, **kw)
        assert batches == [1] * 5
        batches.clear()
        assert torch.equal(mc_passes(var, vae, cond, T=5, rate=0.3, seed=3, **kw), one)  # the CPU default
        batches.clear()
        for bs, expect in ((5, [5]), (2, [2, 2, 1]), (64, [5])):
            got = mc_passes(var, vae, cond, T=5, rate=0.3, seed=3, batch_size=bs, **kw)
            assert batches == expect
            batches.clear()
            assert float((got - one).abs().max()) < 1e-4, (cond, bs)
        spread = [float((one[t] - one[0]).abs().max()) for t in range(1, 5)]
        assert max(spread) > 0.05  # the passes differ (masks per pass) far beyond the rounding
    assert var.blocks[0].drop_path.mc_mask is None


def test_one_generator_per_image_samples_each_image_as_alone(models):
    """sample() with a list of generators: image b is drawn from its own generator, as in a batch of one (the same
    tokens; pixels to float rounding)."""
    var, vae = models
    labels = torch.tensor([0, 3, 1])
    kw = dict(cfg=1.5, top_k=30, top_p=0.0, more_smooth=True)
    gens = [make_generator(derive_seed(9, "g", b), "cpu") for b in range(3)]
    both = sample(var, vae, labels, generator=gens, **kw)
    for b in range(3):
        alone = sample(var, vae, labels[b:b + 1], generator=make_generator(derive_seed(9, "g", b), "cpu"), **kw)
        assert all(torch.equal(t[b], a[0]) for t, a in zip(both.tokens, alone.tokens))
        assert float((both.images[b] - alone.images[0]).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(var, vae, labels, generator=gens[:2], **kw)
    with pytest.raises(ValueError, match="one generator for the batch"):
        sample(var, vae, None, batch_size=3, generator=gens, **kw)


def test_region_sigma_on_a_synthetic_map():
    sigma = np.full((8, 8), 0.1)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    sigma[mask] = 0.3
    r = region_sigma(sigma, mask)
    assert r["inside"] == pytest.approx(0.3) and r["outside"] == pytest.approx(0.1)
    assert r["object_fraction"] == pytest.approx(12 / 64)
    sigma[0, 0] = 0.5  # one background pixel more
    assert region_sigma(sigma, mask)["outside"] == pytest.approx((51 * 0.1 + 0.5) / 52)
    empty = region_sigma(sigma, np.zeros((8, 8), bool))
    assert empty["inside"] is None and empty["outside"] == pytest.approx(sigma.mean())
    with pytest.raises(ValueError, match="differ in shape"):
        region_sigma(sigma, mask[:4])


def test_object_segmentation_agrees_with_the_true_toy_masks(toy):
    chk = segmentation_check(toy, "val", max_images=None)
    assert chk["n"] == 4 * 48
    assert chk["mean_iou"] > 0.95 and chk["frac_iou_ge_0.8"] >= 0.98, chk
    # any layout / dtype: uint8 HWC and float CHW give the same mask
    from varup.data.toy import read_manifest

    row = read_manifest(toy, "val")[5]
    img = np.asarray(Image.open(toy / row["path"]).convert("RGB"))
    true = np.asarray(Image.open(toy / row["mask_path"])) > 127
    m = object_mask(img)
    assert np.array_equal(m, object_mask(img.transpose(2, 0, 1).astype(np.float32) / 255))
    assert iou(m, true) > 0.8
    # a grey background without an object: no object
    grey = np.full((32, 32, 3), 128, np.uint8)
    grey[..., 0] += np.arange(32, dtype=np.uint8)[None, :] % 7
    assert not object_mask(grey).any()


def test_entangled_weights_and_one_class_mix_equals_label_conditioning(models):
    var, vae = models
    w = entangled_weights(5, [0, 3])
    assert w.shape == (6,) and float(w.sum()) == pytest.approx(1.0) and w[0] == w[3] == 0.5 and w[5] == 0
    assert float(entangled_weights(5, [1, 2, 4]).sum()) == pytest.approx(1.0)
    for bad, msg in (([], "at least one"), ([1, 1], "duplicate"), ([5], "outside")):
        with pytest.raises(ValueError, match=msg):
            entangled_weights(5, bad)
    sets = entanglement_sets(var, vae, [[2], [2, 4]], n=6, seed=5, batch_size=4, rate=0.0, T=3, sigma_seeds=(0, 1),
                             **KW)  # rate 0: DropPath off (the study's 0.05: test_droppath)
    one, two = sets
    assert one["images"].shape == (6, 16, 16, 3) and one["images"].dtype == np.uint8 and one["n_concepts"] == 1
    for b, (s, e) in enumerate(((0, 4), (4, 6))):
        ref = sample(var, vae, torch.full((e - s,), 2), generator=make_generator(derive_seed(5, "sample", b), "cpu"),
                     **KW)
        assert np.array_equal(one["images"][s:e], to_uint8(ref.images))
    assert two["labels"].tolist() == [2, 4, 2, 4, 2, 4] and two["mix"] == [2, 4]
    assert not np.array_equal(one["images"], two["images"])
    # the MC passes under a one-class mix are those of label conditioning
    pw = mc_passes(var, vae, entangled_weights(5, [2]), T=3, rate=0.2, seed=0, **KW)
    assert torch.equal(pw, mc_passes(var, vae, 2, T=3, rate=0.2, seed=0, **KW))
    assert len(one["sigma_per_seed"]) == 2 and one["mean_sigma"] == pytest.approx(np.mean(one["sigma_per_seed"]))


def test_droppath_sweep_rate_zero_reproduces_the_sample_set(models):
    var, vae = models
    res = droppath_sweep(var, vae, rates=(0.0, 0.3), n_per_class=2, seed=3, batch_size=4, sigma_pairs=[(0, 0), (1, 1)],
                         T=8, **KW)
    ref = sample_shard(var, vae, n_per_class=2, batch_size=4, seed=3, **KW)
    assert [r["rate"] for r in res] == [0.0, 0.3]
    assert np.array_equal(res[0]["images"], ref["images"]) and np.array_equal(res[0]["tokens"], ref["tokens"])
    assert np.array_equal(res[0]["labels"], ref["labels"]) and res[0]["mean_sigma"] == 0.0
    assert not np.array_equal(res[1]["images"], ref["images"]) and res[1]["mean_sigma"] > 0
    again = droppath_sweep(var, vae, rates=(0.3,), n_per_class=2, seed=3, batch_size=4, sigma_pairs=[(0, 0), (1, 1)],
                           T=8, **KW)
    assert np.array_equal(again[0]["images"], res[1]["images"]) and again[0]["pair_sigma"] == res[1]["pair_sigma"]


def test_stage_files_tables_and_figures(models, toy, tmp_path):
    var, vae = models
    torch.save({"model": var.state_dict(), "config": var.cfg.to_dict()}, tmp_path / "model.pt")
    torch.save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, tmp_path / "vqvae.pt")
    common = dict(cfg=1.5, top_k=900, top_p=0.95, device="cpu")
    mc, sweeps, ents = [], [], []
    for method, reading in (("baseline", "dropout"), ("ours", "both")):
        meta = {"dataset": "shapes", "depth": 4, "method": method, "seed": 0}
        r = run_mc_dropout(tmp_path / "model.pt", tmp_path / "vqvae.pt", toy, tmp_path / method / "mc.json",
                           tmp_path / method / "mc.npz", classes=[0, 3], seeds=[0, 1], T=4, rate=0.3, meta=meta,
                           segmentation_images=32, sigma_reading=reading, **common)
        mc.append(r)
        sweeps.append(run_sweep_sets(tmp_path / "model.pt", tmp_path / "vqvae.pt", tmp_path / method / "sweep",
                                     rates=(0.1, 0.3), n_per_class=1, seed=0, sigma_pairs=[(0, 0)], T=3, meta=meta,
                                     sigma_reading=reading, **common))
        ents.append(run_entanglement_sets(tmp_path / "model.pt", tmp_path / "vqvae.pt", tmp_path / method / "ent",
                                          mixes=[[0], [0, 1]], n=3, seed=0, T=3, meta=meta, **common))
    # both σ readings: the samples reading's fields beside the dropout reading's, region σ under each
    both = mc[1]
    assert both["sigma_readings"] == ["dropout", "samples"] and both["droppath_masks"] == "per_call"
    assert both["mean_sigma_samples"] > both["mean_sigma"] > 0 and "mean_sigma_samples" not in mc[0]
    assert both["region"]["inside_samples"] is not None and "inside_samples" not in mc[0]["region"]
    with np.load(tmp_path / "ours" / "mc.npz") as z:
        assert z["sigma_samples"].shape == (4, 16, 16) and str(z["reading"]) == "dropout"
        assert [float(s.mean()) for s in z["sigma_samples"]] == pytest.approx(
            [p["mean_sigma_samples"] for p in both["pairs"]])
    assert sweeps[1]["rates"][0]["mean_sigma_samples"] is not None and "mean_sigma_samples" not in sweeps[0]["rates"][0]
    r = mc[0]
    assert json.loads((tmp_path / "baseline" / "mc.json").read_text())["mean_sigma"] == pytest.approx(r["mean_sigma"])
    assert len(r["pairs"]) == 4 and r["region"]["available"] and r["region"]["segmentation_check"]["n"] == 32
    with np.load(tmp_path / "baseline" / "mc.npz") as z:
        assert z["sigma"].shape == (4, 16, 16) and z["mean"].shape == (4, 16, 16, 3) and z["mask"].dtype == bool
        assert z["classes"].tolist() == [0, 0, 3, 3] and z["seeds"].tolist() == [0, 1, 0, 1]
        assert [float(s.mean()) for s in z["sigma"]] == pytest.approx([p["mean_sigma"] for p in r["pairs"]])
    with np.load(tmp_path / "baseline" / "sweep" / "droppath_0.3.npz") as z:
        assert z["images"].shape == (5, 16, 16, 3) and z["labels"].tolist() == [0, 1, 2, 3, 4]
        assert json.loads(str(z["params"]))["rate"] == 0.3 and z["tokens"].shape == (5, var.L)
    with np.load(tmp_path / "ours" / "ent" / "mix_0-1.npz") as z:
        assert z["images"].shape == (3, 16, 16, 3) and z["mix"].tolist() == [0, 1]
    assert (tmp_path / "ours" / "sweep" / "sweep.json").exists()
    assert (tmp_path / "ours" / "ent" / "entanglement.json").exists()

    # a dataset without masks: region σ is absent, with the reason
    other = tmp_path / "imgs"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps({"name": "afhq"}))
    r2 = run_mc_dropout(tmp_path / "model.pt", tmp_path / "vqvae.pt", other, tmp_path / "x.json", tmp_path / "x.npz",
                        classes=[0], seeds=[0], T=2, rate=0.1, **common)
    assert r2["region"]["available"] is False and "no object masks" in r2["region"]["reason"]
    assert "inside" not in r2["region"] and all("region" not in p for p in r2["pairs"])

    # ... unless masks of its mean images are supplied: region σ is then computed exactly on them
    masks = tmp_path / "masks"
    r3 = run_mc_dropout(tmp_path / "model.pt", tmp_path / "vqvae.pt", other, tmp_path / "m.json", tmp_path / "m.npz",
                        classes=[0], seeds=[0, 1], T=2, rate=0.3, mask_dir=masks, **common)
    assert r3["region"]["available"] is False and "does not exist" in r3["region"]["reason"]
    masks.mkdir()
    left = np.zeros((16, 16), np.uint8)
    left[:, :8] = 255
    Image.fromarray(left).save(masks / "class0_seed0.png")
    r3 = run_mc_dropout(tmp_path / "model.pt", tmp_path / "vqvae.pt", other, tmp_path / "m.json", tmp_path / "m.npz",
                        classes=[0], seeds=[0, 1], T=2, rate=0.3, mask_dir=masks, **common)
    assert "1 of 2 masks missing" in r3["region"]["reason"] and "class0_seed1.png" in r3["region"]["reason"]
    Image.fromarray(255 - left).convert("RGB").save(masks / "class0_seed1.png")
    r3 = run_mc_dropout(tmp_path / "model.pt", tmp_path / "vqvae.pt", other, tmp_path / "m.json", tmp_path / "m.npz",
                        classes=[0], seeds=[0, 1], T=2, rate=0.3, mask_dir=masks, **common)
    with np.load(tmp_path / "m.npz") as z:
        sig = z["sigma"]
        assert z["mask"][0, :, :8].all() and not z["mask"][0, :, 8:].any() and z["mask"][1, :, 8:].all()
    assert r3["pairs"][0]["region"]["inside"] == pytest.approx(sig[0, :, :8].mean())
    assert r3["pairs"][1]["region"]["inside"] == pytest.approx(sig[1, :, 8:].mean())
    assert r3["region"]["available"] and str(masks) in r3["region"]["segmentation"]
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "class0_seed1.png")
    with pytest.raises(ValueError, match=r"class0_seed1.png: mask is 8x8, the σ map 16x16"):
        run_mc_dropout(tmp_path / "model.pt", tmp_path / "vqvae.pt", other, tmp_path / "m.json", tmp_path / "m.npz",
                       classes=[0], seeds=[0, 1], T=2, rate=0.3, mask_dir=masks, **common)

    # tables: mean ± std over records (seeds); the workflow fills 'fidelity' per set
    recs = []
    for fid, seed in ((10.0, 0), (14.0, 1)):
        s = json.loads(json.dumps(sweeps[0]))
        s["seed"] = seed
        s["rates"][0]["fidelity"] = {"fid": fid, "kid_mean": fid / 1000}
        recs.append(s)
    df, disp = droppath_table(recs + [sweeps[1]])
    row = df[(df.method == "baseline") & (df.rate == 0.1)].iloc[0]
    assert row.seeds == 2 and row.fid_mean == pytest.approx(12.0)
    assert row.fid_std == pytest.approx(np.std([10, 14], ddof=1))
    assert row.sigma_mean == pytest.approx(sweeps[0]["rates"][0]["mean_sigma"]) and row.sigma_std == 0
    assert df[(df.method == "ours")].fid_mean.isna().all() and len(df) == 4
    assert {"σ (dropout)", "σ (samples)"} <= set(disp.columns)  # both readings labelled; — where not computed
    ours = df[(df.method == "ours") & (df.rate == 0.3)].iloc[0]
    assert ours.sigma_samples_mean == pytest.approx(sweeps[1]["rates"][1]["mean_sigma_samples"])
    assert df[df.method == "baseline"].sigma_samples_mean.isna().all()
    rt, rdisp = region_table(mc)
    assert set(rt.method) == {"baseline", "ours"}
    assert rt.iloc[0].sigma_object_mean == pytest.approx(mc[0]["region"]["inside"])
    assert rt.iloc[1].sigma_object_samples_mean == pytest.approx(mc[1]["region"]["inside_samples"])
    assert {"σ object (dropout)", "σ background (samples)"} <= set(rdisp.columns)
    et, _ = entanglement_table(ents)
    assert sorted(et.concepts.tolist()) == [1, 1, 2, 2]
    two = et[(et.method == "ours") & (et.concepts == 2)].iloc[0]
    assert two.sigma_mean == pytest.approx(ents[1]["mixes"][1]["mean_sigma"]) and two.mixes == "0-1"

    vmax = sigma_figure({"baseline": tmp_path / "baseline" / "mc.npz", "ours": tmp_path / "ours" / "mc.npz"},
                        tmp_path / "fig", class_names=["a", "b", "c", "d", "e"])
    with np.load(tmp_path / "ours" / "mc.npz") as zo, np.load(tmp_path / "baseline" / "mc.npz") as zb:
        assert vmax == pytest.approx(max(zo["sigma"].max(), zb["sigma"].max()))
    files = {"baseline": tmp_path / "baseline" / "mc.npz", "ours": tmp_path / "ours" / "mc.npz"}
    with np.load(files["ours"]) as zo, np.load(files["baseline"]) as zb:
        want = max(zo["sigma"][3].max(), zb["sigma"][3].max())  # pair (3, 1) is the 4th
    assert sigma_figure(files, tmp_path / "fig2", pairs=[(3, 1)]) == pytest.approx(want)
    with pytest.raises(ValueError, match="not in every method"):
        sigma_figure(files, tmp_path / "fig2", pairs=[(2, 0)])
    sweep_figure(recs + [sweeps[1]], tmp_path / "fig")
    for name in ("mc_dropout_sigma", "droppath_sweep"):
        for ext in ("png", "pdf"):
            assert (tmp_path / "fig" / f"{name}.{ext}").stat().st_size > 1000
