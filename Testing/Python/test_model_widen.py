"""Widening a trained model: same outputs at every entry depth and timestep, the new channels learn
from the first step, a widened run resumes and exports a model file that loads, and bad widths are
refused in one line."""
import numpy as np
import pytest
import torch

from msdseg.core.errors import InputError
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet, count_parameters
from msdseg.training.widen import parse_widths, widen_model, widened_config
from shared import TREE

pytestmark = pytest.mark.unit

SMALL = ModelConfig(spacings_mm=(1.0, 2.0, 4.0, 8.0), channels=(4, 8, 8, 16),
                    image_channels_per_depth=(4, 4, 8, 8), time_dim=16, refine_depths=1)


def _trained_like(cfg: ModelConfig, seed: int = 0) -> MultiscaleDiffUNet:
    """A model whose norm affines and biases are not at their defaults, as after training."""
    torch.manual_seed(seed)
    model = MultiscaleDiffUNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(cfg: ModelConfig, n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 1, n, n, n, generator=g), torch.randn(1, cfg.n_classes, n, n, n, generator=g),
            torch.randn(1, 3, n, n, n, generator=g))


@pytest.mark.parametrize("entry", [0, 1, 2, 3])
@pytest.mark.parametrize("t", [200, 999])
def test_widened_model_computes_what_the_narrow_one_did(entry, t):
    narrow = _trained_like(SMALL)
    wide = widen_model(narrow, (4, 16, 16, 32)).eval()
    assert count_parameters(wide) > 2 * count_parameters(narrow)
    img, xt, coords = _inputs(SMALL)
    with torch.no_grad():
        before = narrow(img, xt, torch.tensor([t]), entry=entry, coords=coords)
        after = wide(img, xt, torch.tensor([t]), entry=entry, coords=coords)
    assert len(before) == len(after) == SMALL.depths - entry
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_widening_twice_and_the_image_encoder_separately_still_preserve_outputs():
    narrow = _trained_like(SMALL)
    once = widen_model(narrow, (4, 16, 16, 32), image_channels=(8, 4, 16, 8))
    twice = widen_model(once, (8, 32, 16, 32)).eval()
    assert twice.cfg.width_scale == (2, 4, 2, 2) and twice.cfg.image_width_scale == (4, 2, 2, 1)
    img, xt, coords = _inputs(SMALL)
    with torch.no_grad():
        for a, b in zip(narrow(img, xt, torch.tensor([500]), coords=coords),
                        twice(img, xt, torch.tensor([500]), coords=coords)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_new_channels_get_gradients_and_move_after_one_step():
    """Zero weights out of the new channels must not leave them dead: after one optimiser step the
    outputs differ from the narrow model's, and every new weight block has received a gradient."""
    narrow = _trained_like(SMALL)
    wide = widen_model(narrow, (4, 16, 16, 32))
    img, xt, coords = _inputs(SMALL)
    opt = torch.optim.Adam(wide.parameters(), lr=1e-3)
    out = wide(img, xt, torch.tensor([500]), entry=1, coords=coords)
    sum(o.square().mean() for o in out).backward()
    head = wide.heads[1].weight.grad  # (classes, 16 channels, 1, 1, 1): 8 old inputs, 8 new
    assert head[:, 8:].abs().sum() > 0
    opt.step()
    with torch.no_grad():
        moved = wide(img, xt, torch.tensor([500]), entry=1, coords=coords)[0]
        same = narrow(img, xt, torch.tensor([500]), entry=1, coords=coords)[0]
    assert not torch.allclose(moved, same, atol=1e-4)


def test_widths_are_checked_with_one_line_errors():
    with pytest.raises(InputError, match="whole-number"):
        widened_config(SMALL, (4, 12, 8, 16))
    with pytest.raises(InputError, match="3 widths"):
        widened_config(SMALL, (4, 8, 8))
    with pytest.raises(InputError, match="comma-separated"):
        parse_widths("8;32")
    assert parse_widths("8,32,64,128") == (8, 32, 64, 128)


def test_widened_run_resumes_on_the_wide_layout_and_exports_a_loadable_model(tmp_path):
    from msdseg.model.modelfile import load_model, save_model
    from msdseg.training.synth import LabelSource, SyntheticGenerator
    from msdseg.training.trainer import TrainConfig, Trainer, TrainMode, export_checkpoint, synthetic_sample_fn

    cfg = ModelConfig(spacings_mm=(2.0, 4.0, 8.0), channels=(4, 4, 8), image_channels_per_depth=(4, 4, 8),
                      time_dim=16)
    base = tmp_path / "base.safetensors"
    save_model(MultiscaleDiffUNet(cfg), base, {"name": "base"})
    shape = (48, 56, 48)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    lab = np.where((x / 20) ** 2 + (y / 24) ** 2 + (z / 18) ** 2 < 1, np.where(x < 0, 3, 42), 0).astype(np.int32)
    aff = np.eye(4)
    aff[:3, 3] = -np.array(shape) / 2
    sample_fn = synthetic_sample_fn(SyntheticGenerator([LabelSource.from_array("toy", lab, aff)], TREE))

    def trainer(steps: int) -> Trainer:
        tc = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=steps, lr=1e-3, warmup_steps=1,
                         modes=(TrainMode(2.0, (16, 16, 16), 1.0),), depth_weights=(1.0, 0.5, 0.3),
                         checkpoint_minutes=99, init_model=str(base), widen=(8, 8, 16))
        return Trainer(tc, TREE, sample_fn)

    first = trainer(2)
    assert first.model.cfg.channels == (8, 8, 16)
    first.run(handle_signals=False)
    again = trainer(3)  # resumes: the checkpoint holds wide weights, the init file narrow ones
    assert again.step == 2
    again.run(handle_signals=False)
    loaded = load_model(export_checkpoint(tmp_path / "run", tmp_path / "wide.safetensors"))
    assert loaded.model.cfg.channels == (8, 8, 16) and loaded.model.cfg.width_scale == (2, 2, 2)
    for a, b in zip(loaded.model.state_dict().values(), again.ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)
