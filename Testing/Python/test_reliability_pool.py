"""Runs under faults: a local worker killed with SIGKILL, Dask faults on a real cluster (scheduler and
worker in processes of their own), two runs into one output folder, truncated input files.

Nothing here is faked: workers are real processes killed with ``os.kill(pid, SIGKILL)`` (their pid
read from the case log, where every attempt writes ``start ... pid N``), the Dask scheduler and
worker are started as ``python -m distributed.cli.dask_*``, and the truncated files are real
images cut short.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn
from msdseg.batch.cohort import case_complete, run_cohort
from msdseg.batch.workers import Case
from msdseg.cli.main import main
from msdseg.core.errors import InputError
from msdseg.core.io import read_image
from msdseg.core.lock import LOCK_NAME, FolderBusy, FolderLock
from msdseg.core.settings import SegmentSettings

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAMPLE = HERE.parents[1] / "MultiscaleDiffSeg" / "msdseg" / "resources" / "samples" / "sample_T1.nii.gz"
START = re.compile(r"^\S+ \S+ start .* pid (\d+) settings", re.M)


def head(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(make_image((48, 48, 48), (4.0, 4.0, 4.0), np.eye(3), fn=phantom_fn), str(path))
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def attempts(out: Path, stem: str) -> list[int]:
    """The pid of every attempt at a case, from its log."""
    log = out / "logs" / f"{stem}.log"
    return [int(pid) for pid in START.findall(log.read_text())] if log.exists() else []


def copy_model(source: str, target: Path) -> Path:
    """The weights and the JSON config beside them."""
    for suffix in (".safetensors", ".json"):
        shutil.copy(Path(source).with_suffix(suffix), target.with_suffix(suffix))
    return target


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".msdseg-tmp-", ".msdseg-bak-"))]


# ----------------------------------------------------------------------------- local pool
@pytest.mark.slow
def test_a_killed_worker_fails_only_its_own_case(tmp_path, untrained_model):
    """Four cases, two workers.  The worker running c0 is killed while c1 runs in the other worker
    and c3 has not started; c0's retry is killed too, and c2's first attempt.  Only c0 fails, naming
    the signal; c2 succeeds on its retry; c1 and c3 run exactly once and finish."""
    inp, out = tmp_path / "in", tmp_path / "out"
    stems = [f"c{i}_T1w" for i in range(4)]
    for s in stems:
        head(inp / f"{s}.nii.gz")
    cmd = [sys.executable, "-m", "msdseg", "segment", str(inp), "-o", str(out), "--preset", "fast", "--steps", "1",
           "--jobs", "2", "--progress", "json", "--model", untrained_model]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plan = {"c0_T1w": 2, "c2_T1w": 1}
    killed: dict[str, list[int]] = {s: [] for s in plan}
    at_first_kill: dict[str, list[int]] = {}
    lock_owner = None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if lock_owner is None and (out / LOCK_NAME).exists():
            lock_owner = (out / LOCK_NAME).read_text()
        for stem, times in plan.items():
            pids = attempts(out, stem)
            if len(killed[stem]) < times and len(pids) > len(killed[stem]):
                if not at_first_kill:  # the first kill waits until the other worker runs c1
                    if not attempts(out, "c1_T1w"):
                        continue
                    at_first_kill = {s: attempts(out, s) for s in stems}
                os.kill(pids[-1], signal.SIGKILL)
                killed[stem].append(pids[-1])
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert [len(killed[s]) for s in plan] == [2, 1], killed
    # c1 was running in the healthy worker, c3 had not started when the first worker died
    assert len(at_first_kill["c1_T1w"]) == 1 and at_first_kill["c3_T1w"] == []
    failures = {r["case"]: r["reason"] for r in rows(out / "cohort_failures.csv")}
    assert list(failures) == ["c0_T1w"], failures
    assert "worker process died (signal 9, SIGKILL" in failures["c0_T1w"] and "tried 2 times" in failures["c0_T1w"]
    errors = [line for line in stderr.splitlines() if line.startswith("msdseg: error:")]
    assert len(errors) == 1 and "c0_T1w.nii.gz: worker process died (signal 9" in errors[0], stderr
    assert attempts(out, "c0_T1w") == killed["c0_T1w"]
    assert len(attempts(out, "c2_T1w")) == 2 and attempts(out, "c2_T1w")[0] == killed["c2_T1w"][0]
    for s in ("c1_T1w", "c3_T1w"):
        assert len(attempts(out, s)) == 1, f"{s} was charged for another case's dead worker"
    for s in ("c1_T1w", "c2_T1w", "c3_T1w"):
        assert case_complete(out, s, uncertainty=False, cohort=True)
        assert "done in" in (out / "logs" / f"{s}.log").read_text()
    assert "it will be tried again" in (out / "logs" / "c0_T1w.log").read_text()
    assert sorted(r["case"] for r in rows(out / "cohort_volumes.csv")) == ["c1_T1w", "c2_T1w", "c3_T1w"]
    assert not list(out.glob("c0_T1w[._]*")) and not temporaries(out)
    # the run held the folder's lock under its own pid, and removed it at the end
    assert json.loads(lock_owner)["pid"] == proc.pid and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- one run per folder
_HOLD = """
import sys, time
from msdseg.core.lock import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_lock_on_a_folder_is_refused_and_a_released_one_is_free(tmp_path):
    with FolderLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(FolderBusy, match=rf"pid {os.getpid()} on {re.escape(socket.gethostname())}"):
            FolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with FolderLock(tmp_path):
        pass


