"""varup.metrics.cmmd: the MMD estimator against a pair-by-pair loop and the published formula, its invariances,
and the published CMMD image preprocessing (centre crop, bicubic, CLIP normalisation)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from varup.metrics.cmmd import CLIP_MEAN, CLIP_STD, cmmd, cmmd_preprocess, kernel_mean, mmd


def mmd_pairwise_loop(x, y, sigma, scale):
    """The biased squared MMD, one kernel evaluation per ordered pair (diagonals included)."""
    def mean_k(a, b):
        return sum(math.exp(-float(np.sum((ai - bj) ** 2)) / (2 * sigma ** 2)) for ai in a for bj in b) / (len(a) * len(b))
    return scale * (mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y))


def mmd_published_formula(x, y, dtype=np.float64, sigma=10.0, scale=1000.0):
    """google-research cmmd/distance.py's definition: Gram-matrix expansion of the squared distances, squared
    norms from the Gram diagonals, full means of the three kernel matrices (JAX runs it in float32)."""
    x, y = x.astype(dtype), y.astype(dtype)
    gamma = dtype(1 / (2 * sigma ** 2))
    xn, yn = np.diag(x @ x.T), np.diag(y @ y.T)
    k = {n: np.mean(np.exp(-gamma * (-2 * a @ b.T + an[:, None] + bn[None, :])))
         for n, (a, an, b, bn) in {"xx": (x, xn, x, xn), "yy": (y, yn, y, yn), "xy": (x, xn, y, yn)}.items()}
    return float(dtype(scale) * (k["xx"] + k["yy"] - 2 * k["xy"]))


def unit_rows(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, d)) + shift
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_matches_a_pair_by_pair_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)) * 3, rng.normal(size=(4, 5)) * 3 + 1
    for sigma, scale in [(10.0, 1000.0), (2.0, 1.0), (0.7, 5.0)]:
        assert mmd(x, y, sigma=sigma, scale=scale) == pytest.approx(mmd_pairwise_loop(x, y, sigma, scale), rel=1e-9)


def test_matches_the_published_formula():
    x, y = unit_rows(40, 16, 1), unit_rows(30, 16, 2, shift=0.3)
    ours = mmd(x, y)
    assert ours == pytest.approx(mmd_published_formula(x, y), rel=1e-9, abs=1e-12)
    # the published float32 run agrees up to its rounding (values of exp() sit near 1: cancellation)
    assert ours == pytest.approx(mmd_published_formula(x, y, np.float32), abs=5e-4)


def test_hand_computed_value_includes_the_diagonal():
    # x = {0}, y = {1}, sigma 1: 1 + 1 - 2 exp(-1/2); an unbiased estimator would drop k(x, x) and k(y, y)
    assert mmd([[0.0]], [[1.0]], sigma=1.0, scale=1.0) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)


def test_sigma_and_scale():
    x, y = unit_rows(20, 8, 3), unit_rows(25, 8, 4, shift=0.5)
    assert mmd(x, y) == pytest.approx(1000 * mmd(x, y, scale=1.0), rel=1e-12)
    # the RBF kernel depends on distance / sigma only
    assert mmd(4 * x, 4 * y, sigma=40.0) == pytest.approx(mmd(x, y), rel=1e-9)
    assert mmd(x, y, sigma=1.0) != pytest.approx(mmd(x, y), rel=1e-3)


def test_zero_for_identical_sets_and_symmetric():
    x, y = unit_rows(30, 12, 5), unit_rows(20, 12, 6)
    assert abs(mmd(x, x)) < 1e-10
    assert abs(mmd(x, x[::-1].copy())) < 1e-10  # a set: row order does not matter
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-12)
    assert mmd(x, y) > 0


def test_grows_with_a_mean_shift():
    base = unit_rows(60, 10, 7)
    values = [mmd(base, unit_rows(60, 10, 8, shift=s)) for s in (0.0, 0.2, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_tensors_arrays_and_row_blocks_agree():
    x, y = unit_rows(33, 6, 9), unit_rows(17, 6, 10, shift=0.2)
    ref = mmd(x, y)
    assert mmd(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(ref, rel=1e-5)
    xt = torch.from_numpy(x)
    assert kernel_mean(xt, xt, 0.005, block=4) == pytest.approx(kernel_mean(xt, xt, 0.005), rel=1e-13)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="sizes differ"):
        mmd(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="non-empty"):
        mmd(np.ones((0, 4)), np.ones((3, 4)))


def test_cmmd_is_the_published_mmd_and_needs_normalised_features():
    gen, real = unit_rows(25, 8, 11, shift=0.4), unit_rows(30, 8, 12)
    assert cmmd(gen, real) == pytest.approx(mmd_published_formula(real, gen), rel=1e-9)
    with pytest.raises(ValueError, match="L2-normalised"):
        cmmd(gen * 3, real)


# ----------------------------------------------------------------------------------------- preprocessing
def unnormalise(x):
    return x * CLIP_STD + CLIP_MEAN


def test_preprocess_centre_crops_to_a_square():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:50] = (0, 200, 0)
    img[:, 50:] = (0, 0, 255)
    out = cmmd_preprocess(img, size=24)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(unnormalise(out), np.broadcast_to([0, 200 / 255, 0], (24, 24, 3)), atol=1e-6)
    tall = cmmd_preprocess(img.transpose(1, 0, 2).copy(), size=24)  # 60 x 40: rows cropped instead
    np.testing.assert_allclose(tall, out, atol=1e-6)


def test_preprocess_is_pil_bicubic_then_clip_normalisation():
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    expect = np.asarray(Image.fromarray(img).resize((336, 336), Image.BICUBIC), np.float32) / 255
    got = cmmd_preprocess(img)
    np.testing.assert_allclose(got, (expect - CLIP_MEAN) / CLIP_STD, atol=1e-6)
    assert np.abs(got - (img.mean() / 255 - CLIP_MEAN) / CLIP_STD).max() > 0.5  # not a constant image


def test_preprocess_gray_and_dtype():
    gray = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    out = unnormalise(cmmd_preprocess(gray, size=16))
    assert np.allclose(out[..., 0], out[..., 1], atol=1e-6) and np.allclose(out[..., 0], out[..., 2], atol=1e-6)
    np.testing.assert_allclose(cmmd_preprocess(gray[:, :, None], size=16), cmmd_preprocess(gray, size=16))
    with pytest.raises(TypeError, match="uint8"):
        cmmd_preprocess(gray.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        cmmd_preprocess(np.zeros((8, 8, 4), np.uint8))
