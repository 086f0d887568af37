"""Run the segmentation worker as a separate process, stream its progress, cancel its process tree.

Why a separate process (as SlicerMONAIAuto3DSeg does): PyTorch and its GPU libraries stay out of
Slicer's process (no DLL clashes, a crash or an out-of-memory kill does not take Slicer down, a
newly installed torch is used without restarting Slicer), and cancelling is a kill instead of a
cooperative flag deep inside the sampler.

The runner is Qt-free and callback based: reader threads put output lines on a queue and
:meth:`BackgroundProcess.poll` hands them to the callbacks on the caller's thread.  The widget calls
``poll`` from a ``QTimer``; the console API and the tests call :meth:`BackgroundProcess.wait`.
Callbacks therefore always run on the thread that polls (Slicer's main thread), never on a reader
thread, which is what MRML and Qt require.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

ProgressCallback = Callable[[float, str], None]
LineCallback = Callable[[str], None]

#: Exit status of the core CLI when it was cancelled (SIGINT/KeyboardInterrupt convention).
EXIT_CANCELLED = 130
#: Lines of stderr kept for the error message.
STDERR_TAIL_LINES = 40


@dataclass
class ProcessOutcome:
    """How a worker run ended."""

    returncode: int | None
    cancelled: bool = False
    elapsed: float = 0.0
    stderr_tail: list[str] = field(default_factory=list)
    start_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.cancelled and not self.start_error and self.returncode == 0

    @property
    def error(self) -> str:
        """One line for the user: the worker's own last error line, else the exit status."""
        if self.cancelled:
            return "cancelled"
        if self.start_error:
            return self.start_error
        if self.returncode == 0:
            return ""
        for line in reversed(self.stderr_tail):
            text = line.strip()
            if text and not text.startswith(("Traceback", "  File ", "warnings.warn")):
                return text
        return f"the worker process exited with status {self.returncode}"


