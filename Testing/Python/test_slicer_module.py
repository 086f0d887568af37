"""The Slicer module's Qt-free logic (MultiscaleDiffSegLib) without the Slicer application: the
worker process runner (progress streaming, cancel of the whole process tree), the dependency
decisions, the settings, the CMake lists, the jobs (with a fake worker and with the real core CLI),
the console API and the self-test steps.

The widget needs Qt and the Slicer application; its .ui binding is checked statically in
test_slicer_ui.py, the logic's host and timer in test_slicer_logic.py, the eye icons in
test_slicer_visibility.py.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import sys
import textwrap
import time
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "MultiscaleDiffSeg"
sys.path.insert(0, str(MODULE_DIR))

from MultiscaleDiffSegLib import dependencies as deps  # noqa: E402
from MultiscaleDiffSegLib import settings as st  # noqa: E402
from MultiscaleDiffSegLib.process import BackgroundProcess, parse_progress, run_blocking  # noqa: E402

pytestmark = pytest.mark.unit

POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="process-tree check reads /proc")

try:  # real MRML from slicer-core; without it only the Qt- and MRML-free parts are tested
    import slicer

    HAVE_SLICER = True
except ImportError:
    HAVE_SLICER = False
needs_slicer = pytest.mark.skipif(not HAVE_SLICER, reason="slicer-core (real MRML) is not installed")

# ----------------------------------------------------------------------------- a fake worker
FAKE_WORKER = textwrap.dedent(r'''
    import json, os, subprocess, sys, time

    def emit(fraction, message):
        print(json.dumps({"progress": fraction, "message": message}), flush=True)

    mode = sys.argv[1]
    if mode == "progress":
        for i in range(5):
            emit(i / 4, f"step {i}")
            time.sleep(0.02)
        print("a plain log line", flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
    elif mode == "tree":
        # a child that starts a grandchild; both would sleep for two minutes
        code = ("import subprocess, sys, time\n"
                "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                "print(g.pid, flush=True)\n"
                "time.sleep(120)\n")
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        print(json.dumps({"pids": [os.getpid(), child.pid, grandchild]}), flush=True)
        for i in range(1200):
            emit(i / 1200, f"step {i}")
            time.sleep(0.1)
    elif mode == "fail":
        print("Traceback (most recent call last):", file=sys.stderr)
        print("msdseg: error: input.nrrd: field of view (37, 34, 57) mm is too small for a brain", file=sys.stderr)
        sys.exit(2)
    elif mode in ("segment", "segment-wrong-grid"):
        # behaves like `msdseg segment IN -o OUT [--uncertainty]`: labels by intensity on the input grid
        import numpy as np
        import SimpleITK as sitk
        src, out = sys.argv[2], sys.argv[sys.argv.index("-o") + 1]
        os.makedirs(out, exist_ok=True)
        image = sitk.ReadImage(src)
        arr = sitk.GetArrayFromImage(image)
        emit(0.1, "placing the model grid")
        labels = np.where(arr > 150, 17, np.where(arr > 50, 53, 0)).astype(np.uint16)
        lab = sitk.GetImageFromArray(labels)
        lab.CopyInformation(image)
        if mode == "segment-wrong-grid":
            lab.SetOrigin([o + 3.0 for o in image.GetOrigin()])
        emit(0.9, "mapping labels back to the input grid")
        stem = os.path.basename(src).split(".")[0]
        sitk.WriteImage(lab, os.path.join(out, stem + "_labels.nii.gz"))
        if "--uncertainty" in sys.argv:
            unc = sitk.GetImageFromArray((labels > 0).astype(np.float32) * 0.5)
            unc.CopyInformation(lab)
            sitk.WriteImage(unc, os.path.join(out, stem + "_uncertainty.nii.gz"))
        emit(1.0, "done")
''')


@pytest.fixture(scope="module")
def fake_worker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fake") / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return path


def pid_alive(pid: int) -> bool:
    """A process exists and is not a zombie (a zombie has ended; only its exit status remains)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


# ----------------------------------------------------------------------------- process runner
@pytest.mark.parametrize("line, expected", [
    ('{"progress": 0.5, "message": "half"}', (0.5, "half")),
    ('{"progress": 1.7, "message": "x"}', (1.0, "x")),
    ('{"progress": -1}', (0.0, "")),
    ('{"pids": [1, 2]}', None),
    ("plain text", None),
    ('{"progress": "abc"}', None),
    ("{not json}", None),
])
def test_parse_progress(line, expected):
    assert parse_progress(line) == expected


