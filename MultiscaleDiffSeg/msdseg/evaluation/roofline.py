"""How far the network's passes are from what the CPU can do: FLOPs, achieved GFLOP/s, peak.

A preset's time is mostly encoder and denoiser passes on its model grid.  Counting their
floating-point operations (PyTorch's own ``FlopCounterMode``: convolutions and matrix products,
the operations that carry the arithmetic) and timing them gives the achieved rate; the CPU's peak
is cores x FMA lanes x 2 (multiply and add) x FMA pipes x clock.  The ratio says what is left:
near the peak only fewer operations help (fewer passes, a smaller grid); far below it, the time is
going to memory traffic and elementwise work that a better kernel could remove.

Peak assumptions, stated in the table:
- two FMA pipes per core (Intel since Haswell, AMD since Zen 2);
- fp32 lanes: 8 with AVX2; 16 with AVX-512, except on AMD Zen 4, which splits each 512-bit
  instruction into two 256-bit halves (so its fp32 peak equals its AVX2 one);
- bf16 dot products (AVX-512 BF16) do twice the fp32 work per instruction;
- clock: the nominal ``cpu MHz`` of ``/proc/cpuinfo`` (turbo can exceed it, so a figure a little
  above 100 % is possible).

Run ``python -m msdseg.evaluation.bench roofline`` (see :mod:`msdseg.evaluation.bench`).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

#: CPU flags worth printing beside a timing: they decide which kernels PyTorch and oneDNN run.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


@dataclass
class CpuInfo:
    model: str
    vendor: str
    family: int
    mhz: float
    cores: int
    flags: list[str]
    isa_cap: str  # ONEDNN_MAX_CPU_ISA, "" when not capped

    def fp32_lanes(self) -> int:
        """fp32 FMA lanes per instruction the convolutions can use (see module docstring)."""
        cap = self.isa_cap.upper()
        avx512 = "avx512f" in self.flags and (not cap or cap.startswith("AVX512") or cap.startswith("AVX10")
                                             or cap in ("ALL", "DEFAULT"))
        if avx512 and not self.zen4_double_pumped():
            return 16
        return 8 if "avx2" in self.flags else 4

    def zen4_double_pumped(self) -> bool:
        return self.vendor == "AuthenticAMD" and self.family == 25

    def peak_gflops(self, threads: int, precision: str) -> float:
        per_cycle = self.fp32_lanes() * 2 * 2  # lanes x (mul + add) x two FMA pipes
        if precision == "bf16":
            per_cycle *= 2
        return per_cycle * self.mhz / 1000.0 * min(threads, self.cores)


def cpu_info() -> CpuInfo:
    """The processor as Linux reports it (fields empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (part.strip() for part in line.split(":", 1))
                if key and key not in fields:
                    fields[key] = value
            elif fields:
                break  # the first processor is enough
    except OSError:
        pass
    flags = sorted(set(fields.get("flags", "").split()))
    return CpuInfo(
        model=fields.get("model name", platform.processor()), vendor=fields.get("vendor_id", ""),
        family=int(fields.get("cpu family", "0") or 0), mhz=float(fields.get("cpu MHz", "0") or 0.0),
        cores=os.cpu_count() or 1, flags=[f for f in flags if f in REPORTED_FLAGS],
        isa_cap=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
    )


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_passes(model: torch.nn.Module, grid_shape: tuple[int, int, int], entry: int, precision: str,
                   repeat: int = 3) -> list[dict[str, Any]]:
    """FLOPs and best-of-``repeat`` seconds of one encoder and one denoiser pass on ``grid_shape``
    (the sampling code's own calls: fused image projection, entry head only)."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    ctx = lambda: torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((1, 1, *grid_shape), generator=gen)
    coords = torch.rand((1, 3, *grid_shape), generator=gen) * 2 - 1
    x_t = torch.randn((1, model.cfg.n_classes, *grid_shape), generator=gen)
    t = torch.tensor([500])
    rows = []
    with torch.inference_mode():
        def encode():
            with ctx():
                return model.fuse_image(model.encode_image(image, coords, entry), entry)

        feats = encode()

        def denoise():
            with ctx():
                return model.denoise(feats, x_t, t, entry, fused=True, finest_only=True)

        denoise()  # first call pays one-off kernel selection
        for name, fn in (("encoder pass", encode), ("denoiser pass", denoise)):
            flops = _flops(fn)
            seconds = _best_seconds(fn, repeat)
            rows.append({"pass": name, "gflop": round(flops / 1e9, 2), "seconds": round(seconds, 3),
                         "gflops_per_s": round(flops / 1e9 / seconds, 1)})
    return rows


def roofline(model: torch.nn.Module, grid_shape: tuple[int, int, int], entry: int, precision: str,
             threads: int, passes: dict[str, int], repeat: int = 3) -> dict[str, Any]:
    """The table's rows plus the CPU, its peak and the whole preset's share of passes."""
    torch.set_num_threads(threads)
    info = cpu_info()
    peak = info.peak_gflops(threads, precision)
    rows = measure_passes(model, grid_shape, entry, precision, repeat)
    for row in rows:
        row["percent_of_peak"] = round(100.0 * row["gflops_per_s"] / peak, 1) if peak else None
        count = passes.get(row["pass"], 0)
        row["per_preset"] = count
        row["preset_seconds"] = round(count * row["seconds"], 1)
    return {"cpu": asdict(info), "fp32_lanes": info.fp32_lanes(), "threads": threads, "precision": precision,
            "grid": list(grid_shape), "peak_gflops": round(peak, 1), "torch": torch.__version__, "rows": rows}


def roofline_markdown(result: dict[str, Any], preset: str) -> str:
    cpu = result["cpu"]
    lines = [
        f"CPU: {cpu['model']} ({cpu['vendor']} family {cpu['family']}), {cpu['mhz']:.0f} MHz, "
        f"flags {' '.join(cpu['flags']) or '-'}, oneDNN ISA cap {cpu['isa_cap'] or 'none'}; "
        f"path {result['precision']}, {result['threads']} thread(s), torch {result['torch']}; "
        f"preset {preset}, grid {'x'.join(map(str, result['grid']))}; peak {result['peak_gflops']} GFLOP/s "
        f"({result['fp32_lanes']} fp32 lanes x 2 (multiply, add) x 2 FMA pipes"
        f"{' x 2 (bf16 dot products)' if result['precision'] == 'bf16' else ''} x clock x "
        f"{min(result['threads'], cpu['cores'])} core(s); assumptions in msdseg/evaluation/roofline.py).",
        "",
        "| pass | GFLOP | best s | GFLOP/s | % of peak | passes per case | s per case |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['pass']} | {r['gflop']} | {r['seconds']} | {r['gflops_per_s']} | "
                     f"{r['percent_of_peak']} | {r['per_preset']} | {r['preset_seconds']} |")
    return "\n".join(lines) + "\n"
