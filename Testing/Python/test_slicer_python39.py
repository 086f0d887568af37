"""Slicer 5.8 runs Python 3.9: the module must import there far enough to say it needs a newer Slicer.

On Python 3.9 an annotation such as ``-> Path | None`` raises TypeError when the function is
defined, unless the module has ``from __future__ import annotations``; newer syntax (``match``,
parenthesised context managers) fails to parse at all.  Either would stop the module before its
dependency check can show the "needs Slicer 5.10" message.
"""
from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

MODULE_DIR = Path(__file__).resolve().parents[2] / "MultiscaleDiffSeg"
#: Everything the module file imports while Slicer loads it (the core's runtime below it is only
#: imported by the worker, which runs in the Python the dependency step checked).
IMPORTED_BY_SLICER = [MODULE_DIR / "MultiscaleDiffSeg.py", *sorted((MODULE_DIR / "MultiscaleDiffSegLib").glob("*.py")),
                      *sorted((MODULE_DIR / "msdseg" / "core").glob("*.py")), MODULE_DIR / "msdseg" / "__init__.py"]


def _annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
               any(a.name == "annotations" for a in n.names) for n in tree.body)


@pytest.mark.parametrize("path", IMPORTED_BY_SLICER, ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_parses_as_python_39_and_defers_union_annotations(path):
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    unions = [a for a in _annotations(tree) if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                                  for n in ast.walk(a))]
    assert not unions or _has_future_annotations(tree), (
        f"{path.name}: 'X | Y' annotations (line {unions[0].lineno}) need 'from __future__ import annotations' "
        "on Python 3.9")


def _python39() -> str | None:
    """A working Python 3.9 interpreter, if this machine has one (pyenv's shims may refuse)."""
    candidates = [*sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9"))),
                  shutil.which("python3.9")]
    for candidate in filter(None, candidates):
        ok = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                            capture_output=True, text=True, timeout=60)
        if ok.returncode == 0 and ok.stdout.strip() == "True":
            return candidate
    return None


PYTHON39 = _python39()


@pytest.mark.skipif(PYTHON39 is None, reason="no Python 3.9 interpreter on this machine")
def test_the_settings_import_on_a_real_python_39():
    """The pure-Python parts the module needs first import on a real 3.9 interpreter."""
    code = ("import sys; assert sys.version_info[:2] == (3, 9), sys.version\n"
            "import msdseg.core.settings as s, MultiscaleDiffSegLib.settings as m\n"
            "print(s.SegmentSettings(preset='fast').validate().resolved().steps, m.Preset.fast.label())\n")
    run = subprocess.run([PYTHON39, "-c", code], env={"PYTHONPATH": str(MODULE_DIR)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("2 fast (")