@pytest.mark.integration
def test_progress_lines_are_streamed_in_order(fake_worker):
    progress, logs, finished = [], [], []
    proc = BackgroundProcess([sys.executable, str(fake_worker), "progress"], on_progress=lambda f, m: progress.append((f, m)),
                             on_log=logs.append, on_finished=finished.append).start()
    outcome = proc.wait(timeout=60)
    assert outcome is not None and outcome.ok and outcome.returncode == 0
    assert [f for f, _ in progress] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert progress[-1][1] == "step 4"
    assert "a plain log line" in logs and "a warning on stderr" in logs
    assert finished == [outcome]  # exactly once
    assert not proc.poll()  # finished stays finished


@pytest.mark.integration
def test_poll_never_blocks_while_the_worker_is_busy(fake_worker):
    proc = BackgroundProcess([sys.executable, str(fake_worker), "tree"]).start()
    try:
        t0 = time.monotonic()
        for _ in range(20):
            assert proc.poll()
        assert time.monotonic() - t0 < 0.5
    finally:
        proc.cancel()
        proc.wait(timeout=30)


@pytest.mark.integration
@POSIX_ONLY
def test_cancel_kills_the_worker_its_child_and_its_grandchild(fake_worker):
    logs, progress = [], []
    proc = BackgroundProcess([sys.executable, str(fake_worker), "tree"], on_log=logs.append,
                             on_progress=lambda f, m: progress.append(f)).start()
    pids = None
    deadline = time.monotonic() + 60
    while pids is None and time.monotonic() < deadline:
        proc.poll()
        for line in logs:
            if line.startswith('{"pids"'):
                pids = json.loads(line)["pids"]
        time.sleep(0.05)
    assert pids is not None, logs
    while not progress and time.monotonic() < deadline:  # progress streams while it runs
        proc.poll()
        time.sleep(0.05)
    assert all(pid_alive(p) for p in pids)
    proc.cancel(grace_seconds=2.0)
    outcome = proc.wait(timeout=30)
    assert outcome is not None and outcome.cancelled and not outcome.ok and outcome.error == "cancelled"
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), [p for p in pids if pid_alive(p)]


STUBBORN_WORKER = (
    "import json, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker busy in native code does not stop at once\n"
    "print(json.dumps({'progress': 0.1, 'message': 'busy'}), flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.mark.integration
@POSIX_ONLY
def test_cancel_returns_at_once_and_polling_finishes_the_stop():
    """Cancel from the GUI thread never waits out the grace period (it froze Slicer for seconds):
    it returns at once, and the poll timer kills a worker that ignores SIGTERM."""
    proc = BackgroundProcess([sys.executable, "-c", STUBBORN_WORKER]).start()
    deadline = time.monotonic() + 60
    while proc.progress == 0.0 and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.cancel(grace_seconds=1.0)
    assert time.monotonic() - t0 < 0.2
    assert proc.poll()  # still running: SIGTERM is ignored, the grace period is not over
    outcome = proc.wait(timeout=30)
    assert outcome is not None and outcome.cancelled
    assert 1.0 <= time.monotonic() - t0 < 10.0


@pytest.mark.integration
@POSIX_ONLY
def test_cancel_with_wait_returns_only_when_the_worker_is_gone():
    proc = BackgroundProcess([sys.executable, "-c", STUBBORN_WORKER]).start()
    deadline = time.monotonic() + 60
    while proc.progress == 0.0 and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.05)
    pid = proc.pid
    proc.cancel(grace_seconds=0.5, wait=True)
    assert not pid_alive(pid)


@pytest.mark.integration
def test_failure_reports_the_workers_last_error_line(fake_worker):
    outcome = run_blocking([sys.executable, str(fake_worker), "fail"], timeout=60)
    assert outcome.returncode == 2 and not outcome.ok
    assert outcome.error == "msdseg: error: input.nrrd: field of view (37, 34, 57) mm is too small for a brain"


def test_a_worker_that_cannot_start_is_an_error_not_a_hang(tmp_path):
    finished = []
    proc = BackgroundProcess([str(tmp_path / "no-such-python")], on_finished=finished.append).start()
    assert not proc.running and finished and "cannot start" in finished[0].error


@pytest.mark.integration
def test_run_blocking_cancels_on_timeout(fake_worker):
    outcome = run_blocking([sys.executable, str(fake_worker), "tree"], timeout=1.0)
    assert outcome.cancelled


