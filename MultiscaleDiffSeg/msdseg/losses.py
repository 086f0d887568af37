"""Hierarchical, partially supervised segmentation loss.

Dice + BCE + MSE on the leaf probabilities and on the aggregated probabilities of every internal
node of the label tree (a parent's probability is the sum of its leaves').  A label map that does
not define some structures (missing labels) masks those channels and every node above them, so it
still supervises the levels it does define.  Voxels marked "ignore" (weight 0) do not count.
Every depth's head is supervised against the reference resampled to that depth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .labels import LabelTree

EPS = 1.0  # smoothing in voxel units: an absent structure that is also not predicted costs nothing


@dataclass
class LossWeights:
    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0
    hierarchy: float = 0.5  # weight of the internal-node terms relative to the leaf terms


def _terms(logp: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dice, BCE, MSE for log-probabilities ``logp`` and targets ``y`` (B, K, ...), voxel weights
    ``w`` (B, 1, ...), channel mask (B, K).  Averages over defined channels only.

    The positive BCE term uses the log-probability itself, never ``log(clamp(p))``: a structure
    whose probability has collapsed towards 0 must still receive a gradient, otherwise a network
    that predicts "background everywhere" early on can never leave that state.
    """
    dims = tuple(range(2, logp.ndim))
    p = logp.exp()
    maskf = mask.to(p.dtype)
    n = maskf.sum().clamp_min(1.0)
    inter = (w * p * y).sum(dims)
    denom = (w * p).sum(dims) + (w * y).sum(dims)
    dice = 1.0 - (2.0 * inter + EPS) / (denom + EPS)
    bce = -(y * logp + (1 - y) * torch.log1p(-p.clamp(max=1 - 1e-6)))
    wsum = w.sum(dims).clamp_min(1.0)
    bce = (w * bce).sum(dims) / wsum
    mse = (w * (p - y) ** 2).sum(dims) / wsum
    return {
        "dice": (dice * maskf).sum() / n,
        "bce": (bce * maskf).sum() / n,
        "mse": (mse * maskf).sum() / n,
    }


class HierarchicalLoss:
    """Callable loss over the list of per-depth logits (finest first)."""

    def __init__(self, tree: LabelTree, weights: LossWeights | None = None, depth_weights: list[float] | None = None):
        self.tree = tree
        self.w = weights or LossWeights()
        self.depth_weights = depth_weights
        self._agg = torch.from_numpy(tree.aggregation_matrix)
        self._members = [torch.from_numpy(row.nonzero()[0]) for row in tree.aggregation_matrix]

    def aggregate(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) channel probabilities -> (B, K, ...) internal node probabilities."""
        agg = self._agg.to(device=probs.device, dtype=probs.dtype)
        return torch.einsum("kc,bc...->bk...", agg, probs)

    def aggregate_log(self, logp: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of internal nodes: log of the sum of their leaves, computed stably."""
        return torch.stack([torch.logsumexp(logp[:, idx.to(logp.device)], dim=1) for idx in self._members], dim=1)

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
            yk = y / w.clamp_min(1e-6) * (w > 0)
            logp = torch.log_softmax(lg.float(), dim=1)
            leaf = _terms(logp, yk, w, channel_mask)
            node = _terms(self.aggregate_log(logp), self.aggregate(yk), w, internal_mask)
            depth_loss = sum(self.w.__dict__[k] * leaf[k] for k in ("dice", "bce", "mse"))
            depth_loss = depth_loss + self.w.hierarchy * sum(
                self.w.__dict__[k] * node[k] for k in ("dice", "bce", "mse")
            )
            total = total + dws[min(d, len(dws) - 1)] * depth_loss
            parts[f"d{d}_leaf_dice"] = float(leaf["dice"].detach())
            parts[f"d{d}_node_dice"] = float(node["dice"].detach())
        parts["loss"] = float(total.detach())
        return total, parts
