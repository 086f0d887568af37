"""Hierarchical, partially supervised segmentation loss.

Dice + BCE + MSE on the leaf probabilities and on the aggregated probabilities of every internal
node of the label tree (a parent's probability is the sum of its leaves').  A label map that does
not define some structures (missing labels) masks those channels and every node above them, so it
still supervises the levels it does define.  Voxels marked "ignore" (weight 0) do not count.
Every depth's head is supervised against the reference resampled to that depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from msdseg.core.labels import LabelTree

EPS = 1.0  # smoothing in voxel units: an absent structure that is also not predicted costs nothing


@dataclass
class LossWeights:
    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0
    hierarchy: float = 0.5  # weight of the internal-node terms relative to the leaf terms


def _terms(
    logp: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, mask: torch.Tensor, p: torch.Tensor | None = None,
    channel_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Dice, BCE, MSE for log-probabilities ``logp`` and targets ``y`` (B, K, ...), voxel weights
    ``w`` (B, 1, ...; None = all ones, the common case, which saves several full-size products),
    channel mask (B, K).  Averages over defined channels only, weighted by ``channel_weight`` (K,)
    when given: a weighted mean, so emphasising a few structures shifts the balance between them
    and the rest without changing the loss's overall scale.

    The positive BCE term uses the log-probability itself, never ``log(clamp(p))``: a structure
    whose probability has collapsed towards 0 must still receive a gradient, otherwise a network
    that predicts "background everywhere" early on can never leave that state.
    """
    dims = tuple(range(2, logp.ndim))
    p = logp.exp() if p is None else p
    pw = p if w is None else p * w
    yw = y if w is None else y * w
    inter = (pw * y).sum(dims)
    denom = pw.sum(dims) + yw.sum(dims)
    dice = 1.0 - (2.0 * inter + EPS) / (denom + EPS)
    neg = (1.0 - y) if w is None else (w - yw)
    bce = -(yw * logp + neg * torch.log1p(-p.clamp(max=1 - 1e-6))).sum(dims)
    sq = (p - y).square()
    mse = (sq if w is None else sq * w).sum(dims)
    n_vox = float(np.prod(logp.shape[2:])) if w is None else w.sum(dims).clamp_min(1.0)
    maskf = mask.to(p.dtype)
    if channel_weight is not None:
        maskf = maskf * channel_weight.to(device=p.device, dtype=p.dtype)
    n = maskf.sum().clamp_min(1e-6)
    return {
        "dice": (dice * maskf).sum() / n,
        "bce": (bce / n_vox * maskf).sum() / n,
        "mse": (mse / n_vox * maskf).sum() / n,
    }


class HierarchicalLoss:
    """Callable loss over the list of per-depth logits (finest first)."""

    def __init__(self, tree: LabelTree, weights: LossWeights | None = None, depth_weights: list[float] | None = None,
                 leaf_weights: "np.ndarray | None" = None):
        """``leaf_weights``: one weight per channel (background first), see :func:`leaf_weight_vector`."""
        self.tree = tree
        self.w = weights or LossWeights()
        self.depth_weights = depth_weights
        self._agg = torch.from_numpy(tree.aggregation_matrix)
        self._leaf_w = None if leaf_weights is None else torch.as_tensor(np.asarray(leaf_weights, dtype=np.float32))

    def aggregate(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) channel probabilities -> (B, K, ...) internal node probabilities."""
        agg = self._agg.to(device=probs.device, dtype=probs.dtype)
        return torch.einsum("kc,bc...->bk...", agg, probs)

    def __call__(
        self,
        logits: list[torch.Tensor],
        target: torch.Tensor,
        voxel_weight: torch.Tensor,
        channel_mask: torch.Tensor,
        internal_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``target`` and ``voxel_weight`` are at the finest (entry) depth; coarser ones are pooled."""
        total = logits[0].new_zeros(())
        parts: dict[str, float] = {}
        y, w = target, voxel_weight
        dws = self.depth_weights or [1.0] * len(logits)
        for d, lg in enumerate(logits):
            if d > 0:
                y = F.avg_pool3d(y, 2)
                w = F.avg_pool3d(w, 2)
            # Where some voxels are ignored, renormalise the pooled target over the known part.
            full = bool((w >= 1.0 - 1e-6).all())
            yk = y if full else y / w.clamp_min(1e-6) * (w > 0)
            wk = None if full else w
            logp = torch.log_softmax(lg.float(), dim=1)
            p = logp.exp()
            leaf = _terms(logp, yk, wk, channel_mask, p, self._leaf_w)
            # Internal nodes are large (hemispheres, cerebrum, ...): log of the summed probability
            # with a small floor is stable there and far cheaper than a log-sum-exp per node.
            pn = self.aggregate(p)
            node = _terms(pn.clamp_min(1e-7).log(), self.aggregate(yk), wk, internal_mask, pn)
            depth_loss = sum(self.w.__dict__[k] * leaf[k] for k in ("dice", "bce", "mse"))
            depth_loss = depth_loss + self.w.hierarchy * sum(
                self.w.__dict__[k] * node[k] for k in ("dice", "bce", "mse")
            )
            total = total + dws[min(d, len(dws) - 1)] * depth_loss
            parts[f"d{d}_leaf_dice_loss"] = float(leaf["dice"].detach())  # 1 - soft Dice
            parts[f"d{d}_node_dice_loss"] = float(node["dice"].detach())
        parts["loss"] = float(total.detach())
        return total, parts


def leaf_weight_vector(tree: LabelTree, emphasis: dict[str, float]) -> np.ndarray:
    """Per-channel loss weights from ``{"hippocampus": 2.0, ...}``: a name without its side
    (``left_`` / ``right_``) weights both sides, a full leaf id weights one; every other channel 1.

    Why weights and not more data alone: the leaf terms average over structures, so a structure of
    a few hundred voxels already counts as much as the cortex; an emphasis makes the network trade
    a little elsewhere for the structures a reader checks first (the medial temporal lobe).
    """
    out = np.ones(tree.n_classes, dtype=np.float32)
    channel = tree.leaf_channel
    for name, weight in emphasis.items():
        if not weight > 0:
            raise ValueError(f"emphasis {name}={weight}: give a weight above 0")
        ids = [i for i in (name, f"left_{name}", f"right_{name}") if i in channel]
        if not ids:
            known = sorted({i.removeprefix("left_").removeprefix("right_") for i in channel})
            raise ValueError(f"emphasis {name!r}: no such structure (known: {', '.join(known)})")
        for i in ids:
            out[channel[i]] = weight
    return out
