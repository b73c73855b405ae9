"""Multi-scale residual VQVAE, state-dict compatible with FoundationVision/VAR's ``vae_ch160v4096z32.pth``.

The architecture is the LDM vq-f16 encoder/decoder (GroupNorm + SiLU ResNet blocks, single-head
self-attention with a fused ``qkv`` 1x1 conv at the lowest resolution and in the mid block) around a
multi-scale residual quantiser with a shared codebook and the partially shared Phi convolutions.
Every layer keeps the official module names, so an official state dict loads with ``strict=True``
and gives the same numbers (same float32 op order in the quantiser, the same float64 Phi selection).

The same class scales down (channels, levels, codebook, patch_nums) for the toy experiment and can be
trained from scratch (:meth:`VQVAE.forward` returns the straight-through reconstruction, the
commitment loss and per-scale codebook usage), which the official repository cannot do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from varup.base.checkpoint import extract_state_dict, load_strict, read_checkpoint
from varup.models.common import check_image_batch, check_token_maps


# --------------------------------------------------------------------------------------------------
# configuration
@dataclass
class VQVAEConfig:
    """Hyper-parameters of :class:`VQVAE`. Defaults are the official 256 px tokenizer."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25  # commitment weight
    quant_resi: float = 0.5  # Phi residual ratio
    share_quant_resi: int = 4  # number of Phi convs shared across scales
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    norm_groups: int = 32
    in_channels: int = 3
    using_sa: bool = True  # self-attention at the lowest resolution
    using_mid_sa: bool = True  # self-attention in the mid block

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        problems = []
        if self.vocab_size < 2:
            problems.append(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not self.patch_nums or list(self.patch_nums) != sorted(set(self.patch_nums)):
            problems.append(f"patch_nums must be strictly increasing, got {self.patch_nums}")
        if self.share_quant_resi < 1:
            problems.append(f"share_quant_resi must be >= 1, got {self.share_quant_resi}")
        for c in {self.ch * m for m in self.ch_mult}:
            if c % self.norm_groups:
                problems.append(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")
        if problems:
            raise ValueError("invalid VQVAE config: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        """Image side length whose latent grid equals the last patch_num."""
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["patch_nums"] = list(self.patch_nums)
        return d


OFFICIAL_VQVAE = VQVAEConfig()


# --------------------------------------------------------------------------------------------------
# building blocks (module names follow the official checkpoint)
def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=c, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused qkv 1x1 conv (official layout)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.C = c
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, kernel_size=1)
        self.w_ratio = int(c) ** (-0.5)
        self.proj_out = nn.Conv2d(c, c, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        C = self.C
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        q = q.view(B, C, H * W).permute(0, 2, 1).contiguous()  # (B, HW, C)
        k = k.view(B, C, H * W).contiguous()  # (B, C, HW)
        w = torch.bmm(q, k).mul_(self.w_ratio)  # (B, HW, HW), w[b, i, j] = q_i . k_j
        w = F.softmax(w, dim=2)
        v = v.view(B, C, H * W).contiguous()
        h = torch.bmm(v, w.permute(0, 2, 1).contiguous()).view(B, C, H, W)
        return x + self.proj_out(h)


class _Level(nn.Module):
    """One resolution level; attribute names give the keys ``block.i``, ``attn.i``, ``downsample``/``upsample``."""


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, g = cfg.ch, cfg.norm_groups
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_mult[i_level], ch * cfg.ch_mult[i_level]
            level = _Level()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(self.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(block_in, g))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, g = cfg.ch, cfg.norm_groups
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        block_in = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g) if cfg.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, g)
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * cfg.ch_mult[i_level]
            level = _Level()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(self.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(block_in, g))
            if i_level != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)  # up[0] is the highest resolution, as in the checkpoint
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# quantiser
class Phi(nn.Conv2d):
    """Residual 3x3 conv applied to each scale's upsampled code map: ``h*(1-r) + conv(h)*r``."""

    def __init__(self, c: int, quant_resi: float):
        super().__init__(c, c, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def phi_indices(num_scales: int, num_phi: int) -> list[int]:
    """Which Phi each scale uses, computed exactly as the official code does (numpy float64).

    The ticks are ``linspace(1/3/K, 1-1/3/K, K)`` for K=4 (the official default) and
    ``linspace(1/2/K, 1-1/2/K, K)`` otherwise; scale ``si`` takes the tick nearest ``si/(SN-1)``.
    For SN=10, K=4 this is [0,0,1,1,1,2,2,3,3,3]; scales 2 and 7 are exact ties in real arithmetic that
    the float64 rounding breaks, so the computation must stay in numpy float64.
    """
    if num_phi == 4:
        ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    else:
        ticks = np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(int(np.argmin(np.abs(ticks - at)).item()))
    return out


class PhiPartiallyShared(nn.Module):
    def __init__(self, c: int, quant_resi: float, num_phi: int, num_scales: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(c, quant_resi) for _ in range(num_phi)])
        self.scale_to_phi = phi_indices(num_scales, num_phi)

    def __getitem__(self, si: int) -> Phi:
        return self.qresi_ls[self.scale_to_phi[si]]


class MultiScaleQuantizer(nn.Module):
    """The official ``VectorQuantizer2`` (keys ``quantize.*``): shared codebook, residual quantisation
    over ``patch_nums``, area downsampling and bicubic upsampling, Phi after upsampling."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.Cvae = cfg.z_channels
        self.patch_nums = tuple(cfg.patch_nums)
        self.beta = cfg.beta
        self.register_buffer("ema_vocab_hit_SV", torch.full((len(self.patch_nums), self.vocab_size), fill_value=0.0))
        self.record_hit = 0
        self.quant_resi = PhiPartiallyShared(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi, len(self.patch_nums))
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)

    def init_codebook(self, std: float | None = None) -> None:
        """Uniform init in [-1/V, 1/V] like most VQ-VAEs (used when training from scratch)."""
        if std is None:
            nn.init.uniform_(self.embedding.weight, -1.0 / self.vocab_size, 1.0 / self.vocab_size)
        else:
            nn.init.trunc_normal_(self.embedding.weight, std=std)

    # -- nearest code, float32, official op order ------------------------------------------------
    def _nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        E = self.embedding.weight.data
        d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E.square(), dim=1, keepdim=False)
        d.addmm_(z_NC, E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def _up(self, h: torch.Tensor, si: int, H: int, W: int, contiguous: bool = False) -> torch.Tensor:
        """Phi(bicubic upsampling of scale si's code map); no upsampling at the last scale.

        ``contiguous=True`` reproduces the encoder path, where the official code makes the (channels-last)
        code map contiguous after upsampling; the decoding paths do not, and the memory format changes the
        float result of the conv, so both variants are kept to stay bit-identical.
        """
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        if contiguous:
            h = h.contiguous()
        return self.quant_resi[si](h)

    def _code_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    # -- training / reconstruction ---------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor, track_usage: bool = True):
        """Straight-through quantisation for tokenizer training.

        Returns ``(f_hat, vq_loss, hits)`` where ``hits`` is (SN, V) code counts of this batch.
        """
        dtype = f_BChw.dtype
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        SN = len(self.patch_nums)
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        hits = torch.zeros(SN, self.vocab_size, device=f_BChw.device)
        vq_loss = f_BChw.new_zeros(())
        for si, pn in enumerate(self.patch_nums):
            rest = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            idx_N = self._nearest(rest.permute(0, 2, 3, 1).reshape(-1, C))
            hits[si] = idx_N.bincount(minlength=self.vocab_size).float()
            h = self._up(self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si, H, W, contiguous=True)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq_loss = vq_loss + F.mse_loss(f_hat.data, f_BChw).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
        vq_loss = vq_loss / SN
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.training:
            torch.distributed.all_reduce(hits)
        if track_usage and self.training:
            with torch.no_grad():
                if self.record_hit == 0:
                    self.ema_vocab_hit_SV.copy_(hits)
                elif self.record_hit < 100:
                    self.ema_vocab_hit_SV.mul_(0.9).add_(hits.mul(0.1))
                else:
                    self.ema_vocab_hit_SV.mul_(0.99).add_(hits.mul(0.01))
                self.record_hit += 1
        f_hat = (f_hat.data - f_no_grad).add_(f_BChw)  # straight-through estimator
        return f_hat.to(dtype), vq_loss, hits

    # -- inference helpers (all float32, official semantics) --------------------------------------
    @torch.no_grad()
    def residual_walk(self, f_BChw: torch.Tensor):
        """The official encoding loop, one scale at a time: yields ``(rest, idx_N, f_hat)`` where ``rest`` is the
        (B, C, pn, pn) residual that scale looks up in the codebook, ``idx_N`` its codes and ``f_hat`` the running
        sum (updated in place: clone it to keep it)."""
        B, C, H, W = f_BChw.shape
        SN = len(self.patch_nums)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        for si, pn in enumerate(self.patch_nums):
            rest = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            idx_N = self._nearest(rest.permute(0, 2, 3, 1).reshape(-1, C))
            h = self._up(self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2), si, H, W, contiguous=True)
            f_hat.add_(h)
            yield (rest.clone() if si == SN - 1 else rest), idx_N, f_hat
            f_rest.sub_(h)

    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        B = f_BChw.shape[0]
        return [f_hat.clone() if to_fhat else idx_N.reshape(B, -1) for _, idx_N, f_hat in self.residual_walk(f_BChw)]

    @torch.no_grad()
    def idxBl_to_fhat(self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: bool = True):
        """Sum of Phi(upsampled code maps). ``same_shape=False`` is the official 'experimental' path."""
        SN = len(self.patch_nums)
        B = idx_Bl[0].shape[0]
        H = W = self.patch_nums[-1]
        outs = []
        if same_shape:
            f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W)
            for si, pn in enumerate(self.patch_nums):
                f_hat.add_(self._up(self._code_map(idx_Bl[si], pn), si, H, W))
                outs.append(f_hat.clone())
        else:
            pn0 = self.patch_nums[0]
            f_hat = self.embedding.weight.new_zeros(B, self.Cvae, pn0, pn0)
            for si, pn in enumerate(self.patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                h = self.quant_resi[si](self._code_map(idx_Bl[si], pn))
                f_hat.add_(h)
                outs.append(f_hat if si == SN - 1 else f_hat.clone())
        return outs[-1] if last_one else outs

    @torch.no_grad()
    def idxBl_to_var_input(self, gt_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the transformer: (B, L - 1, Cvae) from the ground-truth index maps."""
        B = gt_idx_Bl[0].shape[0]
        SN = len(self.patch_nums)
        H = W = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W)
        nxt = []
        for si in range(SN - 1):
            pn, pn_next = self.patch_nums[si], self.patch_nums[si + 1]
            f_hat.add_(self._up(self._code_map(gt_idx_Bl[si], pn), si, H, W))
            nxt.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, self.Cvae, -1).transpose(1, 2))
        if not nxt:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(nxt, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """Sampling step: add scale ``si``'s code map to f_hat; return (f_hat, next scale's input map)."""
        H = W = self.patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.quant_resi[si](F.interpolate(h_BChw, size=(H, W), mode="bicubic")))
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat.add_(self.quant_resi[si](h_BChw))
        return f_hat, f_hat


# --------------------------------------------------------------------------------------------------
class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VQVAEConfig(**overrides)
        self.cfg = cfg
        self.V, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, stride=1, padding=1)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.cfg.patch_nums

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    def freeze(self) -> "VQVAE":
        """Inference mode as the official ``test_mode=True``: eval() and no gradients."""
        self.eval()
        self.requires_grad_(False)
        return self

    # -- training --------------------------------------------------------------------------------
    def forward(self, img: torch.Tensor):
        """img in [-1, 1] -> (reconstruction, vq_loss, hits) with a straight-through quantiser."""
        f = self.quant_conv(self.encoder(img))
        f_hat, vq_loss, hits = self.quantize(f)
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, hits

    # -- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        """img (B,3,R,R) in [-1,1] -> list of SN LongTensors (B, pn*pn), row-major."""
        check_image_batch(img, self.resolution, name="img_to_idxBl input")
        return self.quantize.f_to_idxBl_or_fhat(self.quant_conv(self.encoder(img)), to_fhat=False)

    @torch.no_grad()
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    @torch.no_grad()
    def idxBl_to_img(self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: bool = True):
        check_token_maps(idx_Bl, self.patch_nums, self.V)
        f = self.quantize.idxBl_to_fhat(idx_Bl, same_shape=same_shape, last_one=last_one)
        if last_one:
            return self.fhat_to_img(f)
        return [self.fhat_to_img(x) for x in f]

    @torch.no_grad()
    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        check_token_maps(idx_Bl, self.patch_nums, self.V)
        return self.quantize.idxBl_to_var_input(idx_Bl)

    @torch.no_grad()
    def img_to_reconstructed_img(self, img: torch.Tensor, last_one: bool = True):
        check_image_batch(img, self.resolution, name="img_to_reconstructed_img input")
        fs = self.quantize.f_to_idxBl_or_fhat(self.quant_conv(self.encoder(img)), to_fhat=True)
        if last_one:
            return self.fhat_to_img(fs[-1])
        return [self.fhat_to_img(f) for f in fs]

    # -- checkpoints -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As the official override: a checkpoint whose ``ema_vocab_hit_SV`` has another number of scales
        (the same weights serve other ``patch_nums``) keeps this model's own usage buffer."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def codebook_usage(self) -> torch.Tensor:
        """Fraction of codes hit per scale (from the EMA hit counts)."""
        return (self.quantize.ema_vocab_hit_SV > 0).float().mean(dim=1)