def parse_progress(line: str) -> tuple[float, str] | None:
    """``(fraction, message)`` from a core JSON progress line, or None for any other line."""
    text = line.strip()
    if not text.startswith("{") or not text.endswith("}"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or "progress" not in data:
        return None
    try:
        fraction = float(data["progress"])
    except (TypeError, ValueError):
        return None
    return min(max(fraction, 0.0), 1.0), str(data.get("message", ""))


class BackgroundProcess:
    """One worker process: start, poll for output, wait, cancel (whole process tree).

    Callbacks:

    * ``on_progress(fraction, message)`` for each JSON progress line on stdout,
    * ``on_log(line)`` for every other stdout line and for every stderr line,
    * ``on_finished(outcome)`` exactly once, after the process ended and its output was drained.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        on_progress: ProgressCallback | None = None,
        on_log: LineCallback | None = None,
        on_finished: Callable[[ProcessOutcome], None] | None = None,
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_finished = on_finished
        self.progress = 0.0
        self.message = ""
        self.outcome: ProcessOutcome | None = None
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._stderr_tail: list[str] = []
        self._cancelled = False
        self._kill_at: float | None = None  # monotonic time after which a cancelled group is killed
        self._killed = False
        self._start_time = 0.0

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def started(self) -> bool:
        return self._proc is not None or self.outcome is not None

    @property
    def running(self) -> bool:
        """True until :meth:`poll` has delivered the outcome."""
        return self.started and self.outcome is None

    # ------------------------------------------------------------------ start
    def start(self) -> "BackgroundProcess":
        """Start the process as the leader of its own process group so that cancel reaches its children."""
        if self.started:
            raise RuntimeError("this process was already started")
        self._start_time = time.monotonic()
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        try:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                cwd=self.cwd,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **kwargs,
            )
        except OSError as exc:
            self.outcome = ProcessOutcome(None, start_error=f"cannot start {self.command[0]}: {exc}")
            if self.on_finished:
                self.on_finished(self.outcome)
            return self
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            reader = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, name: str, stream) -> None:
        """Reader thread: queue every line; ``None`` marks the end of the stream."""
        try:
            for line in iter(stream.readline, ""):
                self._lines.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put((name, None))

    # ------------------------------------------------------------------ output
    def poll(self) -> bool:
        """Deliver queued output to the callbacks without blocking; True while still running."""
        if self.outcome is not None or self._proc is None:
            return False
        self._escalate()
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self._dispatch(name, line)
        streams_done = not any(r.is_alive() for r in self._readers)
        if self._proc.poll() is None or not streams_done:
            return True
        # the process ended and both readers finished: drain what they queued last
        while not self._lines.empty():
            name, line = self._lines.get_nowait()
            if line is not None:
                self._dispatch(name, line)
        self.outcome = ProcessOutcome(
            returncode=self._proc.returncode,
            cancelled=self._cancelled,
            elapsed=time.monotonic() - self._start_time,
            stderr_tail=list(self._stderr_tail),
        )
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
        if self.on_finished:
            self.on_finished(self.outcome)
        return False

    def _dispatch(self, name: str, line: str) -> None:
        if name == "stdout":
            parsed = parse_progress(line)
            if parsed is not None:
                self.progress, self.message = parsed
                if self.on_progress:
                    self.on_progress(*parsed)
                return
        else:
            self._stderr_tail.append(line)
            del self._stderr_tail[:-STDERR_TAIL_LINES]
        if self.on_log:
            self.on_log(line)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> ProcessOutcome | None:
        """Poll until the process ends (blocking); None if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(interval)
        return self.outcome

    # ------------------------------------------------------------------ cancel
    def cancel(self, grace_seconds: float = 3.0, wait: bool = False) -> None:
        """Stop the worker and everything it started.

        POSIX: SIGTERM to the process group (the core removes its temporary files), SIGKILL to the
        group once ``grace_seconds`` have passed.  Windows: ``taskkill /T /F`` on the process tree.
        Only the worker's own group is signalled, never processes by name.

        Why not blocking by default: the GUI calls this on its own thread, and waiting out the grace
        period there froze Slicer for seconds.  The escalation happens in :meth:`poll`, which the
        GUI's timer (or :meth:`wait`) keeps calling; ``wait=True`` is for paths after which nothing
        polls again (application exit, reload), where the worker must be gone on return.
        """
        if self._proc is None or self.outcome is not None:
            return
        self._cancelled = True
        if os.name == "nt":
            _kill_tree_windows(self._proc)
            return
        if self._kill_at is None:
            _signal_group(self._proc.pid, signal.SIGTERM)  # start_new_session: the worker leads its group
            self._kill_at = time.monotonic() + grace_seconds
        if wait:
            while time.monotonic() < self._kill_at:
                if self._proc.poll() is not None and not _group_alive(self._proc.pid):
                    break
                time.sleep(0.05)
            self._escalate(force=True)
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass

    def _escalate(self, force: bool = False) -> None:
        """SIGKILL the group once the grace period of a cancel is over and anything of it is alive."""
        if self._kill_at is None or self._killed or os.name == "nt":
            return
        if (force or time.monotonic() >= self._kill_at) and _group_alive(self._proc.pid):
            _signal_group(self._proc.pid, signal.SIGKILL)
            self._killed = True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """True while any process of the group exists (signal 0 only checks, it does not kill)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_tree_windows(proc: subprocess.Popen) -> None:
    """``taskkill /T`` ends the process and all of its descendants; ``kill`` is the fallback."""
    try:
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    if proc.poll() is None:
        proc.kill()


def run_blocking(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    on_progress: ProgressCallback | None = None,
    on_log: LineCallback | None = None,
    timeout: float | None = None,
) -> ProcessOutcome:
    """Start, wait, and cancel on timeout: the console API's synchronous path."""
    proc = BackgroundProcess(command, env=env, on_progress=on_progress, on_log=on_log).start()
    outcome = proc.wait(timeout=timeout)
    if outcome is None:
        proc.cancel()
        outcome = proc.wait()
    assert outcome is not None
    return outcome


__all__ = [
    "BackgroundProcess",
    "ProcessOutcome",
    "parse_progress",
    "run_blocking",
    "EXIT_CANCELLED",
]
