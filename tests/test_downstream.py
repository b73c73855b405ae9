"""Downstream tasks: zero-shot out-/in-painting and editing (Figures 2/3), token-likelihood NLL and OOD AUROC (Table 3)."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import tiny_var, tiny_vqvae
from varup.base.seeding import derive_seed
from varup.models.vqvae import split_tokens
from varup.studies.editing import (
    composite,
    downstream_figure,
    edit_images,
    edit_tokens,
    keep_mask,
    masked_input,
    pixel_keep,
    run_downstream,
)
from varup.studies.ood import image_nll, ood_auroc, run_ood
from varup.tokenizer.tokens import TokenCache, encode_split, write_meta

PN = (1, 2, 3, 4)
V = 64
L = sum(p * p for p in PN)
CLASSES = ["a", "b", "c", "d"]
EDIT_KW = dict(n_samples=2, seed=5, cfg=2.0, top_k=0, top_p=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models():
    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    var = tiny_var(num_classes=4).eval()
    var.head.weight.data.normal_(0, 0.3)  # sharper, class-dependent logits than the 0.02-scaled head init
    return vae, var


def rand_tokens(B: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, pn * pn), generator=g) for pn in PN]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizer, an ID token cache (train/val of random images, 4 classes), an OOD cache (split 'ood' of uniformly
    random token maps), a model trained a little on the ID train split, and an untrained one."""
    d = tmp_path_factory.mktemp("downstream")
    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    torch.save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, d / "vqvae.pt")
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    labels = [i % 4 for i in range(64)]
    splits = {"train": encode_split(vae, lambda i, v: imgs[i], labels, d / "id", "train", batch_size=32),
              "val": encode_split(vae, lambda i, v: imgs[i].flip(-1), labels, d / "id", "val", batch_size=32)}
    write_meta(d / "id", vae, splits, CLASSES)
    (d / "ood").mkdir()
    rng = np.random.default_rng(1)
    np.save(d / "ood" / "ood_tokens.npy", rng.integers(0, V, (40, L)).astype(np.uint16))
    np.save(d / "ood" / "ood_labels.npy", np.zeros(40, np.int64))
    write_meta(d / "ood", vae, {"ood": {"rows": 40, "images": 40, "variants": [{}]}}, ["ood"])

    train = TokenCache(d / "id", "train")
    tok = torch.from_numpy(train.tokens.astype(np.int64))
    lab = torch.from_numpy(train.labels)
    var = tiny_var(num_classes=4)
    torch.save({"model": var.state_dict(), "config": var.cfg.to_dict()}, d / "untrained.pt")
    var.train()
    torch.manual_seed(0)
    x_all = vae.idxBl_to_var_input(split_tokens(tok, PN))
    params = list(var.parameters())
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    for step in range(1, 7):  # a few full-batch Adam steps (by hand: torch.optim imports torch._dynamo, ~3 s)
        loss = F.cross_entropy(var(lab, x_all).reshape(-1, V), tok.reshape(-1))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gr, a, b in zip(params, grads, m1, m2):
                a.mul_(0.9).add_(gr, alpha=0.1)
                b.mul_(0.99).addcmul_(gr, gr, value=0.01)
                p.sub_(3e-3 * (a / (1 - 0.9**step)) / ((b / (1 - 0.99**step)).sqrt() + 1e-8))
    torch.save({"model": var.state_dict(), "config": var.cfg.to_dict()}, d / "trained.pt")
    return d


# ------------------------------------------------------------------------------------------------ editing
@pytest.mark.parametrize("task", ["outpaint", "inpaint", "edit"])
def test_edit_keeps_exactly_the_masked_tokens_and_regenerates_the_rest(models, task):
    vae, var = models
    B = 3
    tokens = rand_tokens(B)
    box = (0.25, 0.25, 0.75, 0.75)
    res = edit_tokens(var, vae, tokens, torch.tensor([0, 1, 2]), task, box=box, **EDIT_KW)
    # the last-scale keep mask is exactly the box (out-painting) or its complement (in-painting / editing)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 1:3] = True
    expect = inside if task == "outpaint" else ~inside
    assert torch.equal(res.masks[-1].view(4, 4), expect)
    assert torch.equal(res.keep.bool(), expect)
    assert res.masks[0].all()  # the 1x1 scale is always forced (official)
    for si, (m, t_in, t_out) in enumerate(zip(res.masks, tokens, res.tokens)):
        assert t_out.shape == (B, 2, PN[si] ** 2)
        assert torch.equal(t_out[:, :, m], t_in[:, None, m].expand(-1, 2, -1)), f"scale {si}: kept tokens changed"
    last_m, last_in, last_out = res.masks[-1], tokens[-1], res.tokens[-1]
    same = (last_out[:, :, ~last_m] == last_in[:, None, ~last_m]).float().mean()
    assert same < 0.3, f"regenerated tokens equal the input too often ({same:.2f})"
    # the two samples of an image differ (different generators)
    assert not torch.equal(last_out[:, 0], last_out[:, 1])
    # labels: the null class for out-/in-painting, the next class for editing
    expect_labels = [4, 4, 4] if task != "edit" else [1, 2, 3]
    assert res.labels.tolist() == expect_labels
    # decoded images: the decoding of the returned tokens in the edited cells, the input's decoding elsewhere
    assert res.images.shape == (B, 2, 3, 16, 16) and 0 <= res.images.min() and res.images.max() <= 1
    flat = [t.reshape(B * 2, -1) for t in res.tokens]
    dec = vae.idxBl_to_img(flat).add(1).mul(0.5).clamp(0, 1).reshape(B, 2, 3, 16, 16)
    kept = expect.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 4 x 4 pixels per latent cell
    assert torch.allclose(dec[..., ~kept], res.images[..., ~kept], atol=1e-4)
    inp = vae.idxBl_to_img(tokens).add(1).mul(0.5).clamp(0, 1)
    assert torch.allclose(res.images[..., kept], inp[:, None].expand(-1, 2, -1, -1, -1)[..., kept], atol=1e-5)


