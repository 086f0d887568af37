"""Multiscale denoising U-Net: one depth per image resolution, an entry and a head at every depth.

Why this shape:
- *Every depth is a resolution* (1, 2, 4, 8 mm by default).  Depth ``d`` has its own image entry
  and its own output head, so inference can start at any depth and skip the finer ones: the same
  weights give a fast coarse answer on a CPU and a fine one on a GPU.
- *Diff-UNet fusion*: a separate image encoder turns the image into features at every depth, which
  are added to the denoiser's features.  The image features do not depend on the noisy labels or
  the timestep, so sampling computes them once per volume and reuses them for every DDIM step and
  every sample; the per-step denoiser can stay light.  This is what makes several diffusion steps
  affordable on two CPU cores.
- The noisy one-hot labels ``x_t`` enter at the entry depth and, average-pooled, at every coarser
  depth too, so each depth sees the current label estimate at its own resolution.
- *Refining heads* (``refine_depths``): the finest depths are the narrowest (8 channels at 1 mm
  for 33 classes).  A head that must name every class from 8 features dropped the small ones
  (putamen, pallidum, amygdala, ... never appeared at 1 mm, even when x_t held the true labels).
  A refining head adds its output to the next coarser head's logits, upsampled, so the coarse,
  wider depth names the structures and the fine one only moves their borders.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (stored in every model file's JSON config)."""

    n_classes: int = 33
    image_channels: int = 1
    coord_channels: int = 3
    spacings_mm: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    image_channels_per_depth: tuple[int, ...] = (8, 16, 32, 64)
    time_dim: int = 64
    groups: int = 4
    refine_depths: int = 0  # the finest N depths' heads correct the upsampled coarser logits
    # Per-depth widening factors of a model grown from a narrower one (model_widen.py): a norm at
    # depth d keeps the group *size* it had before widening, so the old channels keep their groups
    # and the grown model starts with the old one's outputs.  Empty = never widened (all 1).
    width_scale: tuple[int, ...] = ()
    image_width_scale: tuple[int, ...] = ()

    def refines(self, depth: int) -> bool:
        """Whether the head of ``depth`` adds to the upsampled logits of ``depth + 1``."""
        return depth < min(self.refine_depths, self.depths - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("spacings_mm", "channels", "image_channels_per_depth", "width_scale", "image_width_scale"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @property
    def depths(self) -> int:
        return len(self.spacings_mm)

    def scale_at(self, depth: int, image: bool = False) -> int:
        """Widening factor of ``depth`` (1 unless the model was grown by model_widen)."""
        scales = self.image_width_scale if image else self.width_scale
        return int(scales[depth]) if scales else 1

    def depth_of(self, spacing_mm: float) -> int:
        for d, s in enumerate(self.spacings_mm):
            if abs(s - spacing_mm) < 1e-6:
                return d
        raise ValueError(f"no depth at {spacing_mm} mm (depths: {self.spacings_mm})")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 convolution computed as one matrix product over the channels.

    Same parameters (and state-dict names) as ``nn.Conv3d(cin, cout, 1)``; PyTorch's CPU path
    runs 1x1x1 3-D convolutions through its generic unfold kernel, several times slower than the
    matrix product they are.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or not x.is_contiguous() or self.bias is None:
            return super().forward(x)
        b, c, *spatial = x.shape
        w = self.weight.reshape(self.out_channels, c)
        flat = x.reshape(b, c, -1)
        if b == 1:  # matmul and addmm follow autocast like the convolution they replace
            out = torch.addmm(self.bias[:, None], w, flat[0])[None]
        else:
            out = torch.matmul(w, flat) + self.bias[:, None]
        return out.reshape(b, self.out_channels, *spatial)


def _norm(ch: int, groups: int, scale: int = 1) -> nn.GroupNorm:
    """``min(groups, ch)`` groups; a layer widened ``scale`` times has ``scale`` times as many
    groups of the same size, so its original channels are normalised exactly as before."""
    return nn.GroupNorm(min(groups, ch // scale) * scale, ch)


class ResBlock(nn.Module):
    """Pre-activation residual block; optional FiLM (scale, shift) from the timestep embedding."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, time_dim: int | None = None, scale: int = 1):
        super().__init__()
        self.norm1 = _norm(in_ch, groups, scale)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups, scale)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * out_ch) if time_dim else None
        self.skip = PointwiseConv3d(in_ch, out_ch) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        skip = self.skip(x)
        h = self.norm1(x)
        del x  # a caller that passes a temporary (the decoder's concatenation) frees it here
        h = self.conv1(F.silu(h, inplace=True))
        if self.film is not None and temb is not None:
            h = self._norm_film(h, temb)
        else:
            h = self.norm2(h)
        h = self.conv2(F.silu(h, inplace=True))
        if h.requires_grad or h.dtype != torch.promote_types(h.dtype, skip.dtype):
            return h + skip  # autograd, or a wider residual (fp32 input under autocast) decides the dtype
        return h.add_(skip)

    def _norm_film(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``norm2`` then FiLM, ``norm(h) * (1 + scale) + shift``.

        With one volume in the batch the FiLM is folded into the norm's own per-channel affine
        (``w * (1 + scale)``, ``b * (1 + scale) + shift``): the same numbers, two fewer passes
        over the largest tensor of the block.  Training batches keep the plain form."""
        scale, shift = self.film(temb).chunk(2, dim=1)
        norm = self.norm2
        if h.shape[0] == 1 and norm.affine:
            weight = norm.weight * (1 + scale[0])
            bias = norm.bias * (1 + scale[0]) + shift[0]
            return F.group_norm(h, norm.num_groups, weight.to(h.dtype), bias.to(h.dtype), norm.eps)
        return norm(h) * (1 + scale[:, :, None, None, None]) + shift[:, :, None, None, None]


class ImageEncoder(nn.Module):
    """Image-only pyramid (Diff-UNet's separate feature encoder): one entry per depth."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.image_channels_per_depth
        cin = cfg.image_channels + cfg.coord_channels
        self.entries = nn.ModuleList([nn.Conv3d(cin, c, 3, padding=1) for c in ch])
        self.blocks = nn.ModuleList(
            [ResBlock(c, c, cfg.groups, scale=cfg.scale_at(d, image=True)) for d, c in enumerate(ch)]
        )
        self.downs = nn.ModuleList([nn.Conv3d(ch[d], ch[d + 1], 2, stride=2) for d in range(len(ch) - 1)])

    def forward(self, images: list[torch.Tensor], entry: int) -> list[torch.Tensor]:
        """``images[d]`` is the image (+coords) at depth ``entry + d``; returns features per depth."""
        feats: list[torch.Tensor] = []
        h = None
        for i, img in enumerate(images):
            d = entry + i
            x = self.entries[d](img)
            if h is not None:
                x = x + self.downs[d - 1](h)
            h = self.blocks[d](x)
            feats.append(h)
        return feats


class MultiscaleDiffUNet(nn.Module):
    """Predicts clean label logits x0 at every depth from the image and noisy labels x_t."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        ch, ich = cfg.channels, cfg.image_channels_per_depth
        D = cfg.depths
        self.image_encoder = ImageEncoder(cfg)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        self.label_entries = nn.ModuleList([PointwiseConv3d(cfg.n_classes, c) for c in ch])
        self.image_fuse = nn.ModuleList([PointwiseConv3d(ich[d], ch[d]) for d in range(D)])
        self.enc = nn.ModuleList(
            [ResBlock(c, c, cfg.groups, cfg.time_dim, cfg.scale_at(d)) for d, c in enumerate(ch)]
        )
        self.downs = nn.ModuleList([nn.Conv3d(ch[d], ch[d + 1], 2, stride=2) for d in range(D - 1)])
        self.ups = nn.ModuleList([nn.ConvTranspose3d(ch[d + 1], ch[d], 2, stride=2) for d in range(D - 1)])
        self.dec = nn.ModuleList(
            [ResBlock(2 * ch[d], ch[d], cfg.groups, cfg.time_dim, cfg.scale_at(d)) for d in range(D - 1)]
        )
        self.heads = nn.ModuleList([PointwiseConv3d(c, cfg.n_classes) for c in ch])

    # ------------------------------------------------------------------ helpers
    def image_pyramid(self, image: torch.Tensor, coords: torch.Tensor | None, entry: int) -> list[torch.Tensor]:
        """Image (+coords) at the entry depth, average-pooled to every coarser depth."""
        x = image if coords is None else torch.cat([image, coords], dim=1)
        pyramid = [x]
        for _ in range(entry + 1, self.cfg.depths):
            x = F.avg_pool3d(x, 2)
            pyramid.append(x)
        return pyramid

    def encode_image(self, image: torch.Tensor, coords: torch.Tensor | None, entry: int) -> list[torch.Tensor]:
        """Image features per depth; compute once per volume and pass to :meth:`denoise`."""
        return self.image_encoder(self.image_pyramid(image, coords, entry), entry)

    def fuse_image(self, image_feats: list[torch.Tensor], entry: int) -> list[torch.Tensor]:
        """The image features as the denoiser adds them (its 1x1 ``image_fuse`` per depth).

        They depend on neither x_t nor t: sampling computes them once per view and passes them to
        :meth:`denoise` with ``fused=True`` instead of redoing the projection at every step."""
        return [self.image_fuse[entry + i](f) for i, f in enumerate(image_feats)]

    def denoise(
        self, image_feats: list[torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, entry: int,
        fused: bool = False, finest_only: bool = False,
    ) -> list[torch.Tensor]:
        """Logits of x0 at depths entry..D-1 (finest first).

        ``fused``: ``image_feats`` come from :meth:`fuse_image`.  ``finest_only``: return only the
        entry depth's logits (a one-element list) and skip the coarser heads nobody reads, except
        those a refining head adds to."""
        temb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim))
        skips: list[torch.Tensor] = []
        h = None
        xt = x_t
        for i, feat in enumerate(image_feats):
            d = entry + i
            if i > 0:
                xt = F.avg_pool3d(xt, 2)
            x = self.label_entries[d](xt) + (feat if fused else self.image_fuse[d](feat))
            if h is not None:
                x = x + self.downs[d - 1](h)
            h = self.enc[d](x, temb)
            skips.append(h)
        last = self.cfg.depths - 1
        outs: list[torch.Tensor | None] = [self.heads[-1](h) if not finest_only or self._head_needed(last, entry) else None]
        for i in range(len(image_feats) - 2, -1, -1):
            d = entry + i
            skip, skips[i] = skips[i], None  # the concatenation below is the block's only reference
            h = self.dec[d](torch.cat([self.ups[d](h), skip], dim=1), temb)
            del skip
            if finest_only and not self._head_needed(d, entry):
                outs.append(None)
                continue
            logits = self.heads[d](h)
            if self.cfg.refines(d):
                coarse = F.interpolate(outs[-1], scale_factor=2, mode="trilinear", align_corners=False)
                logits = logits + coarse.to(logits.dtype)
            outs.append(logits)
        if finest_only:
            return [outs[-1]]  # type: ignore[list-item]
        return outs[::-1]  # type: ignore[return-value]

    def _head_needed(self, depth: int, entry: int) -> bool:
        """Whether the entry depth's answer uses the head of ``depth`` (itself, or through the
        chain of refining heads above it)."""
        d = entry
        while d < depth and self.cfg.refines(d):
            d += 1
        return depth <= d

    def enable_refining_heads(self, n: int) -> list[int]:
        """Turn the finest ``n`` depths' heads into refining heads (see module docstring), with
        zero weights, so the converted model's fine output starts as the coarser head's upsampled
        answer and training learns only the correction.  Returns the depths converted."""
        converted = []
        for d in range(self.cfg.depths - 1):
            if d < n and not self.cfg.refines(d):
                nn.init.zeros_(self.heads[d].weight)
                nn.init.zeros_(self.heads[d].bias)
                converted.append(d)
        self.cfg.refine_depths = max(self.cfg.refine_depths, n)
        return converted

    def forward(
        self,
        image: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        entry: int = 0,
        coords: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        return self.denoise(self.encode_image(image, coords, entry), x_t, t, entry)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
