"""Grow a trained model wider without changing what it computes.

Why: the narrow network (8/16/32/64 channels) stopped improving at 2 mm long before the targets
(docs/research/model_history.md); its 2 mm head names 33 classes from 16 features.  Training a
wider network from scratch would throw away all the CPU time already spent training the narrow
one, so instead every depth can be widened by an integer factor in place:

- each old weight is copied into the top-left block of the wider tensor;
- weights from a *new* input channel to an *old* output channel are zero, so the old channels
  (and therefore the heads, which only have old outputs) compute exactly what they did before;
- weights into new channels keep PyTorch's random initialisation, so the new channels carry
  varied features from the first step, and the zero weights out of them receive gradients at once;
- group norms keep their group size (``ModelConfig.width_scale``), so the new channels form
  groups of their own and never change the statistics of the old ones.

The grown model therefore starts at the old model's loss and training only has to find a use for
the extra width.  ``test_model_widen.py`` checks the outputs are identical.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from msdseg.core.errors import InputError
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet

# A channel axis is a list of (old size, new size) segments laid end to end: the decoder's input
# is [upsampled features, skip features] and a FiLM layer's output is [scales, shifts], so their old
# channels sit at the start of *each* segment, not at the start of the axis.
Segments = list[tuple[int, int]]


def _old_positions(segments: Segments) -> torch.Tensor:
    """Indices, in the wide axis, of the channels that existed before widening."""
    out, offset = [], 0
    for old, new in segments:
        out.extend(range(offset, offset + old))
        offset += new
    return torch.tensor(out, dtype=torch.long)


def _fixed(n: int) -> Segments:
    return [(n, n)]


def _axes_of(name: str, old: ModelConfig, new: ModelConfig) -> tuple[Segments, Segments | None]:
    """(output axis, input axis) segments of parameter ``name``; input None for 1-D parameters."""
    parts = name.split(".")

    def ch(d: int) -> Segments:
        return [(old.channels[d], new.channels[d])]

    def ich(d: int) -> Segments:
        return [(old.image_channels_per_depth[d], new.image_channels_per_depth[d])]

    n_cls = _fixed(old.n_classes)
    if parts[0] == "image_encoder":
        kind, d = parts[1], int(parts[2])
        if kind == "entries":
            return ich(d), _fixed(old.image_channels + old.coord_channels)
        if kind == "downs":
            return ich(d + 1), ich(d)
        return _block_axes(parts[3:], ich(d), ich(d))
    kind, d = parts[0], int(parts[1])
    if kind == "label_entries":
        return ch(d), n_cls
    if kind == "image_fuse":
        return ch(d), ich(d)
    if kind == "enc":
        return _block_axes(parts[2:], ch(d), ch(d), old.time_dim)
    if kind == "dec":
        return _block_axes(parts[2:], ch(d) + ch(d), ch(d), old.time_dim)
    if kind == "downs":
        return ch(d + 1), ch(d)
    if kind == "ups":  # ConvTranspose3d: the caller swaps axes
        return ch(d), ch(d + 1)
    if kind == "heads":
        return n_cls, ch(d)
    raise KeyError(f"model_widen does not know parameter {name}")


def _block_axes(rest: list[str], cin: Segments, cout: Segments, time_dim: int | None = None) -> tuple[Segments, Segments | None]:
    layer = rest[0]
    if layer == "norm1":
        return cin, None
    if layer == "norm2":
        return cout, None
    if layer == "conv1":
        return cout, cin
    if layer == "conv2":
        return cout, cout
    if layer == "skip":
        return cout, cin
    if layer == "film":
        return cout + cout, _fixed(int(time_dim))
    raise KeyError(f"model_widen does not know block layer {layer}")


def _scaled(old_scales: tuple[int, ...], old_ch: tuple[int, ...], new_ch: tuple[int, ...]) -> tuple[int, ...]:
    scales = []
    for d, (a, b) in enumerate(zip(old_ch, new_ch)):
        if b < a or b % a:
            raise InputError(f"depth {d}: {a} -> {b} channels is not a whole-number widening")
        scales.append((int(old_scales[d]) if old_scales else 1) * (b // a))
    return tuple(scales)


def widened_config(cfg: ModelConfig, channels: tuple[int, ...], image_channels: tuple[int, ...] | None = None) -> ModelConfig:
    """The configuration of ``cfg`` widened to ``channels`` (and ``image_channels`` for the image
    encoder, default: same factors as the denoiser's)."""
    channels = tuple(int(c) for c in channels)
    if len(channels) != cfg.depths:
        raise InputError(f"--widen: {len(channels)} widths for a model with {cfg.depths} depths")
    if image_channels is None:
        image_channels = tuple(i * (c // o) for i, c, o in
                               zip(cfg.image_channels_per_depth, channels, cfg.channels))
    image_channels = tuple(int(c) for c in image_channels)
    return replace(
        cfg, channels=channels, image_channels_per_depth=image_channels,
        width_scale=_scaled(cfg.width_scale, cfg.channels, channels),
        image_width_scale=_scaled(cfg.image_width_scale, cfg.image_channels_per_depth, image_channels),
    )


@torch.no_grad()
def widen_model(model: MultiscaleDiffUNet, channels: tuple[int, ...], image_channels: tuple[int, ...] | None = None,
                seed: int = 0) -> MultiscaleDiffUNet:
    """A wider copy of ``model`` that computes the same outputs (see module docstring)."""
    old_cfg = model.cfg
    new_cfg = widened_config(old_cfg, channels, image_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wide = MultiscaleDiffUNet(new_cfg)
    old_state = model.state_dict()
    new_state = wide.state_dict()
    for name, target in new_state.items():
        src = old_state[name]
        if src.shape == target.shape:
            target.copy_(src)
            continue
        out_axis, in_axis = _axes_of(name, old_cfg, new_cfg)
        rows = _old_positions(out_axis)
        is_transpose = name.startswith("ups.") and name.endswith("weight")
        w = target.transpose(0, 1) if is_transpose else target  # view: writes land in target
        s = src.transpose(0, 1) if is_transpose else src
        if in_axis is None or w.dim() == 1:  # biases and norm affines
            if name.endswith("bias") and ".norm" not in name:
                w.zero_()  # new channels start without an offset
            w[rows] = s
            continue
        cols = _old_positions(in_axis)
        w[rows] = 0.0  # old outputs ignore every new input ...
        w[rows[:, None], cols[None, :]] = s  # ... and keep their old weights
        if name.split(".")[-2] == "film":
            w[~_mask(rows, w.shape[0])] = 0.0  # new channels start unmodulated by the timestep
    wide.load_state_dict(new_state)
    return wide


def _mask(rows: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[rows] = True
    return m


def parse_widths(text: str) -> tuple[int, ...]:
    """``"8,32,64,128"`` -> (8, 32, 64, 128) (the ``--widen`` option)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--widen wants comma-separated channel counts, got {text!r}") from None


