"""The roofline's arithmetic: FLOPs counted by PyTorch agree with the convolutions' own sizes, and
the CPU peak follows the stated lanes x pipes x clock rule."""
import pytest
import torch

from msdseg.evaluation.roofline import CpuInfo, measure_passes
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet

pytestmark = pytest.mark.unit


def _cpu(**kw) -> CpuInfo:
    base = dict(model="x", vendor="GenuineIntel", family=6, mhz=3000.0, cores=2, flags=["avx2", "fma"], isa_cap="")
    base.update(kw)
    return CpuInfo(**base)


def test_avx2_peak_is_eight_lanes_two_pipes():
    assert _cpu().peak_gflops(threads=2, precision="fp32") == pytest.approx(8 * 2 * 2 * 3.0 * 2)


def test_avx512_doubles_the_lanes_unless_capped_or_zen4():
    wide = ["avx2", "fma", "avx512f"]
    assert _cpu(flags=wide).fp32_lanes() == 16
    assert _cpu(flags=wide, isa_cap="AVX2").fp32_lanes() == 8
    assert _cpu(flags=wide, vendor="AuthenticAMD", family=25).fp32_lanes() == 8


def test_bf16_peak_is_twice_fp32_and_threads_are_capped_by_cores():
    cpu = _cpu()
    assert cpu.peak_gflops(2, "bf16") == pytest.approx(2 * cpu.peak_gflops(2, "fp32"))
    assert cpu.peak_gflops(8, "fp32") == pytest.approx(cpu.peak_gflops(2, "fp32"))


def test_denoiser_flops_include_every_three_by_three_convolution():
    """At least the 3x3x3 convolutions' 2 x 27 x Cin x Cout x voxels of the entry depth's blocks."""
    cfg = ModelConfig(channels=(4, 8, 8, 8), image_channels_per_depth=(4, 4, 8, 8))
    model = MultiscaleDiffUNet(cfg).eval()
    n = 16
    rows = {r["pass"]: r for r in measure_passes(model, (n, n, n), entry=0, precision="fp32", repeat=1)}
    vox = n**3
    entry_blocks = 2 * 27 * vox * (4 * 4 + 4 * 4 + 8 * 4 + 4 * 4)  # encoder block + decoder block at depth 0
    assert rows["denoiser pass"]["gflop"] * 1e9 >= entry_blocks * 0.99
    assert rows["denoiser pass"]["seconds"] > 0 and rows["encoder pass"]["gflop"] > 0
    assert torch.get_num_threads() >= 1
