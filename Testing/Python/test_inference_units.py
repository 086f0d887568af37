"""Inference guards: devices, presets, implausible results, model files."""
import json

import pytest
import torch

from msdseg.model import devices
from msdseg.model.devices import autocast_dtype, is_out_of_memory, resolve_device
from msdseg.core.errors import InputError
from msdseg.core.settings import PRESETS, SegmentSettings
from msdseg.inference.pipeline import _check_brain_like
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet
from msdseg.model.modelfile import load_model, save_model

pytestmark = pytest.mark.unit


def test_device_auto_and_explicit():
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")


def test_precision_choices():
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("mps"), "auto") == torch.float16


@pytest.mark.parametrize("fast", [True, False])
def test_cpu_auto_precision_follows_bf16_instructions(monkeypatch, fast):
    """bf16 on a CPU without bf16 instructions is orders of magnitude slower: auto must avoid it."""
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: fast)
    assert autocast_dtype(torch.device("cpu"), "auto") == (torch.bfloat16 if fast else None)


def test_explicit_cpu_bf16_without_instructions_warns(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no bf16 instructions"):
        assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_bf16_probe_survives_missing_or_failing_helpers(monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert devices.cpu_has_fast_bf16() is False


def test_out_of_memory_detection():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_presets_and_overrides():
    assert set(PRESETS) == {"fast", "balanced", "accurate"}
    p = SegmentSettings(preset="balanced", steps=0, samples=3).resolved()
    assert p.steps == 0 and p.samples == 3
    with pytest.raises(InputError):
        SegmentSettings(preset="turbo").resolved()
    with pytest.raises(InputError):
        SegmentSettings(samples=0).resolved()


def test_non_brain_result_is_rejected():
    _check_brain_like(1200.0)
    with pytest.raises(InputError, match="does not look like"):
        _check_brain_like(30.0)
    with pytest.raises(InputError, match="does not look like"):
        _check_brain_like(9000.0)


def test_model_file_round_trip_and_tamper_detection(tmp_path):
    model = MultiscaleDiffUNet(ModelConfig(channels=(4, 8, 8, 8), image_channels_per_depth=(4, 4, 8, 8)))
    path = save_model(model, tmp_path / "m.safetensors", {"metrics": {"dice": 0.5}})
    loaded = load_model(path)
    assert loaded.config["metrics"]["dice"] == 0.5 and loaded.trained
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA256"):
        load_model(path)
    cfg = json.loads(path.with_suffix(".json").read_text())
    assert "architecture" in cfg and cfg["weights_file"] == "m.safetensors"


def test_windowed_sampling_matches_whole_volume_when_one_window_covers_it(monkeypatch):
    """The sliding-window path (used for large grids and after out-of-memory) gives the same
    answer as the whole-volume path when a single window covers the grid."""
    import numpy as np

    import msdseg.inference.sampling as inf
    from msdseg.core.geometry import ModelGrid

    torch.manual_seed(0)
    model = MultiscaleDiffUNet(ModelConfig(channels=(4, 8, 8, 8), image_channels_per_depth=(4, 4, 8, 8))).eval()
    grid = ModelGrid.centred(np.zeros(3), 4.0, fov_mm=(64.0, 64.0, 64.0))
    values = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    whole = inf.predict_on_grid(model, grid, values, 2, 2, 1, precision="fp32", windowed=False)
    monkeypatch.setattr(inf, "WINDOW_ROI", (16, 16, 16))
    win = inf.predict_on_grid(model, grid, values, 2, 2, 1, precision="fp32", windowed=True)
    assert torch.allclose(win.mean.sum(0), torch.ones(grid.shape), atol=1e-4)
    assert torch.allclose(win.mean, whole.mean, atol=1e-4)


def test_refinement_settings_resolve():
    """A preset or an override may finish at a finer spacing; nothing finer, or a deterministic
    pass, turns refinement off rather than failing."""
    assert SegmentSettings(preset="balanced", refine_mm=1.0).resolved().refine_mm == 1.0
    assert SegmentSettings(preset="balanced", refine_mm=0).resolved().refine_mm is None
    assert SegmentSettings(preset="balanced", refine_mm=2.0).resolved().refine_mm is None
    assert SegmentSettings(preset="balanced", refine_mm=1.0, steps=0).resolved().refine_mm is None


def test_ddim_from_an_initial_answer_runs_only_the_remaining_steps():
    """Started at step k of n from an initial answer, each chain makes n - k denoiser calls, sees
    that answer through the noise and never the pure-noise timestep."""
    from msdseg.model.diffusion import ddim_sample

    calls = []
    init = torch.zeros(3, 6, 6, 6)
    init[1] = 1.0  # class 1 everywhere

    def echo(x_t, t):  # a 'denoiser' that believes the noisy labels it is given
        calls.append(int(t))
        return torch.softmax(4.0 * x_t, dim=1)

    res = ddim_sample(echo, (3, 6, 6, 6), steps=4, samples=2, seed=0, init=init, start_step=3)
    assert calls == [249, 249]  # the last step of 999, 749, 499, 249, once per chain
    assert float((res.mean.argmax(0) == 1).float().mean()) > 0.9
    with pytest.raises(ValueError, match="start_step"):
        ddim_sample(echo, (3, 6, 6, 6), steps=4, samples=1, init=init, start_step=4)


@pytest.mark.integration
def test_segment_with_refinement_returns_labels_on_the_input_grid(untrained_model, oblique_phantom):
    """The whole coarse-to-fine path on an oblique phantom: coarse 4 mm, refined at 2 mm."""
    from msdseg.inference.pipeline import segment_image

    seen = []
    res = segment_image(oblique_phantom, SegmentSettings(
        preset="fast", model=untrained_model, device="cpu", spacing_mm=4.0, refine_mm=2.0, steps=2,
        uncertainty=True), progress=lambda f, m: seen.append(f))
    assert res.labels.GetSize() == oblique_phantom.GetSize()
    assert res.info["refine_mm"] == 2.0 and res.info["spacing_mm"] == 4.0
    assert res.uncertainty is not None and res.uncertainty.GetSize() == oblique_phantom.GetSize()
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert res.info["grid_shape"] == [88, 104, 88]  # the labels come from the 2 mm (fine) grid