def load_vqvae(path, cfg: VQVAEConfig | None = None, map_location="cpu") -> VQVAE:
    """Load a tokenizer strictly: the official ``vae_ch160v4096z32.pth`` (default config) or one of ours.

    varup checkpoints carry their config (``{'model': state_dict, 'config': {...}}``) and need no ``cfg``.
    ``torch.load(weights_only=True)``; the model is returned frozen (eval, no grad).
    """
    obj = read_checkpoint(path, map_location)
    if cfg is None:
        cfg = VQVAEConfig(**obj["config"]) if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else VQVAEConfig()
    sd = extract_state_dict(obj, str(path))
    model = VQVAE(cfg)
    key = "quantize.ema_vocab_hit_SV"
    if key in sd and sd[key].shape[0] != len(cfg.patch_nums):  # same weights, other patch_nums (official override)
        sd[key] = model.quantize.ema_vocab_hit_SV.clone()
    load_strict(model, sd, str(path))
    return model.freeze()


def num_tokens(patch_nums: Sequence[int]) -> int:
    return int(sum(p * p for p in patch_nums))


def tokens_per_scale(patch_nums: Sequence[int]) -> list[int]:
    return [p * p for p in patch_nums]


def split_tokens(tokens_BL: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """(B, L) flat token rows -> list of (B, pn*pn) per scale."""
    L = num_tokens(patch_nums)
    if tokens_BL.ndim != 2 or tokens_BL.shape[1] != L:
        raise ValueError(f"token rows must have shape (B, {L}) for patch_nums {tuple(patch_nums)}, got {tuple(tokens_BL.shape)}")
    return list(torch.split(tokens_BL, tokens_per_scale(patch_nums), dim=1))


__all__ = [
    "VQVAE",
    "load_vqvae",
    "VQVAEConfig",
    "OFFICIAL_VQVAE",
    "MultiScaleQuantizer",
    "phi_indices",
    "num_tokens",
    "split_tokens",
    "tokens_per_scale",
]
