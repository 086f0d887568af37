"""Device choice and precision: CUDA > MPS > CPU for ``auto``; mixed precision where it pays.

Measured on the 2-core development CPU of sessions 1-10 (AMD EPYC): bf16 autocast roughly halved
the time of a training step, so the CPU default is bf16.  On a later Intel Xeon it was neither
faster nor slower, but it kept peak memory lower (2.1 against 2.8 GB on a 256^3 scan), so it stays
the default (docs/field_notes.md).  CUDA uses bf16 where supported, else fp16; MPS fp16.
"""
from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; an explicit device must exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise InputError("device 'mps' requested but Apple MPS is not available (use --device auto or cpu)")
    if name not in {"cpu", "mps"} and not name.startswith("cuda"):
        raise InputError(f"unknown device '{name}' (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = full fp32)."""
    precision = precision.lower()
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise InputError(f"unknown precision '{precision}' (auto, fp32, bf16, fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "can't allocate" in text or isinstance(exc, MemoryError))
