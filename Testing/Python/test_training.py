"""Trainer: an interrupted run resumes to exactly the weights of an uninterrupted one, and its log
keeps one header with aligned columns whatever depths each step supervised."""
import csv

import numpy as np
import pytest
import torch

from msdseg.model.network import ModelConfig
from msdseg.training.synth import LabelSource, SyntheticGenerator
from msdseg.training.trainer import Trainer, TrainConfig, TrainMode, synthetic_sample_fn
from shared import TREE

pytestmark = pytest.mark.unit

MODEL = ModelConfig(spacings_mm=(2.0, 4.0, 8.0), channels=(4, 4, 8), image_channels_per_depth=(4, 4, 8), time_dim=16)
# a 2 mm crop supervises three depths, a whole 4 mm volume two: rows of different lengths
MODES = (TrainMode(2.0, (16, 16, 16), 0.5), TrainMode(4.0, None, 0.5))


def _generator() -> SyntheticGenerator:
    shape = (60, 70, 56)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    brain = (x / 26) ** 2 + (y / 30) ** 2 + (z / 22) ** 2 < 1
    lab = np.where(brain, np.where(x < 0, 3, 42), 0).astype(np.int32)
    aff = np.eye(4)
    aff[:3, 3] = -np.array(shape) / 2
    return SyntheticGenerator([LabelSource.from_array("toy", lab, aff)], TREE)


def _trainer(out, max_steps: int) -> Trainer:
    cfg = TrainConfig(out_dir=str(out), max_steps=max_steps, lr=1e-2, warmup_steps=2, log_every=1,
                      modes=MODES, depth_weights=(1.0, 0.5, 0.3), checkpoint_minutes=99)
    return Trainer(cfg, TREE, synthetic_sample_fn(_generator()), model_cfg=MODEL)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly_and_logs_aligned_columns(tmp_path):
    straight = _trainer(tmp_path / "straight", 6)
    straight.run(handle_signals=False)

    first = _trainer(tmp_path / "resumed", 6)
    first.run(handle_signals=False, cancel=lambda: first.step >= 3)  # as an interrupted session would
    second = _trainer(tmp_path / "resumed", 6)
    assert second.step == 3
    second.run(handle_signals=False)

    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(straight.ema.state_dict().items(), second.ema.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"average {name}")
    with open(tmp_path / "resumed" / "train_log.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert header == second.log_fields() and rows.count(header) == 1
    assert [len(r) for r in rows] == [len(header)] * 7
    steps = [int(r[header.index("step")]) for r in rows[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    spacings = {float(r[header.index("entry_mm")]) for r in rows[1:]}
    assert spacings == {2.0, 4.0}  # both row lengths occurred
    for r in rows[1:]:
        depths = 3 if float(r[header.index("entry_mm")]) == 2.0 else 2
        assert r[header.index(f"d{depths - 1}_leaf_dice_loss")] != ""
        assert all(r[header.index(f"d{d}_leaf_dice_loss")] == "" for d in range(depths, 3))


def test_log_of_an_older_layout_is_set_aside(tmp_path):
    (tmp_path / "train_log.csv").write_text("d0_leaf_dice,loss\n0.5,1.0\n")
    trainer = _trainer(tmp_path, 1)
    trainer.run(handle_signals=False)
    assert (tmp_path / "train_log.1.csv").read_text() == "d0_leaf_dice,loss\n0.5,1.0\n"
    with open(tmp_path / "train_log.csv", newline="") as f:
        assert next(csv.reader(f)) == trainer.log_fields()


def test_export_reports_the_whole_lineage(tmp_path):
    """A run started from a model file records that model; its export adds up steps and CPU time."""
    from msdseg.model.modelfile import load_model
    from msdseg.training.trainer import export_checkpoint

    first = _trainer(tmp_path / "a", 2)
    first.run(handle_signals=False)
    base = export_checkpoint(tmp_path / "a", tmp_path / "base.safetensors")
    cfg = TrainConfig(out_dir=str(tmp_path / "b"), max_steps=3, lr=1e-2, warmup_steps=1, modes=MODES,
                      depth_weights=(1.0, 0.5, 0.3), checkpoint_minutes=99, init_model=str(base))
    Trainer(cfg, TREE, synthetic_sample_fn(_generator())).run(handle_signals=False)
    (tmp_path / "base.safetensors").unlink()  # the init file may be replaced later: the run remembers it
    meta = load_model(export_checkpoint(tmp_path / "b", tmp_path / "next.safetensors")).config
    assert meta["train_steps"] == 3 and meta["train_steps_total"] == 5
    assert meta["init_model"]["name"] == "base" and meta["init_model"]["train_steps_total"] == 2
    assert meta["train_cpu_seconds_total"] >= meta["train_cpu_seconds"] > 0


def test_weight_average_follows_its_recurrence_and_is_what_export_ships(tmp_path):
    """After each step the average is decay * previous + (1 - decay) * new weights (the first step
    copies); export writes it by default and says so, and ``raw`` still gives the last weights."""
    from msdseg.model.modelfile import load_model
    from msdseg.training.trainer import export_checkpoint

    decay = 0.5
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=3, lr=1e-2, warmup_steps=1, log_every=1,
                      modes=MODES, depth_weights=(1.0, 0.5, 0.3), checkpoint_minutes=99, ema_decay=decay)
    trainer = Trainer(cfg, TREE, synthetic_sample_fn(_generator()), model_cfg=MODEL)
    expected = None
    for _ in range(3):
        trainer.train_step()
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        expected = weights if expected is None else {
            k: decay * expected[k] + (1 - decay) * weights[k] if weights[k].is_floating_point() else weights[k]
            for k in weights}
    averaged = {k[len("module."):]: v for k, v in trainer.ema.state_dict().items() if k.startswith("module.")}
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, msg=name)
    trainer.save_checkpoint()

    shipped = load_model(export_checkpoint(tmp_path / "run", tmp_path / "avg.safetensors"))
    assert "moving average" in shipped.config["weights"]
    for name, value in shipped.model.state_dict().items():
        torch.testing.assert_close(value, averaged[name], msg=name)
    raw = load_model(export_checkpoint(tmp_path / "run", tmp_path / "raw.safetensors", weights="raw"))
    assert raw.config["weights"] == "training weights of the last step"
    for name, value in raw.model.state_dict().items():
        torch.testing.assert_close(value, trainer.model.state_dict()[name], msg=name)
    assert any(not torch.equal(averaged[k], trainer.model.state_dict()[k]) for k in averaged)


def test_run_without_an_average_exports_its_weights_and_refuses_ema(tmp_path):
    import pytest

    from msdseg.training.trainer import export_checkpoint

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=1, lr=1e-2, warmup_steps=1, modes=MODES,
                      depth_weights=(1.0, 0.5, 0.3), checkpoint_minutes=99, ema_decay=0.0)
    trainer = Trainer(cfg, TREE, synthetic_sample_fn(_generator()), model_cfg=MODEL)
    assert trainer.ema is None
    trainer.run(handle_signals=False)
    export_checkpoint(tmp_path / "run", tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="no weight average"):
        export_checkpoint(tmp_path / "run", tmp_path / "e.safetensors", weights="ema")