def test_run_cohort_refuses_a_folder_another_run_holds(tmp_path, untrained_model):
    inp = head(tmp_path / "in" / "a_T1w.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    settings = SegmentSettings(preset="fast", steps=1, model=untrained_model)
    with FolderLock(out):
        with pytest.raises(FolderBusy) as err:
            run_cohort([str(inp)], out, settings, progress_mode="none")
    assert "another msdseg run is writing to this folder" in str(err.value)
    assert "\n" not in str(err.value) and not any(out.glob("a_T1w*"))


@pytest.mark.slow
def test_two_processes_one_folder_and_a_dead_holders_lock_is_taken_over(tmp_path, untrained_model):
    """A live holder (another process) makes ``msdseg segment`` refuse with one line naming its pid
    and host; once the holder is killed with SIGKILL its lock file is stale and the next run
    takes it over, segments, and leaves no lock file."""
    inp = head(tmp_path / "in" / "a_T1w.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cmd = [sys.executable, "-m", "msdseg", "segment", str(inp), "-o", str(out), "--preset", "fast",
               "--steps", "1", "--progress", "none", "--model", untrained_model]
        refused = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in lines[0], refused.stderr
        assert not any(out.glob("a_T1w*"))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by the dead run
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "a_T1w_labels.nii.gz").exists() and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- truncated files
def _cut(source: sitk.Image, path: Path, compress: bool, keep: float = 0.6) -> Path:
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # the MetaImage writer warns about NIfTI fields
    try:
        sitk.WriteImage(source, str(path), compress)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("name,compress", [("t.mha", False), ("t.mha", True), ("t.nrrd", False),
                                           ("t.nrrd", True), ("t.nii.gz", True), ("t.nii", False)])
