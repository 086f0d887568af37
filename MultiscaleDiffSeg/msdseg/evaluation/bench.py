"""Benchmarks: seconds and peak memory per volume and preset, and cohort throughput vs. workers.

    python -m msdseg.evaluation.bench -o bench/                      # the full run (takes long on a CPU)
    python -m msdseg.evaluation.bench -o bench/ --small              # a 48^3 4 mm phantom: checks the script
    python -m msdseg.evaluation.bench -o bench/ --presets fast --volumes mni152 --workers 1 2 --cohort-cases 4
    python -m msdseg.evaluation.bench -o bench/ --presets balanced --volumes pad256 --skip-scaling --models A B
                                                          # two model files, same run, same machine load

Why every measurement is a separate child process: that is what a user runs (``msdseg segment``),
it includes import, model loading and writing, and a fresh process makes peak memory meaningful.

* **Per volume and preset**: ``python -m msdseg.evaluation.bench child ...`` loads, segments and writes one
  volume and reports its own phase timings; the parent adds the wall time and the child's peak
  resident memory, ``ru_maxrss`` from ``os.wait4`` on that very child (not
  ``getrusage(RUSAGE_CHILDREN)``, which would mix all children of the benchmark).
* **Scaling**: ``msdseg segment`` on a cohort of ``--cohort-cases`` copies of a volume with
  ``--jobs 1..N``; throughput in cases per hour.  Pool workers are children of the fork server,
  not of the driver, so ``ru_maxrss`` of the driver misses them: the total resident memory of the
  whole process tree is sampled (psutil when installed, else ``/proc``) and its peak reported too.

Volumes: ``mni152`` is nilearn's MNI152 2009 T1 at 1 mm (197 x 233 x 189, the demo's sample);
``pad256`` is the same image zero-padded (centred) to 256^3 at 1 mm, the size of a typical
FreeSurfer-conformed scan; ``phantom`` is the tests' 48^3 4 mm head phantom (``--small``).
Results go to ``OUTDIR/bench.json`` and a Markdown table ``OUTDIR/bench.md`` for
``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from msdseg.core.settings import PRESETS, add_intensity_argument


# ----------------------------------------------------------------------------- volumes
def make_volumes(outdir: Path, names: Sequence[str]) -> dict[str, Path]:
    """Write the benchmark volumes once; returns name -> path."""
    import SimpleITK as sitk

    vol_dir = outdir / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if any(n in names for n in ("mni152", "pad256")):
        from msdseg.resources import sample_t1_path

        mni = sample_t1_path()
        if "mni152" in names:
            paths["mni152"] = mni
        if "pad256" in names:
            target = vol_dir / "mni152_pad256.nii.gz"
            if not target.exists():
                img = sitk.ReadImage(str(mni))
                size = np.array(img.GetSize())
                lower = [int(v) for v in np.maximum(0, (256 - size) // 2)]
                upper = [int(v) for v in np.maximum(0, 256 - size - np.array(lower))]
                padded = sitk.ConstantPad(img, lower, upper, 0.0)
                padded = sitk.RegionOfInterest(padded, [256, 256, 256], [0, 0, 0])
                sitk.WriteImage(padded, str(target))
            paths["pad256"] = target
    if "phantom" in names:
        target = vol_dir / "phantom_48_4mm.nii.gz"
        if not target.exists():
            k, j, i = np.meshgrid(*[np.arange(48) * 4.0 - 94.0] * 3, indexing="ij")
            head = (i / 70) ** 2 + (j / 90) ** 2 + (k / 70) ** 2 < 1
            blob = ((i - 30) / 20) ** 2 + (j / 25) ** 2 + (k / 20) ** 2 < 1
            img = sitk.GetImageFromArray((100.0 * head + 300.0 * blob).astype(np.float32))
            img.SetSpacing((4.0, 4.0, 4.0))
            sitk.WriteImage(img, str(target))
        paths["phantom"] = target
    return paths


# ----------------------------------------------------------------------------- measuring
def _tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants."""
    try:
        import psutil

        proc = psutil.Process(root)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return int(total)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process just ended
        return 0
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    family, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in family:
                family.add(pid)
                frontier.append(pid)
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in family:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_measured(cmd: list[str], env: dict[str, str], log: Path, sample_s: float = 0.5) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, CPU seconds, ``ru_maxrss`` of the child and the peak tree RSS."""
    peak = [0]
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
                done.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "maxrss_mib": round(usage.ru_maxrss / 1024.0, 1),  # KiB on Linux
        "peak_tree_rss_mib": round(peak[0] / 2**20, 1),
    }


def _last_json(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


# ----------------------------------------------------------------------------- child
def child_main(args: argparse.Namespace) -> int:
    """One volume in a fresh process: phase timings as one JSON line on stdout."""
    t_start = time.perf_counter()
    from msdseg.core.allocator import keep_freed_memory
    from msdseg.core.settings import SegmentSettings

    keep_freed_memory()  # as the msdseg command does
    from msdseg.inference.pipeline import segment_image
    from msdseg.core.io import load_volume
    from msdseg.outputs.writers import write_case_outputs

    t_import = time.perf_counter()
    image = load_volume(args.input)
    t_read = time.perf_counter()
    settings = SegmentSettings(preset=args.preset, device=args.device, steps=args.steps, samples=args.samples,
                               uncertainty=True, model=args.model, intensity=args.intensity,
                               precision=args.precision)
    result = segment_image(image, settings)
    t_seg = time.perf_counter()
    write_case_outputs(result, Path(args.output), "bench")
    t_write = time.perf_counter()
    import torch

    print(json.dumps({
        "import_s": round(t_import - t_start, 2), "read_s": round(t_read - t_import, 2),
        "segment_s": round(t_seg - t_read, 2), "write_s": round(t_write - t_seg, 2),
        "grid_shape": result.info.get("grid_shape"), "device": result.info.get("device"),
        "steps": result.info.get("steps"), "samples": result.info.get("samples"),
        "torch_threads": torch.get_num_threads(), "input_size": list(image.GetSize()),
        "intensity_refined": result.info.get("intensity_refined"),
        "precision": _precision_path(args.precision, result.info.get("device") or "cpu"),
    }), flush=True)
    return 0


def _precision_path(precision: str, device: str) -> str:
    """The arithmetic the convolutions ran in ("fp32", "bf16", "fp16")."""
    import torch

    from msdseg.model.devices import autocast_dtype

    dtype = autocast_dtype(torch.device(device), precision)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def roofline_child(args: argparse.Namespace) -> int:
    """FLOPs and achieved rate of one encoder and one denoiser pass on the preset's grid."""
    import SimpleITK as sitk

    from msdseg.core.geometry import head_grid
    from msdseg.evaluation.roofline import roofline, roofline_markdown
    from msdseg.model.modelfile import load_model
    from msdseg.resources import sample_t1_path

    from msdseg.core.allocator import keep_freed_memory

    keep_freed_memory()  # as in every msdseg process that segments
    plan = PRESETS[args.preset]
    model = load_model(args.model).model.eval()
    grid = head_grid(sitk.ReadImage(str(sample_t1_path())), plan.spacing_mm)
    encoder_passes, denoiser_passes = plan.passes
    passes = {"encoder pass": encoder_passes, "denoiser pass": denoiser_passes}
    result = roofline(model, tuple(grid.shape), model.cfg.depth_of(plan.spacing_mm), args.precision,
                      args.threads or (os.cpu_count() or 1), passes, args.repeat)
    result["isa"] = args.isa
    print(roofline_markdown(result, args.preset))
    print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- driver
