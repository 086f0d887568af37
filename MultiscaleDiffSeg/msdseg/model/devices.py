"""Device choice and precision: CUDA > MPS > CPU for ``auto``; mixed precision where it pays.

On the CPU, bf16 pays only where the processor has bf16 instructions (AVX-512 BF16 or AMX): there
it speeds training up and lowers peak memory.  Without them PyTorch has no fast bf16 convolution
and a 3-D convolution runs orders of magnitude slower in bf16 than in fp32, so ``auto`` picks fp32
there (measurements in docs/research/field_notes.md).  CUDA uses bf16 where supported, else fp16;
MPS fp16.
"""
from __future__ import annotations

import os
import warnings

import torch

from msdseg.core.errors import InputError


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
        if device.type == "cpu" and not cpu_has_fast_bf16():
            warn_slow_cpu_bf16()
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise InputError(f"unknown precision '{precision}' (auto, fp32, bf16, fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX tiles) that PyTorch uses.

    The probes are private PyTorch helpers; a PyTorch without them is treated as lacking bf16,
    since fp32 is merely slower where bf16 would help, while bf16 without the instructions is
    orders of magnitude slower."""
    if _isa_capped_below_bf16():
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # noqa: BLE001 - a probe that fails says nothing about the CPU
            continue
    return False


#: oneDNN's ISA names (``ONEDNN_MAX_CPU_ISA``) under which its kernels have no bf16 instructions.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _isa_capped_below_bf16() -> bool:
    """Whether the user capped oneDNN (``ONEDNN_MAX_CPU_ISA``, e.g. to reproduce an AVX2 machine)
    below the instructions bf16 needs: the CPU has them, but the convolutions would not use them."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return cap.strip().upper() in _NO_BF16_ISAS


def warn_slow_cpu_bf16() -> None:
    """One warning that an explicit CPU bf16 request will be very slow on this processor."""
    warnings.warn(
        "this CPU has no bf16 instructions (AVX-512 BF16 or AMX): bf16 runs far slower than fp32 here; "
        "use precision 'auto' or 'fp32'",
        RuntimeWarning,
        stacklevel=3,
    )


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "can't allocate" in text or isinstance(exc, MemoryError))
