"""The module's logic (MultiscaleDiffSegLib.logic) on slicer-core: the parameter node API of
Slicer's ScriptedLoadableModuleLogic, the install policy, the host the application injects, and
the poll timer, which must stop when the work is done and when the widget goes away (reload, exit).

The timer is the one stand-in here: it is Qt's event loop, which slicer-core does not have; the
test fires it as Qt would.  The workers are real processes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

MODULE_DIR = Path(__file__).resolve().parents[2] / "MultiscaleDiffSeg"
sys.path.insert(0, str(MODULE_DIR))

from MultiscaleDiffSegLib import dependencies as deps  # noqa: E402
from MultiscaleDiffSegLib import jobs, logic as logic_module, mrml  # noqa: E402
from MultiscaleDiffSegLib.logic import SELFTEST_INSTALL_ENV, Host, MultiscaleDiffSegLogic, install_allowed  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def scene():
    sc = slicer.vtkMRMLScene()
    yield sc
    sc.Clear()


@pytest.fixture
def volume(scene):
    image = sitk.Image([16, 18, 14], sitk.sitkInt16)
    image.SetSpacing([1.5, 1.5, 1.5])
    return mrml.add_volume_from_sitk(scene, image, "T1")


class EventLoopTimer:
    """What ``qt.QTimer`` does for the logic: fires its callback while active (see :meth:`fire`)."""

    def __init__(self, interval_ms: int, callback) -> None:
        self.interval_ms, self.callback, self.active, self.fired = interval_ms, callback, False, 0

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def fire(self) -> None:
        if self.active:
            self.fired += 1
            self.callback()


def run_loop(timers: list[EventLoopTimer], until, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for timer in timers:
            timer.fire()
        time.sleep(0.02)
    assert until(), "timed out"


@pytest.fixture
def timers() -> list[EventLoopTimer]:
    return []


@pytest.fixture
def host(timers, tmp_path) -> Host:
    def make_timer(interval_ms, callback):
        timers.append(EventLoopTimer(interval_ms, callback))
        return timers[-1]

    return Host(make_timer=make_timer, temp_folder=lambda: str(tmp_path),
                startup_environment=lambda: dict(os.environ, MSDSEG_TEST_MARK="startup"))


def worker_command(code: str):
    """A stand-in for ``segment_command``: the worker becomes a Python process running ``code``."""
    return lambda python, inputs, out, settings, overwrite=True: [sys.executable, "-c", code]


# ----------------------------------------------------------------------------- parameter node
def test_parameter_node_is_the_modules_singleton_as_in_scripted_loadable_module_logic(scene):
    logic = MultiscaleDiffSegLogic(scene)
    node = logic.getParameterNode()
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetSingletonTag() == "MultiscaleDiffSeg"
    assert node.GetAttribute("ModuleName") == "MultiscaleDiffSeg"
    assert logic.getParameterNode() is node and MultiscaleDiffSegLogic(scene).getParameterNode() is node
    assert logic.getAllParameterNodes() == [node]
    node.SetParameter("preset", "fast")
    node.RemoveAttribute("ModuleName")
    assert logic.getParameterNode() is node and node.GetAttribute("ModuleName") == "MultiscaleDiffSeg"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_several_parameter_nodes_when_not_a_singleton(scene):
    logic = MultiscaleDiffSegLogic(scene)
    logic.isSingletonParameterNode = False
    first = logic.getParameterNode()
    assert not first.GetSingletonTag() and logic.getParameterNode() is first
    second = scene.AddNode(logic.createParameterNode())
    assert logic.getAllParameterNodes() == [first, second] and second.GetName() != first.GetName()


# ----------------------------------------------------------------------------- install policy and host
@pytest.mark.parametrize("testing, ask, env, allowed", [
    (True, lambda text: True, {}, False),  # a build machine never installs by itself
    (True, None, {SELFTEST_INSTALL_ENV: "1"}, True),
    (True, lambda text: False, {SELFTEST_INSTALL_ENV: "1"}, True),  # the variable is the answer
    (False, None, {}, True),  # the caller agreed already
    (False, lambda text: False, {}, False),
    (False, lambda text: "PyTorch" in text, {}, True),
])
def test_install_policy(testing, ask, env, allowed):
    assert install_allowed("Install PyTorch 2.13.0?", testing, ask, env) is allowed


def test_plain_python_installs_nothing_and_says_what_is_missing(scene, monkeypatch):
    monkeypatch.setattr(deps, "probe_environment", lambda: deps.Environment(versions={"torch": None}))
    with pytest.raises(RuntimeError, match="missing: torch is not installed"):
        MultiscaleDiffSegLogic(scene, Host()).ensureDependencies()


def test_the_default_host_is_the_one_the_module_registered(scene, monkeypatch):
    registered = Host(testing=lambda: True)
    monkeypatch.setattr(logic_module, "_default_host", logic_module._default_host)
    assert MultiscaleDiffSegLogic(scene).host.make_timer is None  # plain Python by default
    logic_module.use_host(registered)
    assert MultiscaleDiffSegLogic(scene).host is registered
    explicit = Host()
    assert MultiscaleDiffSegLogic(scene, explicit).host is explicit


def test_the_worker_gets_the_hosts_environment_and_temporary_folder(scene, host, tmp_path):
    config = MultiscaleDiffSegLogic(scene, host).workerConfig()
    assert config.temp_root == str(tmp_path)
    env = config.environment()
    assert env["MSDSEG_TEST_MARK"] == "startup" and env["PYTHONPATH"].split(os.pathsep)[0] == str(MODULE_DIR)
    assert MultiscaleDiffSegLogic(scene, Host()).workerConfig().env_base is None


# ----------------------------------------------------------------------------- the poll timer
def test_the_timer_stops_by_itself_when_the_job_has_ended(scene, volume, host, timers, monkeypatch):
    monkeypatch.setattr(jobs, "segment_command", worker_command("import sys; sys.exit('msdseg: error: no brain')"))
    done = []
    logic = MultiscaleDiffSegLogic(scene, host)
    job = logic.segment(volume, preset="fast", blocking=False, onDone=done.append)
    assert logic.isRunning and len(timers) == 1 and timers[0].active
    assert timers[0].interval_ms == logic.POLL_INTERVAL_MS
    run_loop(timers, lambda: bool(done))
    assert done[0].status == "failed" and "no brain" in done[0].error and job.result is done[0]
    timers[0].fire()  # the tick after the end
    assert not timers[0].active
    assert not any(Path(host.temp_folder()).glob("msdseg-*"))  # the job's folder is gone


@pytest.mark.skipif(os.name == "nt", reason="reads /proc")
def test_shutdown_stops_the_worker_and_the_timer(scene, volume, host, timers, monkeypatch):
    """What the widget's cleanup() does on reload and exit: nothing of the old logic keeps running."""
    monkeypatch.setattr(jobs, "segment_command", worker_command(
        "import json, time; print(json.dumps({'progress': 0.1, 'message': 'busy'}), flush=True); time.sleep(120)"))
    progress = []
    logic = MultiscaleDiffSegLogic(scene, host)
    job = logic.segment(volume, preset="fast", blocking=False, callback=lambda f, m: progress.append(f))
    run_loop(timers, lambda: 0.1 in progress)
    pid = job.process.pid
    logic.shutdown()
    assert not logic.isRunning and job.result is not None and job.result.status == "cancelled"
    assert not timers[0].active and logic._timer is None
    assert _gone(pid)
    assert not any(Path(host.temp_folder()).glob("msdseg-*"))


def test_non_blocking_needs_an_event_loop_and_blocking_needs_none(scene, volume, monkeypatch):
    monkeypatch.setattr(jobs, "segment_command", worker_command("import sys; sys.exit('msdseg: error: no brain')"))
    logic = MultiscaleDiffSegLogic(scene, Host())
    with pytest.raises(RuntimeError, match="needs an event loop"):
        logic.segment(volume, blocking=False)
    assert logic.job is None
    with pytest.raises(RuntimeError, match="no brain"):
        logic.segment(volume, blocking=True)


def _gone(pid: int) -> bool:
    """The process has ended (a zombie has ended too: only its exit status remains)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