# ----------------------------------------------------------------------------- settings
def test_settings_accept_enums_strings_and_preset_defaults():
    s = st.settings_from_widgets(st.Preset.fast, "CPU", steps=-1, samples=0, uncertainty=True, seed=3)
    assert (s.preset, s.device, s.steps, s.samples, s.uncertainty, s.seed) == ("fast", "cpu", None, None, True, 3)
    s2 = st.settings_from_widgets("accurate", st.Device.cuda, steps=0, samples=5)
    assert s2.steps == 0 and s2.samples == 5
    with pytest.raises(ValueError, match="unknown preset"):
        st.settings_from_widgets("slow")
    with pytest.raises(ValueError, match="unknown device"):
        st.settings_from_widgets("fast", "tpu")


def test_worker_command_is_the_core_cli_with_json_progress(tmp_path):
    s = st.settings_from_widgets("fast", "auto", steps=3, samples=None, uncertainty=True, seed=7)
    cmd = st.segment_command("/opt/PythonSlicer", [tmp_path / "input.nrrd"], tmp_path / "out", s)
    assert cmd[:5] == ["/opt/PythonSlicer", "-m", "msdseg", "segment", str(tmp_path / "input.nrrd")]
    assert cmd[cmd.index("-o") + 1] == str(tmp_path / "out")
    assert cmd[cmd.index("--progress") + 1] == "json"
    assert cmd[cmd.index("--preset") + 1] == "fast" and cmd[cmd.index("--steps") + 1] == "3"
    assert "--samples" not in cmd and "--uncertainty" in cmd and "--overwrite" in cmd
    from msdseg.cli.main import build_parser  # every option the module passes exists in the core CLI

    args = build_parser().parse_args(cmd[3:])
    assert (args.preset, args.steps, args.uncertainty, args.seed, args.progress) == ("fast", 3, True, 7, "json")