def test_training_modes_parse_from_the_command_line():
    from msdseg.training.trainer import TrainMode

    assert TrainMode.parse("2:64:0.45") == TrainMode(2.0, (64, 64, 64), 0.45)
    assert TrainMode.parse("4:0:0.35") == TrainMode(4.0, None, 0.35)
    for bad in ("2:64", "a:64:0.3", "2:64:0", "-1:64:0.2", "2:-5:0.2"):
        with pytest.raises(ValueError, match="SPACING:CROP:WEIGHT|positive"):
            TrainMode.parse(bad)


def test_train_cli_passes_modes_and_top_timesteps(tmp_path, monkeypatch):
    """The flags reach the trainer's config (the trainer itself is replaced: no training here)."""
    import argparse

    from msdseg.training import cli as train_cli, trainer as training

    seen = {}

    class FakeTrainer:
        def __init__(self, cfg, *args, **kwargs):
            seen["cfg"] = cfg
            self.step = 0

        def run(self):
            return 0

    monkeypatch.setattr(train_cli, "load_sources", lambda path, only: ([type("S", (), {"name": "a/b"})()], {}))
    monkeypatch.setattr(training, "Trainer", FakeTrainer)
    monkeypatch.setattr("msdseg.training.synth.SyntheticGenerator", lambda sources, tree, config: seen.update(synth=config))
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    args = p.parse_args(["--data", str(tmp_path / "m.json"), "--out", str(tmp_path / "run"),
                         "--modes", "4:0:0.3", "1:64:0.7", "--t-top-prob", "0.3", "--t-top-min", "950",
                         "--ventricle-change", "0.5", "--nuclei-change", "0.25", "--horn-scale", "0.5"])
    assert train_cli.run(args) == 0
    assert seen["synth"].ventricle_change_prob == 0.5 and seen["synth"].nuclei_change_prob == 0.25
    assert seen["synth"].ventricle_horn_scale == 0.5
    cfg = seen["cfg"]
    assert cfg.modes == (training.TrainMode(4.0, None, 0.3), training.TrainMode(1.0, (64, 64, 64), 0.7))
    assert (cfg.t_top_prob, cfg.t_top_min) == (0.3, 950)
    bad = p.parse_args(["--data", "m.json", "--out", str(tmp_path / "r2"), "--modes", "1:64"])
    from msdseg.core.errors import InputError

    with pytest.raises(InputError, match="SPACING:CROP:WEIGHT"):
        train_cli.run(bad)
