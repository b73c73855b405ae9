"""The text-conditioned VAR (VAR-CLIP layout): strict loading of the layout the mapping claims, KV-cached sampling
equal to teacher forcing for both CFG halves, CFG with the empty caption, caption dropout, the toy text encoder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny_vqvae
from varup.base.checkpoint import CheckpointError
from varup.base.seeding import make_generator
from varup.models.textenc import ToyTextConfig, ToyTextEncoder, vocabulary
from varup.models.textvar import VARCLIP_KEY_MAP, CaptionedVAR, TextVAR, load_varclip
from varup.models.var import VAR, VARConfig
from varup.sampling.sampler import sample

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
PN = (1, 2, 3, 4)
CAPTIONS = ["a circle", "a red circle", "a circle or a square", "a square"]


def tiny_textvar(**kw) -> TextVAR:
    cfg = dict(vocab_size=64, z_channels=8, num_classes=1, depth=2, embed_dim=32, num_heads=2, patch_nums=PN,
               text_dim=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return TextVAR(VARConfig(**cfg)).init_weights(init_adaln_gamma=0.5)


def tiny_encoder() -> ToyTextEncoder:
    torch.manual_seed(1)
    return ToyTextEncoder(ToyTextConfig(vocab=vocabulary(CAPTIONS), dim=16, width=32, depth=1, heads=4)).eval()


@pytest.fixture(scope="module")
def models():
    vae = tiny_vqvae().freeze()
    vae.quantize.embedding.weight.data.normal_(0, 0.3)
    return vae, tiny_textvar().eval(), tiny_encoder()


def reference_keys(name: str) -> dict[str, str]:
    rows = [line.split("\t") for line in (REF / name).read_text().splitlines() if line.strip()]
    return {k: s for k, s, *_ in rows}


def test_d16_layout_is_the_official_one_with_class_emb_replaced_by_the_varclip_keys():
    with torch.device("meta"):
        m = TextVAR(VARConfig(depth=16, num_classes=1, text_dim=768))
    ours = {k: str(tuple(v.shape)) for k, v in m.state_dict().items()}
    official = reference_keys("var_d16_keys.txt")
    assert set(official) - set(ours) == set(VARCLIP_KEY_MAP)  # only class_emb is gone
    assert set(ours) - set(official) == set(VARCLIP_KEY_MAP["class_emb.weight"])
    assert ours["cond_proj.weight"] == "(1024, 768)" and ours["cond_proj.bias"] == "(1024,)"
    assert ours["noise.weight"] == "(1, 768)"
    assert all(ours[k] == s for k, s in official.items() if k in ours)  # every shared key has its official shape


def test_a_varclip_training_checkpoint_loads_strictly_and_infers_the_architecture(tmp_path):
    m = tiny_textvar()
    sd = {f"module.{k}" if i % 2 else k: v for i, (k, v) in enumerate(m.state_dict().items())}  # DDP prefixes
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"trainer": {"var_wo_ddp": sd}, "epoch": torch.tensor(3)}, path)
    loaded = load_varclip(path).eval()
    assert loaded.cfg.text_dim == 16 and loaded.depth == 2 and loaded.patch_nums == PN
    x = torch.randn(2, sum(p * p for p in PN) - 1, 8)
    e = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    torch.testing.assert_close(loaded(e, x), m.eval()(e, x), rtol=0, atol=0)


def test_loading_a_class_conditional_checkpoint_as_varclip_fails_and_says_why(tmp_path):
    v = VAR(VARConfig(vocab_size=64, z_channels=8, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=PN))
    torch.save(v.state_dict(), tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match="load_official"):
        load_varclip(tmp_path / "var.pth")
    bad = tiny_textvar().state_dict()
    bad.pop("noise.weight")
    bad["cond_proj.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        load_varclip(tmp_path / "bad.pth", model=tiny_textvar())


@torch.no_grad()
def test_kv_cached_sampling_equals_teacher_forcing_for_both_cfg_halves(models):
    vae, var, enc = models
    B = 3
    emb, empty = enc.encode(CAPTIONS[:B]), enc.encode([""])[0]
    tokens = [torch.randint(0, 64, (B, pn * pn)) for pn in PN]
    force = [torch.ones(B, pn * pn, dtype=torch.bool) for pn in PN]
    out = sample(var, vae, None, cfg=2.0, generator=make_generator(0, "cpu"), teacher_tokens=tokens,
                 force_masks=force, return_raw_logits=True, cond_BD=var.guided_condition(emb, empty))
    x = vae.idxBl_to_var_input(tokens)
    tf = var(torch.cat([emb, empty.expand(B, -1)]), x.repeat(2, 1, 1))  # eval: no caption dropout
    for si, (a, b) in enumerate(var.begin_ends):
        torch.testing.assert_close(out.raw_logits[si], tf[:, a:b], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_cfg_contrasts_the_caption_with_the_empty_caption(models):
    """The unconditional half is the empty caption's (or VAR-CLIP's learned null); guiding a caption by itself is
    the same as no guidance: (1+t)·l - t·l = l."""
    vae, var, enc = models
    emb, empty = enc.encode(["a circle"] * 4), enc.encode([""])[0]

    def run(cond_BD, cfg):
        return sample(var, vae, None, cfg=cfg, generator=make_generator(7, "cpu"), cond_BD=cond_BD, decode=False,
                      return_raw_logits=True)

    guided = run(var.guided_condition(emb, empty), 4.0)
    x = vae.idxBl_to_var_input(guided.tokens)
    last = var.begin_ends[-1]
    torch.testing.assert_close(guided.raw_logits[-1][4:], var(empty.expand(4, -1), x)[:, last[0]:last[1]],
                               atol=2e-5, rtol=1e-5)
    assert not torch.allclose(guided.raw_logits[-1][:4], guided.raw_logits[-1][4:])  # "" is not "a circle"
    plain = torch.cat(run(var.guided_condition(emb, empty), 0.0).tokens, 1)
    assert torch.equal(plain, torch.cat(run(var.guided_condition(emb, emb[0]), 4.0).tokens, 1))
    learned = var.guided_condition(emb)  # VAR-CLIP's learned null vector
    torch.testing.assert_close(learned[4:], var.text_condition(var.noise.weight.expand(4, -1)))


def test_caption_dropout_uses_the_null_condition_in_training_only(models):
    vae, _, enc = models
    var = tiny_textvar(cond_drop_rate=1.0, drop_path_rate=0.0)
    x = torch.randn(2, sum(p * p for p in PN) - 1, 8)
    emb, empty = enc.encode(["a circle", "a square"]), enc.encode([""])[0]
    with torch.no_grad():
        train_out = var.train()(emb, x, null_E=empty)
        as_empty = var.eval()(empty.expand(2, -1), x)
        as_caption = var(emb, x)
    torch.testing.assert_close(train_out, as_empty)  # every caption dropped to ""
    assert not torch.allclose(as_caption, as_empty)


def test_toy_encoder_is_normalised_order_aware_and_names_unknown_words():
    enc = tiny_encoder()
    with torch.no_grad():
        e = enc.encode(["a circle or a square", "a square or a circle", ""])
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert not torch.allclose(e[0], e[1])  # positions matter (a transformer, not a bag of words)
    with pytest.raises(ValueError, match="triangle"):
        enc.encode(["a triangle"])


def test_captioned_var_trains_the_encoder_and_the_generator_together(models):
    vae, _, _ = models
    var, enc = tiny_textvar(), tiny_encoder().train()
    net = CaptionedVAR(var, CAPTIONS, encoder=enc)
    x = vae.idxBl_to_var_input([torch.randint(0, 64, (2, pn * pn)) for pn in PN])
    net(torch.tensor([0, 2]), x).logsumexp(-1).mean().backward()
    assert enc.tok_emb.weight.grad is not None and enc.tok_emb.weight.grad.abs().sum() > 0
    assert var.cond_proj.weight.grad.abs().sum() > 0
    frozen = CaptionedVAR(tiny_textvar(), CAPTIONS, table=torch.randn(4, 16), empty=torch.zeros(16),
                          null_condition="learned")
    emb, null = frozen.embed(torch.tensor([3, 1]))
    assert torch.equal(emb, frozen.caption_emb[[3, 1]]) and torch.equal(null, torch.zeros(16))
    with pytest.raises(ValueError, match="null_condition"):
        CaptionedVAR(tiny_textvar(), CAPTIONS, encoder=enc, null_condition="zeros")


@pytest.mark.parametrize("null_condition, cond_drop_rate, trained", [
    ("empty_caption", 0.1, False), ("learned", 0.1, True), ("learned", 0.0, False)])
def test_the_learned_null_is_frozen_where_training_never_uses_it_and_still_saved(tmp_path, null_condition,
                                                                                 cond_drop_rate, trained):
    """Trained only with null_condition learned and caption dropout; frozen, it still loads and saves strictly
    with VAR-CLIP's layout (noise.weight is in the released weights)."""
    net = CaptionedVAR(tiny_textvar(cond_drop_rate=cond_drop_rate), CAPTIONS, encoder=tiny_encoder(),
                       null_condition=null_condition)
    assert net.var.noise.weight.requires_grad is trained and net.trains_learned_null is trained
    assert all(p.requires_grad for n, p in net.named_parameters() if n != "var.noise.weight")
    torch.save(net.var.state_dict(), tmp_path / "varclip.pth")
    loaded = load_varclip(tmp_path / "varclip.pth", model=CaptionedVAR(
        tiny_textvar(cond_drop_rate=cond_drop_rate), CAPTIONS, encoder=tiny_encoder(), null_condition=null_condition).var)
    assert torch.equal(loaded.noise.weight, net.var.noise.weight)
    assert loaded.noise.weight.requires_grad is trained  # loading keeps the freeze
