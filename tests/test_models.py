"""Model architecture, official-checkpoint compatibility, numerics of the tokenizer, input errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_var, tiny_vqvae
from varup.base.checkpoint import CheckpointError
from varup.models.var import VAR, block_causal_bias, load_official
from varup.models.vqvae import VQVAE, VQVAEConfig, load_vqvae, phi_indices, split_tokens

DATA = Path(__file__).parent / "data"


def _ref_keys(name):
    rows = [line.split("\t") for line in (DATA / name).read_text().strip().splitlines()]
    return [(k, s) for k, s, _ in rows]


def test_official_vqvae_state_dict_matches_reference():
    sd = VQVAE().state_dict()
    ref = _ref_keys("vae_keys.txt")
    assert [k for k, _ in ref] == list(sd.keys())
    assert [s for _, s in ref] == [str(tuple(v.shape)) for v in sd.values()]
    assert sum(p.numel() for p in VQVAE().parameters()) == 108_948_355


def test_official_var_d16_state_dict_matches_reference():
    m = VAR(depth=16)
    sd = m.state_dict()
    ref = _ref_keys("var_d16_keys.txt")
    assert [k for k, _ in ref] == list(sd.keys())
    assert [s for _, s in ref] == [str(tuple(v.shape)) for v in sd.values()]
    assert sd["lvl_1L"].dtype == torch.int64
    assert m.num_params() == 310_283_520


@pytest.mark.parametrize("depth,params", [(20, 600_917_136), (24, 1_033_399_360)])
def test_official_var_parameter_counts(depth, params):
    with torch.device("meta"):
        m = VAR(depth=depth)
    assert m.num_params() == params


def test_phi_mapping_is_the_official_float64_one():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_indices(4, 4) == [0, 1, 2, 3]
    assert phi_indices(1, 4) == [0]


def test_block_causal_mask():
    m = block_causal_bias((1, 2))[0, 0]
    assert m.shape == (5, 5)
    assert torch.isinf(m[0, 1:]).all() and (m[0, 0] == 0)
    assert (m[1:, :] == 0).all()  # scale-1 tokens see scale 0 and all of scale 1


def _reference_idx(vae: VQVAE, img: torch.Tensor) -> list[torch.Tensor]:
    """Straightforward multi-scale residual quantisation written independently of the library."""
    q = vae.quantize
    f = vae.quant_conv(vae.encoder(img))
    B, C, H, W = f.shape
    rest, out = f.clone(), []
    E = q.embedding.weight
    for si, pn in enumerate(vae.patch_nums):
        last = si == len(vae.patch_nums) - 1
        z = rest if last else F.adaptive_avg_pool2d(rest, pn)
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = torch.cdist(z.double(), E.double()).argmin(1)
        h = E[idx].view(B, pn, pn, C).permute(0, 3, 1, 2)
        if not last:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = q.quant_resi[si](h)
        rest = rest - h
        out.append(idx.view(B, -1))
    return out


@torch.no_grad()
def test_tokenizer_numerics_against_direct_computation():
    vae = tiny_vqvae().eval()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    idx = vae.img_to_idxBl(img)
    ref = _reference_idx(vae, img)
    assert [t.shape for t in idx] == [(3, pn * pn) for pn in (1, 2, 3, 4)]
    for a, b in zip(idx, ref):
        assert torch.equal(a, b)
    # index maps -> image: decoder(post_quant_conv(sum_k Phi_k(up(E[idx_k]))))
    E = vae.quantize.embedding.weight
    f_hat = torch.zeros(3, 8, 4, 4)
    for si, pn in enumerate(vae.patch_nums):
        h = E[idx[si]].view(3, pn, pn, 8).permute(0, 3, 1, 2)
        if si < 3:
            h = F.interpolate(h, size=(4, 4), mode="bicubic")
        f_hat += vae.quantize.quant_resi[si](h)
    expect = vae.decoder(vae.post_quant_conv(f_hat)).clamp(-1, 1)
    torch.testing.assert_close(vae.idxBl_to_img(idx), expect, atol=1e-5, rtol=1e-5)
    # f_hat -> image, and reconstruction = decode(encode)
    torch.testing.assert_close(vae.fhat_to_img(f_hat), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.img_to_reconstructed_img(img), expect, atol=1e-5, rtol=1e-5)
    # teacher-forcing input: area-downsampled running f_hat of scales < k, at scale k's resolution
    x = vae.idxBl_to_var_input(idx)
    assert x.shape == (3, 1 + 4 + 9 + 16 - 1, 8)
    partial = torch.zeros(3, 8, 4, 4)
    pieces = []
    for si, pn in enumerate(vae.patch_nums[:-1]):
        h = F.interpolate(E[idx[si]].view(3, pn, pn, 8).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic")
        partial += vae.quantize.quant_resi[si](h)
        nxt = vae.patch_nums[si + 1]
        pieces.append(F.adaptive_avg_pool2d(partial, nxt).flatten(2).transpose(1, 2))
    torch.testing.assert_close(x, torch.cat(pieces, 1), atol=1e-5, rtol=1e-5)


def test_tokenizer_training_path_has_gradients_and_usage():
    vae = tiny_vqvae().train()
    vae.quantize.init_codebook()
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    rec, vq_loss, hits = vae(img)
    assert rec.shape == img.shape and torch.isfinite(vq_loss)
    assert hits.shape == (4, 64)
    assert hits.sum(1).tolist() == [4 * pn * pn for pn in (1, 2, 3, 4)]
    (F.mse_loss(rec, img) + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight",
                 "decoder.conv_out.weight", "quant_conv.weight"):
        g = dict(vae.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0
    assert 0 < float(vae.codebook_usage().mean()) <= 1


@pytest.mark.parametrize("source", ["latent", "scales"])
def test_dead_codes_are_reseeded_from_the_vectors_each_scale_looks_up(source):
    """reseed_from=scales shares the dead codes out over the scales, each at a distinct one of the residuals that
    scale quantizes (the 1×1 scale's are image means, which the latent pool does not contain; it has one per image,
    so it seeds at most that many and the finest scale takes the rest); latent draws every code from the encoder's
    vectors."""
    from varup.tokenizer.train import reseed_dead_codes

    vae = tiny_vqvae().train()
    vae.quantize.init_codebook()
    img = torch.rand(6, 3, 16, 16) * 2 - 1
    q = vae.quantize
    q.ema_vocab_hit_SV.fill_(0.0)
    q.ema_vocab_hit_SV[:, :4] = 10.0  # codes 0-3 alive, 60 dead
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(img))
        pools = [r.permute(0, 2, 3, 1).reshape(-1, 8).clone() for r, _, _ in q.residual_walk(f)]
    latent = f.permute(0, 2, 3, 1).reshape(-1, 8)
    assert reseed_dead_codes(vae, img, 0.03, torch.Generator().manual_seed(0), source) == 60
    E = q.embedding.weight.data
    dead = torch.arange(4, 64)
    assert [len(p) for p in pools] == [6, 24, 54, 96]  # 6 images: 1x1 ... 4x4 residuals
    shares = [60] if source == "latent" else [6, 15, 15, 24]  # 15 each, the 1x1 scale capped at its 6 vectors
    groups = [(latent, dead)] if source == "latent" else list(zip(pools, dead.split(shares)))
    for pool, codes in groups:
        dist, at = torch.cdist(E[codes], pool).min(1)  # each code sits at one vector of its pool (+1 % noise) ...
        assert (dist < 0.05 * pool.std() * 8 ** 0.5).all(), dist
        assert len(set(at.tolist())) == len(codes)  # ... and no two codes at the same vector
    if source == "scales":  # the 1x1 scale's codes are image means, not latent vectors
        first = dead[:6]
        assert torch.cdist(E[first], latent).min(1).values.min() > torch.cdist(E[first], pools[0]).min(1).values.max()
    assert (q.ema_vocab_hit_SV[:, dead] > 0).all()
    with pytest.raises(ValueError, match="reseed_from"):
        reseed_dead_codes(vae, img, 0.03, torch.Generator(), "pixels")


def test_reseed_shares_never_exceed_a_pool_unless_every_vector_is_taken():
    from varup.tokenizer.train import _reseed_shares

    assert _reseed_shares(60, [6, 24, 54, 96]) == [6, 15, 15, 24]
    assert _reseed_shares(7, [16, 64, 256, 1024]) == [2, 2, 2, 1]  # the remainder to the first pools
    assert _reseed_shares(200, [16, 64, 256, 1024]) == [16, 50, 50, 84]
    assert _reseed_shares(300, [1024]) == [300]
    assert _reseed_shares(1500, [16, 64, 256, 1024]) == [16, 64, 256, 1164]  # the finest pool then repeats vectors


def test_vqvae_save_load_roundtrip_is_exact(tmp_path):
    vae = tiny_vqvae().eval()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    p = tmp_path / "vae.pt"
    torch.save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, p)
    vae2 = load_vqvae(p)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(vae.img_to_idxBl(img), vae2.img_to_idxBl(img)))
    assert torch.equal(vae.img_to_reconstructed_img(img), vae2.img_to_reconstructed_img(img))
    assert not any(p.requires_grad for p in vae2.parameters())


def test_vqvae_accepts_official_weights_with_other_patch_nums(tmp_path):
    """The 512-px setup reuses the 256-px weights with other patch_nums: the usage buffer is replaced."""
    a = tiny_vqvae()
    p = tmp_path / "vae.pth"
    torch.save(a.state_dict(), p)  # plain state dict, like the released file
    b = load_vqvae(p, cfg=VQVAEConfig(**{**a.cfg.to_dict(), "patch_nums": (1, 2, 4)}))
    assert b.quantize.ema_vocab_hit_SV.shape == (3, 64)
    assert torch.equal(a.quantize.embedding.weight, b.quantize.embedding.weight)


@torch.no_grad()
def test_var_load_official_variants_roundtrip(tmp_path):
    m = tiny_var().eval()
    x = torch.randn(2, 29, 8)
    lab = torch.tensor([1, 4])
    ref = m(lab, x)
    variants = {
        "plain": m.state_dict(),
        "training": {"epoch": 3, "iter": 10, "trainer": {"var_wo_ddp": m.state_dict(), "config": {}}, "args": {}},
        "ddp": {f"module.{k}": v for k, v in m.state_dict().items()},
        "compiled": {"model": {f"_orig_mod.{k}": v for k, v in m.state_dict().items()}},
    }
    for name, obj in variants.items():
        p = tmp_path / f"{name}.pth"
        torch.save(obj, p)
        m2 = load_official(p).eval()  # architecture inferred from the checkpoint
        assert m2.cfg.depth == 2 and m2.num_classes == 5 and m2.patch_nums == (1, 2, 3, 4), name
        assert torch.equal(m2(lab, x), ref), name


def test_var_load_errors_name_keys_and_shapes(tmp_path):
    m = tiny_var()
    sd = m.state_dict()
    bad = dict(sd)
    bad.pop("head.bias")
    bad["extra.weight"] = torch.zeros(1)
    bad["class_emb.weight"] = torch.zeros(7, 32)
    p = tmp_path / "bad.pth"
    torch.save(bad, p)
    with pytest.raises(CheckpointError) as e:
        load_official(p, model=tiny_var())
    msg = str(e.value)
    assert "head.bias" in msg and "extra.weight" in msg and "class_emb.weight" in msg and "(7, 32)" in msg
    assert str(p) in msg
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(tmp_path / "missing.pth")
    (tmp_path / "trunc.pth").write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        load_official(tmp_path / "trunc.pth")


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    p = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, p)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official(p)


def test_class_dropout_only_in_training():
    m = tiny_var(cond_drop_rate=1.0)
    x = torch.randn(2, 29, 8)
    lab = torch.tensor([1, 2])
    m.eval()
    out_eval = m(lab, x)
    null = m(torch.tensor([5, 5]), x)
    assert not torch.allclose(out_eval, null)
    m.train()
    for b in m.blocks:
        b.drop_path.drop_prob = 0.0
    torch.testing.assert_close(m(lab, x), null)


def test_bad_inputs_give_clear_errors():
    vae = tiny_vqvae().eval()
    with pytest.raises(ValueError, match="16x16"):
        vae.img_to_idxBl(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*255"):
        vae.img_to_idxBl(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(ValueError, match="shape"):
        vae.img_to_idxBl(torch.zeros(1, 16, 16))
    toks = [torch.zeros(1, pn * pn, dtype=torch.long) for pn in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match="patch_nums"):
        vae.idxBl_to_img(toks[:3])
    with pytest.raises(ValueError, match="scale 2"):
        vae.idxBl_to_img(toks[:2] + [torch.zeros(1, 8, dtype=torch.long)] + toks[3:])
    with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
        vae.idxBl_to_img(toks[:3] + [torch.full((1, 16), 64)])
    var = tiny_var().eval()
    with pytest.raises(ValueError, match="class label out of range"):
        var(torch.tensor([6]), torch.randn(1, 29, 8))
    with pytest.raises(ValueError, match="teacher-forcing input"):
        var(torch.tensor([1]), torch.randn(1, 30, 8))
    with pytest.raises(ValueError, match="token rows"):
        split_tokens(torch.zeros(2, 31, dtype=torch.long), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="norm_groups"):
        VQVAEConfig(ch=20, norm_groups=32)
