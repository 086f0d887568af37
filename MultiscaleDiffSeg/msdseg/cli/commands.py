"""Commands that live outside the segmentation runtime, found by module name when installed.

Why by name: the Slicer extension ships only the runtime (no training, data preparation or
evaluation code) and the browser app is an optional extra, yet ``msdseg`` stays one command.  Each
module named here provides ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; when it is
not installed, its command still appears and answers with one line saying what to install.  The
runtime never imports these modules directly (the import contracts in ``pyproject.toml``).
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class OptionalCommand:
    name: str
    module: str
    help: str
    missing: str  # what to tell the user when the module is not installed


OPTIONAL_COMMANDS: tuple[OptionalCommand, ...] = (
    OptionalCommand("evaluate", "msdseg.evaluation.cli", "compare a prediction with a reference",
                    "'msdseg evaluate' is part of the full msdseg package (pip install msdseg); "
                    "this installation ships only the segmentation runtime"),
    OptionalCommand("web", "msdseg_web.cli", "browser app: segment, review, edit and save (needs the 'web' extra)",
                    "the web app needs the 'web' extra: pip install 'msdseg[web]'"),
    OptionalCommand("train", "msdseg.training.cli", "train or fine-tune on synthetic images from label maps",
                    "'msdseg train' is part of the full msdseg package (pip install msdseg); "
                    "this installation ships only the segmentation runtime"),
    OptionalCommand("prepare-data", "msdseg.training.sources.cli", "extract training label maps from pinned PyPI packages",
                    "'msdseg prepare-data' is part of the full msdseg package (pip install msdseg); "
                    "this installation ships only the segmentation runtime"),
)


def load(command: OptionalCommand) -> ModuleType | None:
    """The command's module, or None when it (or the package holding it) is not installed."""
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if command.module == missing or command.module.startswith(missing + "."):
            return None
        raise


def add_optional_commands(sub: "argparse._SubParsersAction") -> None:
    """One sub-parser per optional command: the real one, or one that explains what is missing."""
    from msdseg.core.errors import InputError

    for command in OPTIONAL_COMMANDS:
        module = load(command)
        p = sub.add_parser(command.name, help=command.help)
        if module is None:
            def unavailable(args: argparse.Namespace, text: str = command.missing) -> int:
                raise InputError(text)
            p.set_defaults(func=unavailable, unavailable=True)  # its options are not known: any are accepted
        else:
            module.add_arguments(p)
            p.set_defaults(func=module.run)
