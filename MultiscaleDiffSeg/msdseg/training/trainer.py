"""Training loop: synthetic (or paired) samples -> noisy labels -> per-depth hierarchical loss.

Each step draws one *mode*: an entry depth plus either the whole field of view or a patch.  Whole
volumes at a coarse depth teach global context (left vs right, where the cerebellum is) cheaply;
patches at fine depths teach boundaries without the memory of a fine whole volume.  That is the
"mixed patch and whole-volume batches" of the design, and it trains every depth's entry and head.

Checkpoints hold weights and optimiser state as safetensors plus a JSON of counters and RNG state,
written atomically every few minutes and on SIGINT/SIGTERM, so an interrupted run resumes where
it stopped.  A CSV log records every logged step.

An exponential moving average (EMA) of the weights is kept beside the raw weights and is what
:func:`export_checkpoint` ships: with batch size 1 and a high learning rate, neighbouring single
checkpoints differ markedly on real scans (docs/research/field_notes.md, "Checkpoint noise"), and
the average over the last ~1/(1-decay) steps removes most of that noise at no training cost.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from msdseg.model.diffusion import make_train_scheduler, noisy_labels
from msdseg.core.labels import LabelTree
from msdseg.training.losses import HierarchicalLoss, leaf_weight_vector
from msdseg.model.network import ModelConfig, MultiscaleDiffUNet
from msdseg.training.widen import widen_model
from msdseg.model.modelfile import load_model, save_model
from msdseg.training.synth import SyntheticGenerator, TrainingSample


@dataclass
class TrainMode:
    """One kind of training step: entry spacing, patch shape (None = whole FOV), probability."""

    spacing_mm: float
    crop: tuple[int, int, int] | None
    weight: float

    @classmethod
    def parse(cls, text: str) -> "TrainMode":
        """``SPACING:CROP:WEIGHT`` as on the command line, CROP 0 = whole field of view
        (``2:64:0.45`` = 64³ patches at 2 mm in 45 % of the steps)."""
        try:
            spacing, crop, weight = text.split(":")
            size = int(crop)
            mode = cls(float(spacing), (size,) * 3 if size else None, float(weight))
        except ValueError:
            raise ValueError(f"training mode {text!r}: expected SPACING:CROP:WEIGHT, e.g. 2:64:0.45") from None
        if mode.spacing_mm <= 0 or mode.weight <= 0 or size < 0:
            raise ValueError(f"training mode {text!r}: spacing and weight must be positive, crop >= 0")
        return mode


DEFAULT_MODES = (
    TrainMode(4.0, None, 0.35),
    TrainMode(2.0, (64, 64, 64), 0.45),
    TrainMode(1.0, (64, 64, 64), 0.20),
)


@dataclass
class TrainConfig:
    out_dir: str
    max_steps: int = 20000
    max_minutes: float | None = None
    lr: float = 2e-3
    min_lr: float = 5e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    bf16: bool = False
    channels_last: bool = False
    grad_clip: float = 1.0
    modes: tuple[TrainMode, ...] = DEFAULT_MODES
    depth_weights: tuple[float, ...] = (1.0, 0.6, 0.4, 0.3)
    t_min: int = 150  # smallest training timestep: the presets' DDIM steps never go below 165
    t_top_prob: float = 0.0  # share of steps with t drawn from [t_top_min, T): image-only reading
    t_top_min: int = 900
    init_model: str | None = None
    refine_depths: int | None = None  # convert the finest depths' heads to refining heads (model.py)
    widen: tuple[int, ...] | None = None  # grow the init model to these channels (model_widen.py)
    ema_decay: float = 0.999  # 0 disables the weight average
    emphasis: dict[str, float] | None = None  # structure -> leaf loss weight (losses.leaf_weight_vector)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


SampleFn = Callable[[np.random.Generator, TrainMode], TrainingSample]


class Trainer:
    """Owns model, optimiser, sampler and checkpoints; :meth:`run` trains until a limit."""

    def __init__(
        self,
        cfg: TrainConfig,
        tree: LabelTree,
        sample_fn: SampleFn,
        model_cfg: ModelConfig | None = None,
        metadata: dict | None = None,
        device: str = "cpu",
    ):
        self.cfg = cfg
        self.tree = tree
        self.sample_fn = sample_fn
        self.device = torch.device(device)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.init_lineage: dict | None = None
        if cfg.init_model:
            loaded = load_model(cfg.init_model)
            self.model = loaded.model
            self.init_lineage = lineage_of(loaded.config)
        else:
            with torch.random.fork_rng(devices=[]):  # same seed, same initial weights
                torch.manual_seed(cfg.seed)
                self.model = MultiscaleDiffUNet(model_cfg or ModelConfig(n_classes=tree.n_classes))
        if cfg.refine_depths:  # before resuming, so a checkpoint's weights land on the same layout
            self.model.enable_refining_heads(cfg.refine_depths)
        if cfg.widen and tuple(cfg.widen) != tuple(self.model.cfg.channels):  # same reason
            self.model = widen_model(self.model, tuple(cfg.widen), seed=cfg.seed)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = make_ema(self.model, cfg.ema_decay)
        leaf_w = leaf_weight_vector(tree, cfg.emphasis) if cfg.emphasis else None
        self.loss = HierarchicalLoss(tree, depth_weights=list(cfg.depth_weights), leaf_weights=leaf_w)
        self.sched = make_train_scheduler()
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        self.torch_gen = torch.Generator().manual_seed(cfg.seed)
        self.metadata = metadata or {}
        self.elapsed = 0.0
        self._stop = False
        self._resume()

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_weights(self) -> Path:
        return self.out / "checkpoint.safetensors"

    @property
    def ckpt_state(self) -> Path:
        return self.out / "checkpoint.json"

    def save_checkpoint(self) -> None:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        for i, group in enumerate(self.opt.param_groups):
            for j, p in enumerate(group["params"]):
                st = self.opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        tensors[f"opt.{i}.{j}.{key}"] = st[key].detach().cpu().contiguous()
                if "step" in st:
                    tensors[f"opt.{i}.{j}.step"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()})
        tmp = self.ckpt_weights.with_name("checkpoint.tmp.safetensors")
        save_file(tensors, str(tmp))
        state = {
            "step": self.step,
            "elapsed_seconds": self.elapsed,
            "rng": self.rng.bit_generator.state,
            "torch_rng": self.torch_gen.get_state().tolist(),
            "architecture": self.model.cfg.to_dict(),
            "train_config": _jsonable(asdict(self.cfg)),
            "init_lineage": self.init_lineage,
        }
        tmp_json = self.ckpt_state.with_name("checkpoint.tmp.json")
        tmp_json.write_text(json.dumps(state))
        os.replace(tmp, self.ckpt_weights)
        os.replace(tmp_json, self.ckpt_state)

    def _resume(self) -> None:
        if not (self.ckpt_weights.exists() and self.ckpt_state.exists()):
            return
        state = json.loads(self.ckpt_state.read_text())
        tensors = load_file(str(self.ckpt_weights))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, group in enumerate(self.opt.param_groups):
            for j, p in enumerate(group["params"]):
                if f"opt.{i}.{j}.exp_avg" in tensors:
                    self.opt.state[p] = {
                        "exp_avg": tensors[f"opt.{i}.{j}.exp_avg"].to(self.device),
                        "exp_avg_sq": tensors[f"opt.{i}.{j}.exp_avg_sq"].to(self.device),
                        "step": tensors[f"opt.{i}.{j}.step"].reshape(()),
                    }
        if self.ema is not None:
            ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
            if ema_state:
                self.ema.load_state_dict(ema_state)
            # a checkpoint without an average (older runs): the first update copies the weights
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        if state.get("init_lineage"):  # what the run started from, recorded when it started
            self.init_lineage = state["init_lineage"]
        self.rng.bit_generator.state = state["rng"]
        self.torch_gen.set_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))

    # ------------------------------------------------------------------ training
    def _pick_mode(self) -> TrainMode:
        w = np.array([m.weight for m in self.cfg.modes], float)
        return self.cfg.modes[int(self.rng.choice(len(w), p=w / w.sum()))]

    def train_step(self) -> dict[str, float]:
        mode = self._pick_mode()
        sample = self.sample_fn(self.rng, mode)
        entry = self.model.cfg.depth_of(mode.spacing_mm)
        dev = self.device
        image = sample.image[None].to(dev)
        coords = sample.coords[None].to(dev)
        target = sample.target[None].to(dev)
        weight = sample.weight[None].to(dev)
        cmask = sample.channel_mask[None].to(dev)
        imask = sample.internal_mask[None].to(dev)
        x_t, t = noisy_labels(self.sched, target, self.torch_gen, self.cfg.t_min, self.cfg.t_top_prob, self.cfg.t_top_min)
        if self.cfg.channels_last:
            image, x_t = (x.contiguous(memory_format=torch.channels_last_3d) for x in (image, x_t))
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        self.model.train()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            logits = self.model(image, x_t, t, entry=entry, coords=coords)
        loss, parts = self.loss([lg.float() for lg in logits], target, weight, cmask, imask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        parts.update({"entry_mm": mode.spacing_mm, "crop": 0 if mode.crop is None else mode.crop[0],
                      "t": int(t[0]), "grad_norm": float(gnorm), "lr": lr_at(self.step - 1, self.cfg)})
        return parts

    def log_fields(self) -> list[str]:
        """CSV columns: fixed, so rows of steps that supervise fewer depths stay aligned (blank)."""
        per_depth = [f"d{d}_{k}_dice_loss" for d in range(self.model.cfg.depths) for k in ("leaf", "node")]
        return per_depth + ["loss", "entry_mm", "crop", "t", "grad_norm", "lr", "step", "seconds", "elapsed"]

    def _open_log_path(self) -> tuple[Path, bool]:
        """``train_log.csv`` and whether it is new.  A log with other columns (older versions) is
        renamed aside rather than appended to with mismatched columns."""
        path = self.out / "train_log.csv"
        if not path.exists():
            return path, True
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header == self.log_fields():
            return path, False
        n = 1
        while (self.out / f"train_log.{n}.csv").exists():
            n += 1
        path.rename(self.out / f"train_log.{n}.csv")
        return path, True

    def request_stop(self, *_args) -> None:
        self._stop = True

    def run(
        self,
        progress: Callable[[int, dict], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        handle_signals: bool = True,
    ) -> int:
        """Train until ``max_steps``, ``max_minutes`` (this run), a signal or ``cancel()``."""
        if handle_signals:
            old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        start = time.time()
        last_ckpt = start
        log_path, new_log = self._open_log_path()
        try:
            with open(log_path, "a", newline="") as log:
                writer = csv.DictWriter(log, fieldnames=self.log_fields(), restval="", extrasaction="ignore")
                if new_log:
                    writer.writeheader()
                while self.step < self.cfg.max_steps and not self._stop:
                    if cancel is not None and cancel():
                        break
                    if self.cfg.max_minutes is not None and time.time() - start > 60 * self.cfg.max_minutes:
                        break
                    t0 = time.time()
                    parts = self.train_step()
                    dt = time.time() - t0
                    self.elapsed += dt
                    parts.update({"step": self.step, "seconds": round(dt, 3), "elapsed": round(self.elapsed, 1)})
                    if self.step % self.cfg.log_every == 0 or self.step == 1:
                        writer.writerow(parts)
                        log.flush()
                    if progress is not None:
                        progress(self.step, parts)
                    if time.time() - last_ckpt > 60 * self.cfg.checkpoint_minutes:
                        self.save_checkpoint()
                        last_ckpt = time.time()
        finally:
            self.save_checkpoint()
            if handle_signals:
                for s, h in old.items():
                    signal.signal(s, h)
        return self.step


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """PyTorch's EMA wrapper (``AveragedModel`` with ``get_ema_multi_avg_fn``); buffers averaged too."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def synthetic_sample_fn(generator: SyntheticGenerator) -> SampleFn:
    def fn(rng: np.random.Generator, mode: TrainMode) -> TrainingSample:
        return generator.sample(rng, mode.spacing_mm, mode.crop)

    return fn


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def export_checkpoint(
    run_dir: str | Path, path: str | Path, metadata: dict | None = None, weights: str = "auto",
) -> Path:
    """Turn a run's checkpoint into a model file without rebuilding the data pipeline.

    ``weights``: ``"ema"`` (the moving average), ``"raw"`` (the last step's weights) or ``"auto"``
    (the average when the checkpoint has one).  The model JSON records which was written."""
    run = Path(run_dir)
    state = json.loads((run / "checkpoint.json").read_text())
    tensors = load_file(str(run / "checkpoint.safetensors"))
    model = MultiscaleDiffUNet(ModelConfig.from_dict(state["architecture"]))
    ema = {k[len("ema.module."):]: v for k, v in tensors.items() if k.startswith("ema.module.")}
    if weights == "ema" and not ema:
        raise ValueError(f"{run}: the checkpoint holds no weight average")
    use_ema = bool(ema) and weights in ("ema", "auto")
    model.load_state_dict(ema if use_ema else {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    meta = dict(metadata or {})
    steps, seconds = int(state["step"]), round(float(state.get("elapsed_seconds", 0.0)), 1)
    meta.update({"trained": True, "train_steps": steps, "train_cpu_seconds": seconds})
    if use_ema:
        decay = state.get("train_config", {}).get("ema_decay")
        meta["weights"] = f"exponential moving average of the training weights (decay {decay})"
    else:
        meta["weights"] = "training weights of the last step"
    init = state.get("init_lineage")
    if init:
        meta["init_model"] = init
        meta["train_steps_total"] = steps + int(init.get("train_steps_total", 0))
        meta["train_cpu_seconds_total"] = round(seconds + float(init.get("train_cpu_seconds_total", 0.0)), 1)
    return save_model(model, path, meta)


def lineage_of(config: dict) -> dict:
    """What a run started from: the init model's identity and its own cumulative training, so an
    export can report total steps and CPU time even after the init file is replaced."""
    steps = int(config.get("train_steps_total", config.get("train_steps", 0)))
    seconds = float(config.get("train_cpu_seconds_total", config.get("train_cpu_seconds", 0.0)))
    return {"name": config.get("name"), "sha256": config.get("sha256"), "train_steps": config.get("train_steps"),
            "train_steps_total": steps, "train_cpu_seconds_total": round(seconds, 1)}