@pytest.mark.parametrize("task,box,cells", [
    ("inpaint", (0.3, 0.3, 0.7, 0.7), (1, 1, 3, 3)),       # snapped to the latent cells: pixels 4..12
    ("edit", (0.2, 0.35, 0.6, 0.9), (1, 1, 2, 4)),         # rows round(0.8)..round(2.4), cols round(1.4)..round(3.6)
    ("outpaint", (0.25, 0.0, 0.75, 0.5), (1, 0, 3, 2)),
])
def test_edit_leaves_every_pixel_outside_the_edited_cells_exactly_as_the_input(models, task, box, cells):
    vae, var = models
    B = 2
    tokens = rand_tokens(B, seed=8)
    photo = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # any image, not a decoding
    res = edit_tokens(var, vae, tokens, torch.tensor([0, 3]), task, box=box, input_images=photo, **EDIT_KW)
    y0, x0, y1, x1 = (4 * c for c in cells)
    box_px = torch.zeros(16, 16, dtype=torch.bool)
    box_px[y0:y1, x0:x1] = True
    unchanged = box_px if task == "outpaint" else ~box_px
    assert torch.equal(pixel_keep(res.keep, 16, 16), unchanged)
    expected = photo[:, None].expand(-1, 2, -1, -1, -1)
    assert torch.equal(res.images[..., unchanged], expected[..., unchanged])  # exactly, pixel for pixel
    assert (res.images[..., ~unchanged] - expected[..., ~unchanged]).abs().mean() > 0.05  # the edit happened
    # without the composite, the decoder alone would have changed the kept pixels
    flat = [t.reshape(B * 2, -1) for t in res.tokens]
    raw = vae.idxBl_to_img(flat).add(1).mul(0.5).clamp(0, 1).reshape(B, 2, 3, 16, 16)
    own = vae.idxBl_to_img(tokens).add(1).mul(0.5).clamp(0, 1)[:, None]
    assert (raw - own).abs()[..., unchanged].max() > 1e-3
    with pytest.raises(ValueError, match="input_images"):
        edit_tokens(var, vae, tokens, torch.tensor([0, 3]), task, box=box, input_images=photo[:1], **EDIT_KW)


def test_composite_takes_the_input_in_the_kept_cells():
    keep = keep_mask(PN, "inpaint", (0.5, 0.5, 1.0, 1.0))  # regenerate the bottom-right quarter
    inputs, samples = torch.zeros(1, 3, 16, 16), torch.ones(1, 2, 3, 16, 16)
    out = composite(inputs, samples, keep)
    assert out[..., 8:, 8:].eq(1).all() and out[..., :8, :].eq(0).all() and out[..., :, :8].eq(0).all()


def test_edit_target_labels_and_validation(models):
    vae, var = models
    tokens = rand_tokens(2)
    res = edit_tokens(var, vae, tokens, None, "edit", box=(0.3, 0.3, 0.7, 0.7), target_labels=[3, 0], **EDIT_KW)
    assert res.labels.tolist() == [3, 0]
    assert edit_tokens(var, vae, tokens, None, "edit", box=(0.3, 0.3, 0.7, 0.7), target_labels=2,
                       **EDIT_KW).labels.tolist() == [2, 2]
    with pytest.raises(ValueError, match="target_labels"):
        edit_tokens(var, vae, tokens, None, "edit", box=(0.3, 0.3, 0.7, 0.7), **EDIT_KW)
    with pytest.raises(ValueError, match="target_labels must be in"):
        edit_tokens(var, vae, tokens, None, "edit", box=(0.3, 0.3, 0.7, 0.7), target_labels=[4, 0], **EDIT_KW)
    with pytest.raises(ValueError, match="unknown task"):
        edit_tokens(var, vae, tokens, None, "colorize", box=(0.3, 0.3, 0.7, 0.7), **EDIT_KW)
    with pytest.raises(ValueError, match="box"):
        edit_tokens(var, vae, tokens, None, "inpaint", box=(0.7, 0.3, 0.3, 0.7), **EDIT_KW)


