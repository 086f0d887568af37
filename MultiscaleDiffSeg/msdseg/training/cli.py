"""``msdseg train``: build a synthetic sampler from a prepared data manifest and run the trainer.

Resumes automatically from ``OUT/checkpoint.*``; ``--init`` starts a new run from a model file
(for example the shipped model) instead of random weights.  ``--export`` writes the current
weights as a model file (safetensors + JSON with provenance) without training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from msdseg.core.errors import InputError



HELP = "train or fine-tune on synthetic images from label maps"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="manifest.json written by 'msdseg prepare-data'")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log)")
    p.add_argument("--steps", type=int, default=20000, help="total steps of the schedule")
    p.add_argument("--minutes", type=float, default=None, help="stop this run after so many minutes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast (faster on CPUs with AVX-512 BF16 or AMX, far slower without; "
                   "measurements in docs/research/field_notes.md)")
    p.add_argument("--init", default=None, help="start from this model file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="decay of the weight average that exports ship (0 = none)")
    p.add_argument("--export", default=None, help="write the run's weights as a model file and exit")
    p.add_argument("--export-weights", choices=("auto", "ema", "raw"), default="auto",
                   help="which weights --export writes: the average (if the run has one) or the last step's")
    p.add_argument("--sources", nargs="*", default=None,
                   help="only maps of these sources (atlas draws: samseg_priors, gca_priors)")
    p.add_argument("--modes", nargs="+", default=None, metavar="SPACING:CROP:WEIGHT",
                   help="step kinds and their shares, CROP 0 = whole field of view "
                        "(default 4:0:0.35 2:64:0.45 1:64:0.2)")
    p.add_argument("--t-top-prob", type=float, default=0.0,
                   help="share of steps whose timestep is drawn from [--t-top-min, 1000), where the "
                        "noisy labels carry almost nothing and the network must read the image")
    p.add_argument("--t-top-min", type=int, default=900)
    p.add_argument("--refine-depths", type=int, default=None, metavar="N",
                   help="make the finest N depths' heads refine the upsampled coarser logits "
                        "(converts an --init model whose heads do not; see msdseg/model/network.py)")
    p.add_argument("--widen", default=None, metavar="C1,C2,...",
                   help="grow the --init model to these channels per depth (whole multiples of its "
                        "own), starting from its exact outputs; see msdseg/training/widen.py")
    p.add_argument("--ventricle-change", type=float, default=0.0, metavar="PROB",
                   help="share of cases whose ventricles grow or shrink by up to a few mm "
                        "(msdseg.training.synth.resize_ventricles); 0 keeps earlier runs' random stream")
    p.add_argument("--horn-scale", type=float, default=1.0, metavar="SHARE",
                   help="share of the ventricles' size change that their thin temporal horns get "
                        "(1: all of it, as earlier runs)")
    p.add_argument("--nuclei-change", type=float, default=0.0, metavar="PROB",
                   help="share of cases whose deep grey nuclei grow or shrink, each pair again with this "
                        "share (msdseg.training.synth.resize_nuclei); 0 keeps earlier runs' random stream")
    p.add_argument("--emphasis", nargs="+", default=None, metavar="STRUCTURE=WEIGHT",
                   help="leaf loss weights, e.g. hippocampus=2 amygdala=2 (both sides; a full leaf id such as "
                        "left_hippocampus weights one side); every other structure 1")
    p.add_argument("--focus-crops", type=float, default=0.0, metavar="PROB",
                   help="share of cropped steps centred on an emphasised structure (weight above 1); "
                        "0 keeps earlier runs' random stream")


def _emphasis(items: list[str] | None, tree) -> dict[str, float] | None:
    """``["hippocampus=2", ...]`` -> ``{"hippocampus": 2.0}``, checked against the label tree."""
    from msdseg.training.losses import leaf_weight_vector

    if not items:
        return None
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value) if sep else float("nan")
        except ValueError:
            out[name] = float("nan")
        if not sep or out[name] != out[name]:
            raise InputError(f"--emphasis {item}: write STRUCTURE=WEIGHT, e.g. hippocampus=2")
    try:
        leaf_weight_vector(tree, out)
    except ValueError as exc:
        raise InputError(f"--emphasis: {exc}") from None
    return out


def _focus_labels(emphasis: dict[str, float] | None, tree) -> tuple[int, ...]:
    """aseg numbers of the leaves whose emphasis is above 1 (the structures focus crops centre on)."""
    from msdseg.training.losses import leaf_weight_vector

    if not emphasis:
        return ()
    weights = leaf_weight_vector(tree, emphasis)
    return tuple(int(tree.channel_to_aseg[c]) for c in range(1, tree.n_classes) if weights[c] > 1)


def load_sources(manifest_path: Path, only: list[str] | None = None):
    """Training label maps of a manifest (role 'train'), as :class:`LabelSource` objects."""
    from msdseg.training.synth import LabelSource

    if not manifest_path.exists():
        raise InputError(f"{manifest_path}: manifest not found (run 'msdseg prepare-data' first)")
    doc = json.loads(manifest_path.read_text())
    base = manifest_path.parent
    out = []
    for m in doc.get("maps", []):
        if m.get("role") != "train" or (only and m["source"] not in only):
            continue
        src = LabelSource.from_file(base / m["path"], set(m["defined"]), m.get("merged", []))
        src.name = f"{m['source']}/{m['name']}"
        out.append(src)
    for name, priors in _prior_files(doc, base):
        if not only or name.split("/")[0] in only:
            from msdseg.training.priors import PriorMapSampler

            out.append(PriorMapSampler(priors, name=name))
    if not out:
        raise InputError(f"{manifest_path}: no training maps")
    return out, doc


def _prior_files(doc: dict, base: Path) -> list[tuple[str, Path]]:
    """(training-source name, path) of every atlas priors file the manifest names and that exists."""
    from msdseg.training.priors import PRIOR_SOURCES

    out = []
    for source, name in PRIOR_SOURCES.items():
        rel = doc.get("extras", {}).get(source, {}).get("priors")
        if rel and (base / rel).exists():
            out.append((name, base / rel))
    return out


def _widths(text: str | None) -> tuple[int, ...] | None:
    from msdseg.training.widen import parse_widths

    return None if text is None else parse_widths(text)


def run(args: argparse.Namespace) -> int:
    import torch

    from msdseg.core.labels import load_tree
    from msdseg.training.synth import SynthConfig, SyntheticGenerator
    from msdseg.training.trainer import TrainConfig, Trainer, TrainMode, synthetic_sample_fn

    if not 0.0 <= args.ventricle_change <= 1.0:
        raise InputError(f"--ventricle-change {args.ventricle_change}: give a share between 0 and 1")
    if not 0.0 <= args.horn_scale <= 1.0:
        raise InputError(f"--horn-scale {args.horn_scale}: give a share between 0 and 1")
    if not 0.0 <= args.nuclei_change <= 1.0:
        raise InputError(f"--nuclei-change {args.nuclei_change}: give a share between 0 and 1")
    if not 0.0 <= args.focus_crops <= 1.0:
        raise InputError(f"--focus-crops {args.focus_crops}: give a share between 0 and 1")
    tree = load_tree()
    emphasis = _emphasis(args.emphasis, tree)
    if args.focus_crops > 0 and not any(w > 1 for w in (emphasis or {}).values()):
        raise InputError("--focus-crops needs --emphasis with at least one weight above 1 (the structures to centre on)")
    if args.export:
        from msdseg.training.trainer import export_checkpoint

        doc = json.loads(Path(args.data).read_text()) if Path(args.data).exists() else {}
        maps = [f"{m['source']}/{m['name']}" for m in doc.get("maps", []) if m.get("role") == "train"]
        maps += [name for name, _ in _prior_files(doc, Path(args.data).parent)]
        meta = {"data": {"manifest": str(args.data), "wheels": doc.get("wheels", {}), "maps": maps},
                "label_tree": {"name": tree.name, "version": tree.version}}
        print(export_checkpoint(args.out, args.export, meta, weights=args.export_weights))
        return 0
    sources, doc = load_sources(Path(args.data), args.sources)
    if args.bf16:  # the CLI trains on the CPU
        from msdseg.model.devices import cpu_has_fast_bf16, warn_slow_cpu_bf16

        if not cpu_has_fast_bf16():
            warn_slow_cpu_bf16()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(out_dir=args.out, max_steps=args.steps, max_minutes=args.minutes, lr=args.lr,
                      bf16=args.bf16, seed=args.seed, threads=args.threads, init_model=args.init,
                      ema_decay=args.ema_decay, t_top_prob=args.t_top_prob, t_top_min=args.t_top_min,
                      refine_depths=args.refine_depths, widen=_widths(args.widen), emphasis=emphasis)
    if args.modes:
        try:
            cfg.modes = tuple(TrainMode.parse(m) for m in args.modes)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    synth_cfg = SynthConfig(ventricle_change_prob=args.ventricle_change, nuclei_change_prob=args.nuclei_change,
                            ventricle_horn_scale=args.horn_scale, focus_prob=args.focus_crops,
                            focus_labels=_focus_labels(emphasis, tree))
    meta = {"data": {"manifest": str(args.data), "sources": sorted({s.name.split('/')[0] for s in sources}),
                     "maps": [s.name for s in sources], "wheels": doc.get("wheels", {})}}
    trainer = Trainer(cfg, tree, synthetic_sample_fn(SyntheticGenerator(sources, tree, synth_cfg)), metadata=meta)
    print(f"training from step {trainer.step} on {len(sources)} maps; log: {Path(args.out) / 'train_log.csv'}", flush=True)
    step = trainer.run()
    print(f"stopped at step {step}", flush=True)
    return 0
