"""Model files: weights as safetensors + a JSON config that records the SHA256 of the weights.

A model file is never unpickled: safetensors stores raw tensors only, and the JSON holds the
architecture, label-tree version, resolutions, normalisation, data provenance and metrics.  The
hash is checked on every load so a truncated or swapped weights file fails loudly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from msdseg.core.errors import InputError
from msdseg.core.hashing import sha256_file
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet

DEFAULT_MODEL_NAME = "msdseg_brain"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: MultiscaleDiffUNet
    config: dict[str, Any]
    path: Path
    trained: bool = True

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.stem))


def config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_model(
    model: MultiscaleDiffUNet, weights_path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json`` atomically; returns the weights path."""
    weights = Path(weights_path)
    if weights.suffix != ".safetensors":
        weights = weights.with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(weights.name + ".tmp")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "msdseg", "format_version": str(FORMAT_VERSION)})
    digest = sha256_file(tmp)
    meta = dict(metadata or {})
    meta.update(
        {
            "format_version": FORMAT_VERSION,
            "architecture": model.cfg.to_dict(),
            "weights_file": weights.name,
            "sha256": digest,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        }
    )
    meta.setdefault("name", weights.stem)
    cfg_tmp = config_path(weights).with_name(config_path(weights).name + ".tmp")
    cfg_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, weights)
    os.replace(cfg_tmp, config_path(weights))
    return weights


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file (``.safetensors`` or its ``.json``); default: the shipped model.

    With no shipped model (a fresh checkout before training), returns a randomly initialised
    network flagged ``trained=False`` so front ends can say so on screen.
    """
    if path is None:
        shipped = default_model_path()
        if shipped is None:
            model = MultiscaleDiffUNet(ModelConfig())
            return LoadedModel(model.to(device).eval(), {"name": "untrained", "trained": False}, Path("untrained"), False)
        path = shipped
    p = Path(path)
    weights = p.with_suffix(".safetensors") if p.suffix == ".json" else p
    cfg_file = config_path(weights)
    if not weights.exists():
        raise InputError(f"{weights}: model weights not found")
    if not cfg_file.exists():
        raise InputError(f"{cfg_file}: model config (JSON beside the weights) not found")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_file}: model config is not valid JSON ({exc.msg})") from None
    digest = sha256_file(weights)
    if meta.get("sha256") != digest:
        raise InputError(f"{weights}: SHA256 mismatch (file {digest[:12]}..., config {str(meta.get('sha256'))[:12]}...)")
    model = MultiscaleDiffUNet(ModelConfig.from_dict(meta["architecture"]))
    state = load_file(str(weights), device="cpu")
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), meta, weights, bool(meta.get("trained", True)))


def default_model_path() -> Path | None:
    """The model shipped inside the package (``resources/models``), if any."""
    base = resources.files("msdseg.resources").joinpath("models")
    candidate = Path(str(base)) / f"{DEFAULT_MODEL_NAME}.safetensors"
    return candidate if candidate.exists() else None