def test_edit_is_deterministic_and_seeded_per_image_and_sample(models):
    vae, var = models
    tokens = rand_tokens(2, seed=3)
    kw = dict(box=(0.25, 0.25, 0.75, 0.75), n_samples=2, cfg=1.5, top_k=20, top_p=0.9)
    a = edit_images(var, vae, tokens, None, "outpaint", seed=7, **kw)
    b = edit_images(var, vae, tokens, None, "outpaint", seed=7, **kw)
    c = edit_images(var, vae, tokens, None, "outpaint", seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # image 1's samples depend only on (seed, task, its id, j), not on the other images of the call
    r = edit_tokens(var, vae, tokens, None, "outpaint", seed=7, image_ids=[10, 11], **kw)
    r1 = edit_tokens(var, vae, [t[1:] for t in tokens], None, "outpaint", seed=7, image_ids=[11], **kw)
    assert r.seeds[1] == r1.seeds[0] == [derive_seed(7, "outpaint", 11, j) for j in range(2)]
    assert torch.equal(r.images[1], r1.images[0])
    assert all(torch.equal(x[1], y[0]) for x, y in zip(r.tokens, r1.tokens))


def test_masked_input_keeps_the_kept_region_and_dims_the_rest():
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    keep = keep_mask(PN, "outpaint", (0.25, 0.25, 0.75, 0.75))
    out = masked_input(img, keep)
    assert torch.equal(out[:, :, 4:12, 4:12], img[:, :, 4:12, 4:12])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    assert (out - img).abs()[:, :, outside].mean() > 0.1


def test_downstream_figure_same_model_twice_gives_identical_columns(models, tmp_path):
    vae, var = models
    B, n = 2, 2
    tokens = rand_tokens(B, seed=4)
    inputs = vae.idxBl_to_img(tokens).add(1).mul(0.5)
    other = copy.deepcopy(var)
    other.head.weight.data.normal_(0, 0.3)
    res = downstream_figure({"ours": var, "baseline": var, "other": other}, vae, tokens, None, inputs, "inpaint",
                            tmp_path, "fig", box=(0.3, 0.3, 0.7, 0.7), n_samples=n, seed=1, cfg=2.0, top_k=0, top_p=0)
    assert torch.equal(res["samples"]["ours"], res["samples"]["baseline"])
    assert not torch.equal(res["samples"]["ours"], res["samples"]["other"])
    # the figure files: one row per image, 1 + n_samples * methods columns
    cols = 1 + n * 3
    grid = res["grid"]
    H = W = 16
    gap = 4
    assert grid.shape == (B * (H + 2) + 2, cols * (W + 2) + 2 + gap * 3, 3)
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.pdf").read_bytes()[:4] == b"%PDF"
    w, h = Image.open(tmp_path / "fig.png").size
    grid_ratio = grid.shape[1] / grid.shape[0]
    assert 0.7 * grid_ratio < w / h < 1.15 * grid_ratio, (w, h, grid.shape)
    # the grid's input column is the shown (masked) input; sample cells are the samples
    assert np.array_equal(grid[2:2 + H, 2:2 + W], res["inputs"][0])
    x0 = 2 + (W + 2) + gap
    first = (res["samples"]["ours"][0, 0].permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(grid[2:2 + H, x0:x0 + W], first)


def test_run_downstream_writes_figures_and_summary(assets, tmp_path):
    out = tmp_path / "figs"
    s = run_downstream({"ours": assets / "trained.pt", "baseline": assets / "untrained.pt"}, assets / "vqvae.pt",
                       assets / "id", None, out, dataset_name="toy", n_images=3, n_samples=1, seed=2, top_k=0,
                       top_p=0.0)
    for task in ("outpaint", "inpaint", "edit"):
        assert (out / f"downstream_toy_{task}.png").exists() and (out / f"downstream_toy_{task}.pdf").exists()
    on_disk = json.loads((out / "downstream_toy.json").read_text())
    assert on_disk["images"] == s["images"]
    val = TokenCache(assets / "id", "val")
    rows = s["images"]["rows"]
    assert rows == [0, 1, 2] and [int(val.labels[r]) for r in rows] == s["images"]["labels"] == [0, 1, 2]
    assert s["tasks"]["edit"]["labels_used"] == [1, 2, 3]
    assert s["tasks"]["outpaint"]["labels_used"] == [4, 4, 4]
    assert s["tasks"]["inpaint"]["seeds"][1] == [derive_seed(2, "inpaint", 1, 0)]
    assert s["tasks"]["outpaint"]["box_yxyx"] == [0.25, 0.25, 0.75, 0.75]
    assert s["tasks"]["edit"]["box_yxyx"] == [0.3, 0.3, 0.7, 0.7]
    assert s["tasks"]["edit"]["box_cells_yxyx"] == [0.25, 0.25, 0.75, 0.75]  # the cells regenerated (p = 4)


# ------------------------------------------------------------------------------------------------ NLL / OOD
def direct_nll(var, vae, tok: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = var(cls, vae.idxBl_to_var_input(split_tokens(tok, PN))).double()
    return -logits.log_softmax(-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # (N, L)


@pytest.mark.parametrize("mode", ["label", "null"])
def test_image_nll_matches_a_direct_computation(models, mode):
    vae, var = models
    N = 7
    tok = torch.cat(rand_tokens(N, seed=9), 1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    r = image_nll(var, vae, tok.numpy().astype(np.uint16), labels.numpy(), batch_size=3, class_mode=mode)
    cls = labels if mode == "label" else torch.full((N,), 4)
    ref = direct_nll(var, vae, tok, cls)
    np.testing.assert_allclose(r["nll_per_token"], ref.mean(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(r["nll_total"], r["nll_per_token"] * L, rtol=1e-12)
    np.testing.assert_allclose(r["nll_total"], ref.sum(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(r["bits_per_token"], r["nll_per_token"] / math.log(2), rtol=1e-12)
    np.testing.assert_allclose(r["nll_per_scale"][:, -1], ref[:, -16:].mean(1).numpy(), rtol=1e-5)
    assert r["nll_per_token"].dtype == np.float64 and r["class_used"].tolist() == cls.tolist()


def test_image_nll_modes_differ_and_max_is_the_best_class(models):
    vae, var = models
    N = 5
    tok = torch.cat(rand_tokens(N, seed=11), 1)
    labels = torch.tensor([0, 1, 2, 3, 0])
    lab = image_nll(var, vae, tok, labels, class_mode="label")["nll_total"]
    null = image_nll(var, vae, tok, None)["nll_total"]  # default: the null class
    assert np.abs(lab - null).max() > 1e-3
    per_class = torch.stack([direct_nll(var, vae, tok, torch.full((N,), c)).sum(1) for c in range(4)], 1)
    r = image_nll(var, vae, tok, None, class_mode="max", batch_size=2)
    np.testing.assert_allclose(r["nll_total"], per_class.min(1).values.numpy(), rtol=1e-5)
    assert r["class_used"].tolist() == per_class.argmin(1).tolist()
    with pytest.raises(ValueError, match="needs labels"):
        image_nll(var, vae, tok, None, class_mode="label")
    with pytest.raises(ValueError, match="class_mode"):
        image_nll(var, vae, tok, None, class_mode="best")


def test_image_nll_restores_training_mode_and_ignores_class_dropout(models):
    vae, var = models
    tok = torch.cat(rand_tokens(4, seed=2), 1)
    net = copy.deepcopy(var).train()
    net.cond_drop_rate = 0.9
    a = image_nll(net, vae, tok, torch.tensor([0, 1, 2, 3]), class_mode="label")["nll_total"]
    b = image_nll(net, vae, tok, torch.tensor([0, 1, 2, 3]), class_mode="label")["nll_total"]
    assert np.array_equal(a, b) and net.training


def test_ood_auroc():
    ind = np.array([1.0, 2.0, 3.0])
    assert ood_auroc(ind, ind + 10) == 1.0
    assert ood_auroc(ind + 10, ind) == 0.0
    assert ood_auroc(ind, ind) == 0.5
    assert ood_auroc([1.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ood_auroc([], [1.0])


def test_run_ood_detects_random_token_maps(assets, tmp_path):
    out = tmp_path / "ood.json"
    r = run_ood(assets / "trained.pt", assets / "vqvae.pt", assets / "id", assets / "ood", out, max_images=32)
    on_disk = json.loads(out.read_text())
    assert on_disk["auroc"] == r["auroc"] and r["class_mode"] == "null"
    assert r["id"]["n"] == 32 and r["ood"]["n"] == 32
    assert r["id"]["mean_nll_per_token"] < r["ood"]["mean_nll_per_token"]
    assert r["auroc"] > 0.9
    assert r["id"]["mean_nll_total"] == pytest.approx(r["id"]["mean_nll_per_token"] * L)
    assert (tmp_path / "ood.json.prov.json").exists()
    with pytest.raises(ValueError, match="class_mode"):
        run_ood(assets / "trained.pt", assets / "vqvae.pt", assets / "id", assets / "ood", out, class_mode="label")