#: ``--isa avx2``: what a CPU without AVX-512 runs, reproduced on one that has it (oneDNN's
#: convolutions and ATen's vectorised kernels both capped).
ISA_CAPS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def _env(threads: int | None, isa: str = "native") -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the pool divides the cores itself; a stray 1 would cap it
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(ISA_CAPS[isa])
    return env


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import torch

    from msdseg.evaluation.roofline import cpu_info

    return {"cpu": model, "cores": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in load],
            "flags": cpu_info().flags, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform()}


def bench_presets(volumes: dict[str, Path], presets: Sequence[str], outdir: Path, args) -> list[dict[str, Any]]:
    """One child process per volume, model and preset (``--models`` compares models in one run)."""
    rows = []
    intensity_variants = [True, False] if args.compare_intensity else [True]
    for (vname, vpath), model, preset, intensity in itertools.product(
            volumes.items(), args.models or [None], presets, intensity_variants):
        label = _model_label(model)
        work = outdir / "runs" / (f"{vname}_{preset}" if model is None else f"{vname}_{preset}_{label}")
        if not intensity:
            work = work.with_name(work.name + "_no_intensity")
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "msdseg.evaluation.bench", "child", "--input", str(vpath), "--preset", preset,
               "--device", args.device, "--output", str(work), "--precision", args.precision]
        if model is not None:
            cmd += ["--model", str(model)]
        if args.steps is not None:
            cmd += ["--steps", str(args.steps)]
        if args.samples is not None:
            cmd += ["--samples", str(args.samples)]
        if not intensity:
            cmd += ["--no-intensity"]
        for rep in range(args.repeat):
            log = work / f"log_{rep}.txt"
            m = run_measured(cmd, _env(args.threads, args.isa), log)
            row = {"kind": "preset", "volume": vname, "preset": preset + ("" if intensity else " --no-intensity"),
                   "model": label, "repeat": rep, "isa": args.isa,
                   **m, **_last_json(log)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _model_label(model: str | None) -> str:
    """Folder and stem: exported candidates are all called msdseg_brain.safetensors."""
    return "shipped" if model is None else f"{Path(model).parent.name}-{Path(model).stem}"


def bench_scaling(volume: tuple[str, Path], workers: Sequence[int], cases: int, preset: str, outdir: Path,
                  args) -> list[dict[str, Any]]:
    vname, vpath = volume
    cohort_in = outdir / "cohort_in"
    cohort_in.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        link = cohort_in / f"case{i:03d}_T1w.nii.gz"
        if not link.exists():
            # real copies: the cohort driver treats paths resolving to one file as one case
            shutil.copyfile(vpath.resolve(), link)
    rows = []
    base = None
    for w in workers:
        out = outdir / "runs" / f"cohort_{vname}_{preset}_jobs{w}"
        cmd = [sys.executable, "-m", "msdseg", "segment", str(cohort_in), "-o", str(out), "--preset", preset,
               "--device", args.device, "--jobs", str(w), "--progress", "none", "--overwrite", "--no-report"]
        if args.steps is not None:
            cmd += ["--steps", str(args.steps)]
        if args.samples is not None:
            cmd += ["--samples", str(args.samples)]
        out.mkdir(parents=True, exist_ok=True)
        m = run_measured(cmd, _env(None), out.parent / f"cohort_{vname}_{preset}_jobs{w}.log")
        per_hour = 3600.0 * cases / m["wall_s"] if m["wall_s"] else float("nan")
        base = base or per_hour
        row = {"kind": "scaling", "volume": vname, "preset": preset, "jobs": w, "cases": cases, **m,
               "cases_per_hour": round(per_hour, 1), "speedup": round(per_hour / base, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, flags {' '.join(info.get('flags', []))}, "
             f"torch {info['torch']}, load average at start {info['load_avg_at_start']}.", ""]
    pre = [r for r in rows if r["kind"] == "preset"]
    if pre:
        lines += ["| volume | model | preset | ISA | path | threads | model grid | wall s | segment s | import s "
                  "| peak RSS MiB |",
                  "| --- | --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['volume']} | {r.get('model', 'shipped')} | {r['preset']} | {r.get('isa', 'native')} | "
                  f"{r.get('precision', '')} | {r.get('torch_threads', '')} | "
                  f"{'x'.join(map(str, r.get('grid_shape') or []))} | "
                  f"{r['wall_s']} | {r.get('segment_s', '')} | {r.get('import_s', '')} | {r['maxrss_mib']} |"
                  for r in pre]
        lines.append("")
    sc = [r for r in rows if r["kind"] == "scaling"]
    if sc:
        lines += ["| volume | preset | jobs | cases | wall s | cases/hour | speed-up | peak tree RSS MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['volume']} | {r['preset']} | {r['jobs']} | {r['cases']} | {r['wall_s']} | "
                  f"{r['cases_per_hour']} | {r['speedup']} | {r['peak_tree_rss_mib']} |" for r in sc]
    return "\n".join(lines) + "\n"


def roofline_main(argv: Sequence[str]) -> int:
    """``bench roofline``: re-run in a child so the ISA cap is set before PyTorch loads."""
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.bench roofline",
                                description="FLOPs, achieved GFLOP/s and the CPU's peak for one preset's passes")
    p.add_argument("--preset", default="balanced", choices=list(PRESETS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--isa", default="native", choices=list(ISA_CAPS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("-o", "--output", default=None, help="also write the JSON result here")
    p.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_child:
        return roofline_child(args)
    cmd = [sys.executable, "-m", "msdseg.evaluation.bench", "roofline", *argv, "--in-child"]
    proc = subprocess.run(cmd, env=_env(args.threads, args.isa), capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    out = [line for line in proc.stdout.splitlines() if not line.startswith("{")]
    print("\n".join(out))
    if args.output and proc.returncode == 0:
        Path(args.output).write_text(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    return proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.bench child")
        p.add_argument("--input", required=True)
        p.add_argument("--preset", default="fast")
        p.add_argument("--device", default="cpu")
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--samples", type=int, default=None)
        p.add_argument("--model", default=None)
        p.add_argument("--output", required=True)
        p.add_argument("--precision", default="auto")
        add_intensity_argument(p)
        return child_main(p.parse_args(argv[1:]))
    if argv[:1] == ["roofline"]:
        return roofline_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--volumes", nargs="+", default=["mni152", "pad256"], choices=["mni152", "pad256", "phantom"])
    p.add_argument("--workers", nargs="+", type=int, default=None, help="jobs to try (default 1..cores)")
    p.add_argument("--cohort-cases", type=int, default=None, help="cases in the scaling cohort (default 2 x max jobs)")
    p.add_argument("--cohort-preset", default="fast", choices=PRESETS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of the single-volume runs (default all)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the single-volume runs' arithmetic (auto: bf16 where the CPU has bf16 instructions)")
    p.add_argument("--isa", default="native", choices=list(ISA_CAPS),
                   help="avx2: cap oneDNN and ATen at AVX2, as on a CPU without AVX-512 (use with --precision fp32)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--models", nargs="+", default=None,
                   help="model files to measure one after the other in the same run (default: the shipped model)")
    p.add_argument("--compare-intensity", action="store_true",
                   help="measure every preset also with --no-intensity, in the same run")
    p.add_argument("--skip-presets", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--small", action="store_true", help="the 48^3 4 mm phantom only, to check the script")
    args = p.parse_args(argv)
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    if args.small:
        args.volumes = ["phantom"]
    info = machine_info()
    volumes = make_volumes(outdir, args.volumes)
    rows: list[dict[str, Any]] = []
    if not args.skip_presets:
        rows += bench_presets(volumes, args.presets, outdir, args)
    if not args.skip_scaling:
        workers = args.workers or list(range(1, (os.cpu_count() or 1) + 1))
        cases = args.cohort_cases or 2 * max(workers)
        first = next(iter(volumes.items()))
        rows += bench_scaling(first, workers, cases, args.cohort_preset, outdir, args)
    (outdir / "bench.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    (outdir / "bench.md").write_text(markdown(info, rows))
    print(markdown(info, rows))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