def test_a_truncated_file_is_one_line_that_says_truncated(tmp_path, capfd, name, compress, untrained_model):
    """The shipped 2 mm sample written in each format and cut to 60 %: ``msdseg segment`` prints
    exactly one line, which says "truncated" (a cut MHA used to print two raw ITK lines first)."""
    path = _cut(sitk.ReadImage(str(SAMPLE)), tmp_path / name, compress)
    capfd.readouterr()
    rc = main(["segment", str(path), "-o", str(tmp_path / "out"), "--preset", "fast", "--progress", "none",
               "--model", untrained_model])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"msdseg: error: {path}: file is truncated"), lines[0]
    assert not any(p for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("name,keep", [("h.mha", 0.0002), ("h.nrrd", 0.0002), ("h.nii", 0.0002)])
def test_a_file_cut_inside_its_header_says_truncated(tmp_path, capfd, name, keep):
    path = _cut(sitk.ReadImage(str(SAMPLE)), tmp_path / name, False, keep)
    capfd.readouterr()
    with pytest.raises(InputError, match="file is truncated") as err:
        read_image(path)
    assert "\n" not in str(err.value) and capfd.readouterr().err == ""


def test_complete_files_in_every_format_still_read(tmp_path):
    image = sitk.ReadImage(str(SAMPLE))
    for name, compress in [("a.mha", False), ("b.mha", True), ("c.nrrd", False), ("d.nrrd", True),
                           ("e.nii.gz", True), ("f.nii", False), ("g.mhd", False), ("h.nhdr", False)]:
        path = _cut(image, tmp_path / name, compress, keep=1.0)
        assert read_image(path).GetSize() == image.GetSize(), name


# ----------------------------------------------------------------------------- Dask
def _rebuild(origin: int, path: Path, stem: str) -> "Unreadable":
    if os.getpid() == origin:
        raise RuntimeError("this case cannot be rebuilt in the process that made it")
    return Unreadable(path, stem, origin)


@dataclass
class Unreadable(Case):
    """A case whose copy coming back from a worker cannot be deserialised by the client (as with
    a worker running another version of the classes): ``origin`` is the client's pid."""

    origin: int = 0

    def __reduce__(self):
        return (_rebuild, (self.origin or os.getpid(), self.path, self.stem))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and one worker (one thread) as processes of their own, the worker started in
    another folder than the tests run in, with this folder importable (for :class:`Unreadable`)."""
    pytest.importorskip("distributed")
    root = tmp_path_factory.mktemp("dask")
    home = root / "worker_home"
    home.mkdir()
    info = root / "scheduler.json"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(HERE), ENV.get("PYTHONPATH", "")])}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--no-dashboard", "--scheduler-file", str(info)],
                                 env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.time() + 60
        while not info.exists() and time.time() < deadline:
            time.sleep(0.1)
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(info),
                                   "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--local-directory",
                                   str(root / "space")], env=env, cwd=home, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        address = json.loads(info.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for p in (worker, scheduler):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)


@pytest.mark.slow
def test_dask_relative_model_and_an_unreadable_result_fail_only_that_case(tmp_path, monkeypatch, cluster,
                                                                           untrained_model):
    """A relative ``--model`` is resolved on the client (the worker runs in another folder, where
    the name means nothing); one case whose result cannot be deserialised fails alone."""
    from msdseg.batch.dask_runner import run_dask

    client_home = tmp_path / "client"
    client_home.mkdir()
    copy_model(untrained_model, client_home / "m.safetensors")
    monkeypatch.chdir(client_home)
    settings = SegmentSettings(preset="fast", steps=1, model="m.safetensors")
    good, bad = head(tmp_path / "in" / "good_T1w.nii.gz"), head(tmp_path / "in" / "bad_T1w.nii.gz")
    out = tmp_path / "out"
    from msdseg.outputs.provenance import model_sha256

    outcomes = {o.case.stem: o for o in run_dask([Unreadable(bad, "bad_T1w"), Case(good, "good_T1w")], out, settings,
                                                  address=cluster, cohort=True, overwrite=False, stop=lambda: False,
                                                  expected_model=model_sha256("m.safetensors"))}
    assert outcomes["good_T1w"].status == "done", outcomes["good_T1w"].reason
    assert case_complete(out, "good_T1w", uncertainty=False, cohort=True)
    bad_outcome = outcomes["bad_T1w"]
    assert bad_outcome.status == "failed" and "could not be read back" in bad_outcome.reason
    assert "cannot be rebuilt" in bad_outcome.reason and "\n" not in bad_outcome.reason


@pytest.mark.slow
def test_dask_worker_refuses_a_case_when_its_model_file_differs(tmp_path, cluster, untrained_model):
    """The model file is replaced while the cohort runs (as if a node had another copy): the case
    that started before keeps its result, the case after is refused with one line."""
    model = copy_model(untrained_model, tmp_path / "model.safetensors")
    inp = tmp_path / "in"
    for s in ("a_T1w", "b_T1w"):
        head(inp / f"{s}.nii.gz")
    out = tmp_path / "out"

    import torch

    from msdseg.model.modelfile import save_model
    from msdseg.model.network import ModelConfig, MultiscaleDiffUNet

    torch.manual_seed(1)  # another valid model: other weights, with their own config
    staged = save_model(MultiscaleDiffUNet(ModelConfig()), tmp_path / "staged" / "model.safetensors",
                        {"trained": False, "name": "another-untrained-test"})

    def swap() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not any(attempts(out, s) for s in ("a_T1w", "b_T1w")):
            time.sleep(0.05)
        for suffix in (".json", ".safetensors"):
            os.replace(Path(staged).with_suffix(suffix), model.with_suffix(suffix))

    swapper = threading.Thread(target=swap)
    swapper.start()
    rc = run_cohort([str(inp)], out, SegmentSettings(preset="fast", steps=1, model=str(model)),
                    dask_address=cluster, progress_mode="none", report=False)
    swapper.join()
    assert rc == 1
    failures = {r["case"]: r["reason"] for r in rows(out / "cohort_failures.csv")}
    assert len(failures) == 1, failures
    (stem, reason), = failures.items()
    assert "is not the one this run started with" in reason and socket.gethostname() in reason
    done = {"a_T1w", "b_T1w"} - {stem}
    assert all(case_complete(out, s, uncertainty=False, cohort=True) for s in done)


@pytest.mark.slow
def test_dask_case_past_its_time_limit_fails_saying_so(tmp_path, cluster, untrained_model, capsys):
    inp = head(tmp_path / "in" / "slow_T1w.nii.gz")
    out = tmp_path / "out"
    rc = run_cohort([str(inp)], out, SegmentSettings(preset="fast", steps=1, model=untrained_model),
                    dask_address=cluster, progress_mode="none", case_timeout_s=0.5)
    assert rc == 1
    assert "timed out after 0.5 s (the per-case limit)" in capsys.readouterr().err
    assert not any(out.glob("slow_T1w[._]*"))


@pytest.mark.integration
def test_a_case_past_its_time_limit_fails_saying_so(tmp_path, untrained_model, capsys):
    inp = head(tmp_path / "in" / "slow_T1w.nii.gz")
    out = tmp_path / "out"
    rc = run_cohort([str(inp)], out, SegmentSettings(preset="fast", steps=1, model=untrained_model),
                    progress_mode="none", case_timeout_s=0.5)
    assert rc == 1
    assert "timed out after 0.5 s (the per-case limit)" in capsys.readouterr().err
    assert not any(out.glob("slow_T1w[._]*"))


def test_a_bad_case_timeout_in_the_environment_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MSDSEG_CASE_TIMEOUT_S", "soon")
    with pytest.raises(InputError, match="MSDSEG_CASE_TIMEOUT_S='soon'"):
        run_cohort([str(tmp_path / "x.nii.gz")], tmp_path / "out", SegmentSettings(), progress_mode="none")


# ----------------------------------------------------------------------------- stuck cases
def _fifo(path: Path) -> Path:
    """An input that blocks whoever opens it (a FIFO no one writes), as a hung network mount would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _release(fifo: Path) -> None:
    """Let a reader blocked on the FIFO go on (it reads an empty file)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader left
        return
    os.close(fd)


@pytest.mark.integration
def test_a_local_worker_stuck_past_its_time_limit_is_killed(tmp_path, monkeypatch, untrained_model):
    """A case stuck reading its input never reaches a cancellation point: its worker is killed once
    the limit and the grace have passed, and the case fails saying so."""
    from msdseg.batch import pool

    monkeypatch.setattr(pool, "KILL_GRACE_S", 1.0)
    stuck = _fifo(tmp_path / "in" / "stuck_T1w.nii.gz")
    settings = SegmentSettings(preset="fast", steps=1, model=untrained_model)
    outcomes = list(pool.run_local_pool([Case(stuck, "stuck_T1w")], tmp_path / "out", settings, jobs=2, cohort=True,
                                        overwrite=False, stop=lambda: False, timeout_s=0.5))
    assert [o.status for o in outcomes] == ["failed"]
    assert "timed out after 0.5 s" in outcomes[0].reason and "was killed" in outcomes[0].reason


@pytest.mark.slow
def test_dask_gives_up_a_case_stuck_where_it_cannot_be_cancelled(tmp_path, monkeypatch, cluster, untrained_model):
    from msdseg.batch import dask_runner

    monkeypatch.setattr(dask_runner, "BACKSTOP_GRACE_S", 0.0)
    stuck = _fifo(tmp_path / "in" / "stuck_T1w.nii.gz")
    settings = SegmentSettings(preset="fast", steps=1, model=untrained_model)
    t0 = time.time()
    try:
        outcomes = list(dask_runner.run_dask([Case(stuck, "stuck_T1w")], tmp_path / "out", settings, address=cluster,
                                             cohort=True, overwrite=False, stop=lambda: False, timeout_s=0.5))
    finally:
        _release(stuck)  # free the worker's thread for whatever runs next
    assert [o.status for o in outcomes] == ["failed"] and time.time() - t0 < 60
    assert "timed out after 0.5 s" in outcomes[0].reason and "task was cancelled" in outcomes[0].reason