def test_worker_environment_puts_the_module_folder_first(tmp_path):
    env = st.worker_environment(tmp_path, {"PYTHONPATH": "/elsewhere", "PATH": "/bin"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"


def test_output_file_names_follow_the_core_contract(tmp_path):
    from msdseg.outputs.writers import output_names

    files = st.output_files(tmp_path, "input")
    assert {k: v.name for k, v in files.items()} == output_names("input")


@pytest.mark.parametrize("requested, probe, device, usable", [
    ("auto", {"cuda": True, "cuda_name": "RTX", "mps": False}, "cuda", True),
    ("auto", {"cuda": False, "mps": True}, "mps", True),
    ("auto", {"cuda": False, "mps": False}, "cpu", True),
    ("cuda", {"cuda": False, "mps": False}, "cuda", False),
    ("mps", {"cuda": True, "mps": False}, "mps", False),
    ("cpu", {"cuda": True, "mps": False}, "cpu", True),
])
def test_device_prediction(requested, probe, device, usable):
    choice = st.resolve_device(requested, probe)
    assert (choice.device, choice.usable) == (device, usable)


def test_estimate_says_it_is_an_estimate():
    s = st.settings_from_widgets("balanced")
    text = st.estimate_text(s, st.resolve_device("auto", {"cuda": False, "mps": False}))
    assert "CPU" in text and "estimate" in text
    assert st.estimate_seconds(s, "cpu") > st.estimate_seconds(st.settings_from_widgets("fast"), "cpu")
    more = st.settings_from_widgets("balanced", samples=8)
    assert st.estimate_seconds(more, "cpu") > st.estimate_seconds(s, "cpu")
    assert st.estimate_seconds(s, "unknown") is None
    assert "detecting" in st.estimate_text(s, st.resolve_device("auto", None))
    assert st.format_duration(42) == "about 40 s" and st.format_duration(600) == "about 10 min"


@pytest.mark.integration
def test_device_probe_code_runs_in_the_worker_python():
    logs = []
    outcome = run_blocking([sys.executable, "-c", st.DEVICE_PROBE_CODE], on_log=logs.append, timeout=120)
    assert outcome.ok, outcome.error
    probe = json.loads(logs[-1])
    assert set(probe) == {"torch", "cuda", "cuda_name", "mps"}
    assert st.resolve_device("auto", probe).usable


# ----------------------------------------------------------------------------- dependencies
GOOD = {"torch": "2.13.0", "monai": "1.6.1", "safetensors": "0.8.0", "pynrrd": "1.1.3", "slicerio": "1.4.0",
        "nibabel": "5.4.2", "numpy": "2.4.6", "SimpleITK": "2.5.5", "scipy": "1.17.1"}


def env(extension: bool = False, importable: dict | None = None, **versions) -> deps.Environment:
    v = dict(GOOD)
    v.update(versions)
    return deps.Environment(versions=v, importable=importable or {}, pytorch_extension=extension)


def test_nothing_to_do_when_everything_is_installed():
    plan = deps.plan_installation(env())
    assert plan.ok and not plan.needed and plan.pip_commands("c.txt") == []


def test_torch_comes_from_the_pytorch_extension_when_it_is_installed():
    plan = deps.plan_installation(env(extension=True, torch=None))
    assert plan.torch_action == "pytorch_extension"
    assert "PyTorch extension" in plan.confirmation_text()
    plan = deps.plan_installation(env(extension=False, torch=None))
    assert plan.torch_action == "pip" and f"PyTorch {deps.TORCH.pin}" in plan.confirmation_text()


def test_old_torch_is_upgraded_and_not_pinned_while_upgrading():
    plan = deps.plan_installation(env(extension=True, torch="2.1.0"))
    assert plan.torch_action == "pytorch_extension" and "too old" in plan.torch_reason
    lines = deps.constraint_lines(env(torch="2.1.0").versions, include_torch=False)
    assert not any(line.startswith("torch") for line in lines)


@pytest.mark.parametrize("torch_version, pin", [("2.13.0", "1.6.1"), ("2.8.0+cu126", "1.6.1"), ("2.5.1", "1.5.1"),
                                                ("2.4.1", "1.5.1"), (None, "1.6.1")])
def test_monai_pin_follows_the_installed_torch(torch_version, pin):
    assert deps.monai_pin(torch_version) == pin


def test_monai_is_installed_without_dependencies_and_the_rest_with_constraints():
    plan = deps.plan_installation(env(monai=None, slicerio=None, nibabel="4.0.0", torch="2.5.1"))
    assert plan.pip_no_deps == ["monai==1.5.1"]
    assert plan.pip_constrained == ["slicerio==1.4.0", "nibabel==5.4.2"]
    commands = plan.pip_commands("/tmp/c c.txt")
    assert commands[0] == ["--no-deps", "monai==1.5.1"]
    assert commands[1] == ["-c", "/tmp/c c.txt", "slicerio==1.4.0", "nibabel==5.4.2"]
    assert set(plan.constraints) == {"numpy==2.4.6", "SimpleITK==2.5.5", "scipy==1.17.1", "torch==2.5.1"}
    assert "replaces 4.0.0" in plan.confirmation_text()


def test_slicers_own_packages_are_never_installed():
    """Whatever is missing, numpy / SimpleITK / scipy / VTK never appear in an install command."""
    protected = {"numpy", "simpleitk", "scipy", "vtk"}
    for missing in [{}, {"numpy": None}, {"SimpleITK": None, "scipy": None}, {k: None for k in GOOD}]:
        plan = deps.plan_installation(env(extension=False, **missing))
        installed = [a.split("==")[0].lower() for cmd in plan.pip_commands("c") for a in cmd if "==" in a]
        installed += [a.split("==")[0].lower() for a in deps.torch_pip_command("c") if "==" in a]
        assert not protected & set(installed)
    assert deps.plan_installation(env(importable={"SimpleITK": False})).problems


def test_old_slicer_python_is_a_problem_not_an_install():
    plan = deps.plan_installation(deps.Environment(GOOD, python=(3, 9)))
    assert plan.problems and "Slicer 5.10" in plan.problems[0] and not plan.ok


def test_failure_advice_says_what_to_do_next():
    plan = deps.plan_installation(env(extension=True, torch=None, monai=None, slicerio=None))
    text = deps.failure_advice(plan, "pip: Could not find a version that satisfies the requirement")
    assert "Could not find a version" in text
    assert "HTTPS_PROXY" in text and "PyTorch" in text
    assert "slicer.util.pip_install(['--no-deps', 'monai==1.6.1'])" in text
    assert "Offline" in text


class FakeSlicer:
    """Records what the logic would ask Slicer to do; installs by editing the fake environment."""

    def __init__(self, environment: deps.Environment, answer: bool = True, fail_pip: bool = False) -> None:
        self.versions = dict(environment.versions)
        self.extension = environment.pytorch_extension
        self.answer = answer
        self.fail_pip = fail_pip
        self.calls: list = []

    def probe(self) -> deps.Environment:
        return deps.Environment(dict(self.versions), {}, self.extension)

    def confirm(self, text: str) -> bool:
        self.calls.append(("confirm", text))
        return self.answer

    def torch_extension(self, requirement: str) -> bool:
        self.calls.append(("torch_extension", requirement))
        self.versions["torch"] = "2.6.0+cu124"
        return True

    def pip(self, args: list[str]) -> None:
        self.calls.append(("pip", list(args)))
        if self.fail_pip:
            raise RuntimeError("ERROR: Could not install packages due to an OSError: proxy refused")
        for a in args:
            if "==" in a:
                name, version = a.split("==")
                self.versions[name] = version


def test_ensure_asks_once_installs_torch_first_then_pins_monai_to_it(tmp_path):
    fake = FakeSlicer(env(extension=True, torch=None, monai=None, slicerio=None))
    plan = deps.ensure(fake.probe, fake.confirm, fake.torch_extension, fake.pip, tmp_path)
    assert plan.ok
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["confirm", "torch_extension", "pip", "pip"]
    assert fake.calls[1][1] == deps.TORCH_REQUIREMENT
    assert fake.calls[2][1] == ["--no-deps", "monai==1.5.1"]  # torch 2.6 from the extension -> MONAI 1.5.1
    constraints = tmp_path / "msdseg-constraints.txt"
    assert fake.calls[3][1] == ["-c", str(constraints), "slicerio==1.4.0"]
    assert "torch==2.6.0+cu124" in constraints.read_text() and "numpy==2.4.6" in constraints.read_text()


def test_ensure_without_the_extension_installs_torch_from_pypi_with_constraints(tmp_path):
    fake = FakeSlicer(env(extension=False, torch="2.0.0"))
    deps.ensure(fake.probe, fake.confirm, fake.torch_extension, fake.pip, tmp_path)
    torch_call = fake.calls[1]
    assert torch_call[0] == "pip" and torch_call[1][-1] == f"torch=={deps.TORCH.pin}"
    torch_constraints = Path(torch_call[1][1]).read_text()
    assert "numpy==2.4.6" in torch_constraints and "torch" not in torch_constraints


def test_ensure_declined_or_failed_raises_with_advice(tmp_path):
    fake = FakeSlicer(env(monai=None), answer=False)
    with pytest.raises(RuntimeError, match="declined"):
        deps.ensure(fake.probe, fake.confirm, fake.torch_extension, fake.pip, tmp_path)
    assert [c[0] for c in fake.calls] == ["confirm"]
    fake = FakeSlicer(env(monai=None), fail_pip=True)
    with pytest.raises(RuntimeError, match="proxy refused") as info:
        deps.ensure(fake.probe, fake.confirm, fake.torch_extension, fake.pip, tmp_path)
    assert "What to do next" in str(info.value)


def test_ensure_does_nothing_when_all_is_there(tmp_path):
    fake = FakeSlicer(env())
    assert deps.ensure(fake.probe, fake.confirm, fake.torch_extension, fake.pip, tmp_path).ok
    assert fake.calls == []


def test_probe_of_this_environment_reads_metadata():
    found = deps.probe_environment(pytorch_extension=False)
    assert found.versions["numpy"] and found.importable["SimpleITK"]


# ----------------------------------------------------------------------------- CMake, icon, catalog
def test_module_cmake_lists_every_module_python_file_and_globs_the_core():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", text))
    assert listed == {p.name for p in (MODULE_DIR / "MultiscaleDiffSegLib").glob("*.py")}
    assert "${MODULE_NAME}.py" in text and "Resources/UI/${MODULE_NAME}.ui" in text
    assert "Resources/Icons/${MODULE_NAME}.png" in text and (MODULE_DIR / "Resources/Icons/MultiscaleDiffSeg.png").exists()
    assert "CONFIGURE_DEPENDS" in text and "msdseg/*.py" in text and "msdseg/resources/*.json" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    top = (REPO / "CMakeLists.txt").read_text()
    for needle in ("project(MultiscaleDiffSeg)", "EXTENSION_HOMEPAGE", 'EXTENSION_CATEGORY "Segmentation"',
                   "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                   'EXTENSION_DEPENDS "PyTorch"', "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(MultiscaleDiffSeg)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in top, needle


CMAKE_STUB = """
cmake_minimum_required(VERSION 3.16)
project(stub NONE)
set(BUILD_TESTING ON)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f ${M_SCRIPTS} ${M_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "listed but missing: ${f}")
    endif()
  endforeach()
  string(REPLACE ";" "\\n" s "${M_SCRIPTS}")
  file(WRITE ${CMAKE_BINARY_DIR}/scripts.txt "${s}")
  string(REPLACE ";" "\\n" r "${M_RESOURCES}")
  file(WRITE ${CMAKE_BINARY_DIR}/resources.txt "${r}")
endfunction()
function(slicer_add_python_unittest)
  file(WRITE ${CMAKE_BINARY_DIR}/unittest.txt "${ARGN}")
endfunction()
add_subdirectory(@MODULE_DIR@ module)
"""


@pytest.mark.integration
def test_module_cmake_configures_with_stubbed_slicer_macros(tmp_path):
    """Run the module's CMakeLists.txt with stand-ins for Slicer's macros: the globs find the whole
    runtime of the core (every .py file outside msdseg/training and msdseg/evaluation, and the
    label tree), none of the lab, and every listed file exists."""
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    (tmp_path / "CMakeLists.txt").write_text(CMAKE_STUB.replace("@MODULE_DIR@", MODULE_DIR.as_posix()))
    build = tmp_path / "build"
    build.mkdir()
    run = subprocess.run([cmake, str(tmp_path)], cwd=build, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    scripts = set((build / "scripts.txt").read_text().split())
    core = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "msdseg").rglob("*.py")
            if "__pycache__" not in p.parts}
    lab = {f for f in core if f.startswith(("msdseg/training/", "msdseg/evaluation/"))}
    assert lab and core - lab <= scripts and "MultiscaleDiffSeg.py" in scripts
    assert not lab & scripts, f"lab code in the extension: {sorted(lab & scripts)[:5]}"
    assert "msdseg/resources/label_tree.json" in (build / "resources.txt").read_text().split()
    assert (build / "unittest.txt").read_text() == "SCRIPT;MultiscaleDiffSeg.py"


def test_extension_icon_is_128_pixels():
    from PIL import Image

    with Image.open(REPO / "Resources" / "MultiscaleDiffSeg.png") as icon:
        assert icon.size == (128, 128)


def test_catalog_entry_follows_the_extensions_index_schema():
    """docs/MultiscaleDiffSeg.json: required keys and only keys of catalog-entry schema v1.0.2."""
    entry = json.loads((REPO / "docs" / "MultiscaleDiffSeg.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert "slicer-extension-catalog-entry-schema-v1.0.2.json" in entry["$schema"]
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://github.com/")


# ----------------------------------------------------------------------------- MRML jobs
if HAVE_SLICER:
    from MultiscaleDiffSegLib import mrml, selftest, visibility
    from MultiscaleDiffSegLib.jobs import SegmentationJob, WorkerConfig, cohort_progress
    from MultiscaleDiffSegLib.logic import Host, MultiscaleDiffSegLogic


@pytest.fixture
def scene():
    sc = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerColorLogic()]
    for logic in logics:
        logic.SetMRMLScene(sc)
    sc._test_logics = logics
    yield sc
    visibility.unwatch_scene(sc)
    sc.Clear()


def head_image(size=(40, 48, 44), spacing=(1.6, 1.5, 1.7)) -> sitk.Image:
    """A small oblique 'head' (bright blob left, dimmer right) with a field of view the core accepts."""
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([1.0, 1.0, -1.0])
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    centre = (np.array(size) - 1) / 2
    r = np.sqrt(((i - centre[0]) / 14) ** 2 + ((j - centre[1]) / 18) ** 2 + ((k - centre[2]) / 16) ** 2)
    arr = np.where(r < 1, np.where(i > centre[0], 200.0, 100.0), 0.0).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin([12.0, -30.0, 40.0])
    return image


@pytest.fixture
def volume(scene):
    return mrml.add_volume_from_sitk(scene, head_image(), "head")


def fake_job(volume, fake_worker, tmp_path, mode="segment", uncertainty=False, **kwargs):
    settings = st.settings_from_widgets("fast", uncertainty=uncertainty)
    worker = WorkerConfig(sys.executable, MODULE_DIR, temp_root=str(tmp_path))

    def command(inp: Path, out: Path) -> list[str]:
        return [sys.executable, str(fake_worker), mode, str(inp), "-o", str(out), *settings.cli_options()]

    return SegmentationJob(volume, settings, worker, command=command, **kwargs)


@pytest.mark.integration
@needs_slicer
def test_segmentation_job_with_a_fake_worker_imports_the_results(scene, volume, fake_worker, tmp_path):
    progress = []
    job = fake_job(volume, fake_worker, tmp_path, uncertainty=True, on_progress=lambda f, m: progress.append(f)).start()
    assert job.temp_dir.exists() and (job.temp_dir / "input.nrrd").exists()
    result = job.wait()
    assert result.ok, result.error
    assert progress[0] == 0.0 and 0.9 in progress and progress[-1] == 1.0
    nodes = result.nodes
    arr = sitk.GetArrayFromImage(mrml.volume_to_sitk(volume))
    expected = np.where(arr > 150, 17, np.where(arr > 50, 53, 0))
    from vtk.util import numpy_support

    seg = nodes.segmentation.GetSegmentation()
    image = seg.GetSegment("left_hippocampus").GetRepresentation("Binary labelmap")
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(arr.shape)
    np.testing.assert_array_equal(voxels, expected)
    assert nodes.uncertainty is not None
    assert not job.temp_dir.exists()  # temporary files removed


@pytest.mark.integration
@needs_slicer
def test_failed_worker_is_reported_and_leaves_the_scene_alone(scene, volume, fake_worker, tmp_path):
    before = scene.GetNumberOfNodes()
    result = fake_job(volume, fake_worker, tmp_path, mode="fail").start().wait()
    assert result.status == "failed" and "too small for a brain" in result.error
    assert scene.GetNumberOfNodes() == before


@pytest.mark.integration
@needs_slicer
def test_output_on_the_wrong_grid_is_refused(scene, volume, fake_worker, tmp_path):
    result = fake_job(volume, fake_worker, tmp_path, mode="segment-wrong-grid").start().wait()
    assert result.status == "failed" and "not on the input volume's grid" in result.error
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


@pytest.mark.integration
@needs_slicer
@POSIX_ONLY
def test_cancelling_a_job_stops_the_worker_and_removes_its_files(scene, volume, fake_worker, tmp_path):
    job = fake_job(volume, fake_worker, tmp_path, mode="tree").start()
    time.sleep(1.0)
    job.poll()
    job.cancel()
    result = job.wait()
    assert result.status == "cancelled"
    assert not job.temp_dir.exists()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


@pytest.mark.integration
@needs_slicer
def test_cohort_progress_is_spread_over_the_cases():
    assert cohort_progress(0.5, "[2/4] sub-02: step") == (0.375, "[2/4] sub-02: step")
    assert cohort_progress(0.5, "single case") == (0.5, "single case")


# ----------------------------------------------------------------------------- console API, self-test, real core
@pytest.mark.integration
@needs_slicer
def test_the_logic_exposes_the_console_api():
    params = inspect.signature(MultiscaleDiffSegLogic.segment).parameters
    for name in ("volumeNode", "preset", "callback", "blocking"):
        assert name in params
    assert params["blocking"].default is True
    params = inspect.signature(MultiscaleDiffSegLogic.segmentFiles).parameters
    for name in ("paths", "outputDir", "preset", "overwrite", "loadResults", "blocking"):
        assert name in params
    assert "group" in inspect.signature(MultiscaleDiffSegLogic.set_group_visibility).parameters


@pytest.mark.integration
@needs_slicer
def test_self_test_step_of_the_mrml_import_runs_on_slicer_core(scene):
    selftest.results_to_mrml(unittest.TestCase(), scene, lambda text: None)


@pytest.mark.integration
@needs_slicer
def test_sample_t1_is_checked_when_shipped():
    path = selftest.sample_t1_path()
    if path is None:
        pytest.skip(f"sample T1 {selftest.SAMPLE_T1_FILE} not shipped yet")
    assert selftest.sha256(path) == selftest.SAMPLE_T1_SHA256


@pytest.mark.slow
@needs_slicer
def test_self_test_step_with_the_sample_runs_on_slicer_core(scene, monkeypatch):
    """The module's own sample self-test (sample T1, fast preset, real worker), minus the application."""
    if selftest.sample_t1_path() is None:
        pytest.skip("sample T1 not shipped yet")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shown = []
    selftest.sample_fast_preset(unittest.TestCase(), scene, MultiscaleDiffSegLogic(scene), shown.append)
    assert shown[-1] == "Sample test passed"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


@pytest.fixture
def logic(scene, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    logic = MultiscaleDiffSegLogic(scene=scene)
    logic.keepTempFiles = False
    return logic


@pytest.mark.slow
@needs_slicer
def test_console_segment_runs_the_real_core_worker(logic, volume, untrained_model):
    """Console API, blocking: volume node -> `python -m msdseg segment` -> 32 segments + uncertainty."""
    events = []
    nodes = logic.segment(volume, preset="fast", device="cpu", uncertainty=True, model=str(untrained_model),
                          callback=lambda f, m: events.append((f, m)), blocking=True)
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 32
    assert nodes.uncertainty is not None and nodes.table is not None
    assert events and events[-1][0] == 1.0 and len(events) >= 3
    assert logic.lastSegmentation() is nodes.segmentation
    hidden = logic.set_group_visibility("right_hemisphere", False)
    assert len(hidden) == 14 and not nodes.segmentation.GetDisplayNode().GetSegmentVisibility("right_thalamus")
    # running again replaces
    again = logic.segment(volume, preset="fast", device="cpu", model=str(untrained_model), blocking=True)
    assert again.segmentation is nodes.segmentation and again.uncertainty is None
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


@pytest.mark.integration
@needs_slicer
def test_non_blocking_without_an_event_loop_refuses_before_starting(logic, volume):
    with pytest.raises(RuntimeError, match="blocking=False needs an event loop"):
        logic.segment(volume, preset="fast", blocking=False)
    assert logic.job is None and not logic.isRunning


@pytest.mark.integration
@needs_slicer
def test_console_segment_failure_raises_with_the_workers_message(logic, volume, tmp_path):
    with pytest.raises(RuntimeError, match="model weights not found"):
        logic.segment(volume, preset="fast", device="cpu", model=str(tmp_path / "missing.safetensors"))


@pytest.mark.integration
@needs_slicer
@POSIX_ONLY
def test_cancel_stops_the_real_worker(volume, untrained_model, tmp_path):
    settings = st.settings_from_widgets("accurate", "cpu", model=str(untrained_model))
    worker = WorkerConfig(sys.executable, MODULE_DIR, temp_root=str(tmp_path), threads=1)
    progress = []
    job = SegmentationJob(volume, settings, worker, on_progress=lambda f, m: progress.append(f)).start()
    deadline = time.monotonic() + 120
    while len(progress) < 2 and job.poll() and time.monotonic() < deadline:  # the worker reports progress
        time.sleep(0.05)
    pid = job.process.pid
    job.cancel()
    result = job.wait()
    assert result.status == "cancelled"
    assert not pid_alive(pid)
    assert not job.temp_dir.exists()


@pytest.mark.slow
@needs_slicer
def test_segment_files_cohort_with_the_real_core(logic, untrained_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz"):
        sitk.WriteImage(head_image(), str(inputs / name))
    (inputs / "sub-03_T1w.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    events = []
    cases = logic.segmentFiles(sorted(str(p) for p in inputs.iterdir()), out, preset="fast", device="cpu",
                               model=str(untrained_model), callback=lambda f, m: events.append(f))
    by_stem = {c.stem: c for c in cases}
    assert by_stem["sub-01_T1w"].status == "done" and by_stem["sub-02_T1w"].status == "done"
    assert Path(by_stem["sub-01_T1w"].outputs["labels"]).exists()
    assert by_stem["sub-03_T1w"].status == "failed" and by_stem["sub-03_T1w"].reason
    assert events and all(0.0 <= e <= 1.0 for e in events)
    assert events == sorted(events)  # overall progress over the cases never goes back
    # a second run skips the finished cases and loads them on request
    cases2 = logic.segmentFiles([str(inputs / "sub-01_T1w.nii.gz")], out, preset="fast", device="cpu",
                                model=str(untrained_model), loadResults=True)
    assert cases2[0].status == "done"
    assert logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


# ----------------------------------------------------------------------------- self-test installs nothing
MISSING_TORCH = {"torch": None}


@pytest.mark.integration
@needs_slicer
def test_self_test_skips_the_sample_instead_of_installing(scene, monkeypatch):
    """On a build machine without PyTorch the self-test says what is missing and installs nothing."""
    from MultiscaleDiffSegLib.logic import SELFTEST_INSTALL_ENV

    monkeypatch.delenv(SELFTEST_INSTALL_ENV, raising=False)
    monkeypatch.setattr(deps, "probe_environment", lambda: deps.Environment(versions=MISSING_TORCH))
    installs, shown = [], []
    logic = MultiscaleDiffSegLogic(scene, Host(testing=lambda: True, pip_install=installs.append))
    selftest.sample_fast_preset(unittest.TestCase(), scene, logic, shown.append)
    assert shown and "Sample test skipped: torch is not installed" in shown[-1]
    assert SELFTEST_INSTALL_ENV in shown[-1]
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0 and installs == []


@pytest.mark.integration
@needs_slicer
def test_testing_mode_declines_the_install_unless_allowed(scene, monkeypatch):
    """Slicer in testing mode (ctest on a build machine) never pip-installs by itself, even when
    the caller waived the question; with the variable set it goes ahead."""
    from MultiscaleDiffSegLib.logic import SELFTEST_INSTALL_ENV

    installs, asked = [], []
    monkeypatch.setattr(deps, "probe_environment", lambda: deps.Environment(versions=MISSING_TORCH))
    monkeypatch.delenv(SELFTEST_INSTALL_ENV, raising=False)
    host = Host(ask=lambda text: asked.append(text) or True, testing=lambda: True, pip_install=installs.append)
    for ask in (True, False):
        with pytest.raises(RuntimeError, match="declined"):
            MultiscaleDiffSegLogic(scene, host).ensureDependencies(askConfirmation=ask)
    assert installs == [] and asked == []
    monkeypatch.setenv(SELFTEST_INSTALL_ENV, "1")
    with pytest.raises(RuntimeError, match="still missing"):  # the recording installer installs nothing
        MultiscaleDiffSegLogic(scene, host).ensureDependencies(askConfirmation=True)
    assert installs and any(arg.startswith("torch") for arg in installs[0])
