"""Which input, settings and model made a case's outputs, and whether they are still those files.

Why: a folder of results outlives the run that made it.  Resuming by file names alone hands back
another subject's labels when two inputs share a name, keeps an uncertainty map from an earlier
seed next to new labels, and overwrites a segmentation a person corrected by hand.  So every case
records, in ``S_provenance.json`` written in the same all-or-nothing step as its outputs, the
SHA256 of its input, the settings that shape the result, the SHA256 of the model weights, and the
SHA256 of every output file as written.  :func:`assess` compares a folder with the run about to
start:

* ``new``: no output of this case exists;
* ``current``: written by msdseg from this very input, settings and model, every file unchanged
  and every expected file present: nothing to do;
* ``stale``: written by msdseg and unchanged, but for another input, settings or model, or
  incomplete: segment again and replace them (they can be made again; no backup needed);
* ``foreign``: some output file was not written by msdseg, or changed after it was (a person's
  work): never replaced without ``--overwrite``, and then kept as a timestamped backup.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from msdseg.core.hashing import sha256_file

FORMAT = "msdseg-provenance/1"
#: Output kinds and their file names (the four-file output contract of :mod:`msdseg.outputs.writers`).
KINDS = ("labels", "segmentation", "volumes", "uncertainty")
#: Settings that do not change what is written: where it ran, and a plausibility check that only
#: decides whether a result is refused.
NOT_IN_IDENTITY = ("device", "check_brain", "uncertainty")


def provenance_name(stem: str) -> str:
    return f"{stem}_provenance.json"


def backup_name(name: str, when: float | None = None) -> str:
    """``S.seg.nrrd`` -> ``S.seg.nrrd.backup-20261204T104500``: visible, dated, never deleted by msdseg."""
    return f"{name}.backup-{time.strftime('%Y%m%dT%H%M%S', time.localtime(when))}"


_MODEL_HASHES: dict[tuple[str, int, int], str] = {}


def model_sha256(model: str | os.PathLike | None) -> str:
    """SHA256 of the weights a run uses (the shipped model when ``model`` is None); cached per file state."""
    from msdseg.model.modelfile import default_model_path

    path = Path(model) if model else default_model_path()
    if path is None or not Path(path).is_file():
        return "untrained"
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MODEL_HASHES:
        _MODEL_HASHES[key] = sha256_file(path)
    return _MODEL_HASHES[key]


@dataclass(frozen=True)
class RunIdentity:
    """What determines a case's outputs: the input's content, the settings, the model's weights."""

    input_sha256: str
    settings: Mapping[str, Any]
    model_sha256: str

    @classmethod
    def of(cls, input_path: str | os.PathLike, settings: Any) -> "RunIdentity":
        values = asdict(settings)
        shaping = {k: v for k, v in sorted(values.items()) if k not in NOT_IN_IDENTITY}
        return cls(sha256_file(input_path), json.loads(json.dumps(shaping, default=str)),
                   model_sha256(values.get("model")))

    def as_json(self) -> dict[str, Any]:
        return {"input_sha256": self.input_sha256, "settings": dict(self.settings), "model_sha256": self.model_sha256}


@dataclass
class Assessment:
    state: str  # new | current | stale | foreign
    reason: str = ""
    foreign: list[str] = field(default_factory=list)  # file names a person made or changed
    ours: dict[str, str] = field(default_factory=dict)  # kind -> file name written by msdseg, unchanged
    identity: RunIdentity | None = None  # the run it was assessed for


def read_provenance(outdir: str | os.PathLike, stem: str) -> dict[str, Any] | None:
    try:
        doc = json.loads((Path(outdir) / provenance_name(stem)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def assess(outdir: str | os.PathLike, stem: str, names: Mapping[str, str], identity: RunIdentity,
           expected: list[str]) -> Assessment:
    """Compare the outputs of ``stem`` in ``outdir`` with the run ``identity`` expecting ``expected`` kinds."""
    outdir = Path(outdir)
    existing = {k: names[k] for k in KINDS if (outdir / names[k]).is_file()}
    if not existing:
        return Assessment("new", identity=identity)
    doc = read_provenance(outdir, stem) or {}
    recorded = doc.get("outputs") or {}
    foreign, ours, why = [], {}, []
    for kind, name in existing.items():
        entry = recorded.get(kind) or {}
        if entry.get("name") == name and entry.get("sha256") == sha256_file(outdir / name):
            ours[kind] = name
        else:
            foreign.append(name)
            why.append(f"{name} is {'changed since msdseg wrote it' if entry else 'not written by msdseg'}")
    if foreign:
        return Assessment("foreign", "; ".join(why), foreign, ours, identity)
    if doc.get("run") != identity.as_json():
        changed = [k for k in ("input_sha256", "model_sha256") if (doc.get("run") or {}).get(k) != getattr(identity, k)]
        what = {"input_sha256": "another input", "model_sha256": "another model"}
        reason = ", ".join(what[k] for k in changed) or "other settings"
        return Assessment("stale", f"outputs were made from {reason}", [], ours, identity)
    missing = [names[k] for k in expected if k not in ours]
    if missing:
        return Assessment("stale", f"{', '.join(missing)} missing", [], ours, identity)
    return Assessment("current", "outputs already complete", [], ours, identity)


def document(identity: RunIdentity, files: Mapping[str, Path], names: Mapping[str, str],
             input_path: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of freshly written ``files`` (kind -> path holding the content)."""
    import msdseg

    return {
        "format": FORMAT,
        "msdseg": msdseg.__version__,
        "input": str(input_path),
        "run": identity.as_json(),
        "outputs": {kind: {"name": names[kind], "sha256": sha256_file(path)} for kind, path in files.items()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def back_up(outdir: str | os.PathLike, names: list[str]) -> list[Path]:
    """Copy each file to a dated backup next to it (its content and times kept); the backups' paths."""
    outdir = Path(outdir)
    now = time.time()
    made = []
    for name in names:
        src = outdir / name
        dst = outdir / backup_name(name, now)
        k = 2
        while dst.exists():
            dst = outdir / f"{backup_name(name, now)}-{k}"
            k += 1
        shutil.copy2(src, dst)
        made.append(dst)
    return made
