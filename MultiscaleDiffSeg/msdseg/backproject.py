"""Bring model-grid probabilities back onto the exact input grid, slab by slab.

Every input voxel's centre is mapped into the model grid (one affine: input index -> RAS ->
model index) and the probabilities are interpolated trilinearly there, then reduced to an argmax
label and an uncertainty value.  Working in slabs of input slices keeps memory bounded: a
256^3 input never materialises 33 full-resolution probability volumes.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import ModelGrid, input_index_to_grid_index

SLAB_VOXELS = 2_000_000


def backproject(
    probs: torch.Tensor,
    grid: ModelGrid,
    image: sitk.Image,
    channel_to_label: np.ndarray,
    uncertainty: torch.Tensor | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[sitk.Image, sitk.Image | None]:
    """Labels (uint16, label numbers) and optional uncertainty (float32) on ``image``'s grid.

    ``probs`` is (C, X, Y, Z) on ``grid``; ``uncertainty`` (1, X, Y, Z) is interpolated likewise.
    Voxels outside the model grid are background with zero uncertainty.
    """
    size = image.GetSize()  # (i, j, k)
    mat = torch.from_numpy(input_index_to_grid_index(image, grid)).float()
    shape = torch.tensor(grid.shape, dtype=torch.float32)
    vol = probs.float().cpu()[None]  # (1, C, X, Y, Z)
    unc = None if uncertainty is None else uncertainty.float().cpu()[None]
    lut = torch.from_numpy(channel_to_label.astype(np.int64))
    labels_out = np.zeros((size[2], size[1], size[0]), dtype=np.uint16)  # SimpleITK (k, j, i)
    unc_out = np.zeros(labels_out.shape, dtype=np.float32) if unc is not None else None
    per_slice = size[0] * size[1]
    slab = max(1, SLAB_VOXELS // per_slice)
    ii, jj = torch.meshgrid(torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32), indexing="ij")
    for k0 in range(0, size[2], slab):
        k1 = min(size[2], k0 + slab)
        kk = torch.arange(k0, k1, dtype=torch.float32)
        idx = torch.stack(
            [ii[..., None].expand(-1, -1, len(kk)), jj[..., None].expand(-1, -1, len(kk)), kk.expand(size[0], size[1], -1)],
            dim=-1,
        )  # (I, J, K, 3)
        g = idx @ mat[:3, :3].T + mat[:3, 3]
        norm = g / (shape - 1) * 2 - 1  # model (x, y, z) -> [-1, 1]
        samp = norm.flip(-1)[None]  # grid_sample wants (z, y, x) order for a (X, Y, Z) volume
        p = F.grid_sample(vol, samp, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        inside = ((norm >= -1) & (norm <= 1)).all(-1)
        lab = p.argmax(0)
        lab[~inside] = 0
        labels_out[k0:k1] = lut[lab].numpy().astype(np.uint16).transpose(2, 1, 0)
        if unc is not None:
            u = F.grid_sample(unc, samp, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
            u[~inside] = 0
            unc_out[k0:k1] = u.numpy().transpose(2, 1, 0)  # type: ignore[index]
        if progress is not None:
            progress(k1 / size[2])
    labels_img = sitk.GetImageFromArray(labels_out)
    labels_img.CopyInformation(image)
    unc_img = None
    if unc_out is not None:
        unc_img = sitk.GetImageFromArray(unc_out)
        unc_img.CopyInformation(image)
    return labels_img, unc_img
