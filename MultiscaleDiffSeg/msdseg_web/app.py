"""The web application: trame state <-> MRML scene <-> segmentation worker <-> files.

All MRML work happens on the server's event-loop thread (trame callbacks and tasks run there);
the worker thread only computes.  A watcher task copies the worker's progress into the page and,
when the job is done, imports the result into the scene through the Slicer module's MRML layer.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk
from trame.app import TrameApp
from trame_server.utils.asynchronous import create_task
from trame_server.utils.typed_state import TypedState
from trame_slicer import module as trame_slicer_module
from trame_slicer.app.logic import LayoutButtonLogic, VolumePropertyLogic
from trame_slicer.app.logic.segmentation import SegmentEditorLogic
from trame_slicer.app.ui import ViewerLayoutState, create_vertical_slice_view_gutter_ui
from trame_slicer.core import SlicerApp
from trame_slicer.rca_view import register_rca_factories

from MultiscaleDiffSegLib import mrml
from msdseg.core.errors import InputError
from msdseg.core.settings import DEFAULT_PRESET, SegmentSettings
from msdseg.core.io import case_stem, load_volume
from msdseg.core.labels import load_tree
from msdseg.outputs.writers import write_seg_nrrd
from msdseg.core.volumes import structure_volumes, volumes_csv_text

from . import module as page_module
from . import scene
from .editor import UNDO_STEPS, apply_brush, set_brush_defaults
from .erase import install_restoring_eraser
from .overlay import colour_bar_css, display_range
from .readout import CursorReadout, ProbeArrays
from .access import BrowserLock, OriginPolicy, cookie_name, middleware, served_origins
from .panels import group_state_key
from .results import check_download_kind, read_result_labels, save_result, saved_file
from .session import Session
from .ui import build_page, use_slices_layout
from .views import SliceViewOverlay
from .volume_table import volume_rows
from .transfer import DEFAULT_MAX_UPLOAD_MB, UploadReceiver, cap_websocket_messages, in_thread
from .uploads import named_by_file, open_upload, read_t1
from .worker import CANCELLED, DONE, FAILED, SegmentationJob, time_left

log = logging.getLogger("msdseg.web")

#: How often the page shows the worker's progress, and how long edits settle before the
#: volumes table is recomputed (a paint stroke modifies the segmentation many times).
POLL_SECONDS = 0.3
VOLUMES_DELAY_SECONDS = 0.8


@dataclass
class AppOptions:
    output_dir: Path
    device: str = "auto"
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    allow_origins: tuple[str, ...] = ()
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB


def user_errors(method: Callable) -> Callable:
    """Show :class:`InputError` (and unexpected failures) in the page instead of losing them in a log."""
    @functools.wraps(method)
    def wrapped(self: "MsdsegWebApp", *args: Any, **kwargs: Any) -> Any:
        with self.showing_errors():
            return method(self, *args, **kwargs)
    return wrapped


def read_result_upload(paths: list[Path]) -> tuple[Path, sitk.Image]:
    """The uploaded result file (header checked) and its labels: blocking, run in a thread."""
    path = open_upload(paths)
    with named_by_file(path):
        return path, read_result_labels(path)


def error_line(exc: Exception) -> str:
    """One line for the page: an :class:`InputError` as it is, anything else with its type (and logged)."""
    if isinstance(exc, InputError):
        return str(exc)
    log.error("web app action failed", exc_info=exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


@contextlib.contextmanager
def quiet_vtk_warnings() -> Iterator[None]:
    """Silence VTK warnings while trame-slicer builds its views.

    Why: each view observes the interactor's WindowResizeEvent, and VTK 9.6 prints a six-line
    deprecation warning for every one of them at start-up; it says nothing to a user.  Warnings
    after start-up are shown as usual.
    """
    from vtkmodules.vtkCommonCore import vtkObject

    was_on = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(was_on)


class MsdsegWebApp(TrameApp):
    """One server, one scene, one open case; page callbacks are the methods below."""

    def __init__(self, options: AppOptions, server=None):
        super().__init__(server)
        self.options = options
        self.tree = load_tree()
        self.session = Session()
        self._uploads = Path(tempfile.mkdtemp(prefix="msdseg_web_"))
        self.uploads = UploadReceiver(self._uploads / "incoming", max_bytes=int(options.max_upload_mb * 2**20))
        self.origins = OriginPolicy(served_origins(options.host, options.port, options.allow_origins))
        self.lock = BrowserLock()
        self._wslink: Any = None
        self.volumes: dict[str, float] = {}
        self._volumes_task: asyncio.Task | None = None
        self.jobs_started = 0

        self.server.enable_module(trame_slicer_module)
        self.server.enable_module(page_module)
        self.server.controller.on_server_bind.add(self._on_server_bind)
        with quiet_vtk_warnings():
            self.slicer_app = SlicerApp()
            register_rca_factories(self.slicer_app.view_manager, self.server,
                                   slice_view_ui_f=SliceViewOverlay(create_vertical_slice_view_gutter_ui))
            self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
            self.volume_property_logic = VolumePropertyLogic(self.server, self.slicer_app)
            self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
            use_slices_layout(self.server, self.layout_logic.layout_manager)
        self.viewer = TypedState(self.state, ViewerLayoutState)
        self._init_state()
        page = build_page(self.server, self, self.tree, self.layout_logic.layout_manager)
        self.ui = page.layout
        self.editor_logic.set_ui(page.editor)
        self.volume_property_logic.set_ui(page.volume_property)
        self.layout_logic.set_ui(page.layout_button)
        self.brush = set_brush_defaults(self.state)
        apply_brush(self.editor, self.brush)
        self.editor.undo_stack.set_undo_limit(UNDO_STEPS)
        install_restoring_eraser(self.editor, lambda: self.session.reference, lambda: self.state.msd_erase_mode)
        self._probe: ProbeArrays | None = None
        self.readout = CursorReadout(self.state, lambda: self._probe,
                                     {int(n.label): n.name for n in self.tree.leaves})
        self.readout.observe(self.slicer_app.scene)

        self.editor.segmentation_modified.connect(self._schedule_volumes)
        for group in self.tree.children(self.tree.root.id):
            self.state.change(group_state_key(group.id))(functools.partial(self._on_group_changed, group.id))
        self.state.change("msd_show_uncertainty", "msd_uncertainty_opacity")(self._on_uncertainty_display)

    # ------------------------------------------------------------------ who may connect
    def _on_server_bind(self, wslink_server: Any) -> None:
        """Guard the page and its WebSocket (Origin, one browser) and cap message sizes."""
        self._wslink = wslink_server
        cap_websocket_messages()
        ws_paths = [f"/{route.lstrip('/')}" for route in wslink_server.config.get("ws", {})]
        wslink_server.app.middlewares.append(
            middleware(self.origins, self.lock, ws_paths, cookie_name(self.options.port), on_free=self.uploads.discard))

    def client_id(self) -> str:
        """The WebSocket connection whose message is being handled (wslink sets it per message)."""
        return str(getattr(self._wslink, "last_active_client_id", None) or "local")

    def report_error(self, exc: Exception) -> None:
        """Show a failure that was caught elsewhere (an upload refused mid-way) as the page's error."""
        with self.state:
            self.state.msd_error = error_line(exc)

    # ------------------------------------------------------------------ state
    @property
    def editor(self):
        return self.slicer_app.segmentation_editor

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "MultiscaleDiffSeg"
        s.msd_input_name = ""
        s.msd_input_summary = ""
        s.msd_stem = "segmentation"
        s.msd_preset = DEFAULT_PRESET  # the same default as msdseg segment and the Slicer module
        s.msd_uncertainty = True
        s.msd_running = False
        s.msd_progress = 0
        s.msd_message = "Open a T1 volume to start."
        s.msd_error = ""
        s.msd_untrained = False
        s.msd_has_result = False
        s.msd_has_uncertainty = False
        s.msd_show_uncertainty = False
        s.msd_uncertainty_opacity = 0.6
        s.msd_volumes = []
        s.msd_edited_voxels = 0
        s.msd_saved_message = ""
        s.msd_saved_files = []
        s.msd_output_dir = str(self.options.output_dir)
        s.msd_erase_mode = "restore"
        s.msd_uncertainty_range = [0.0, 1.0]
        s.msd_uncertainty_bar = ""
        s.msd_eta = ""
        for group in self.tree.children(self.tree.root.id):
            s[group_state_key(group.id)] = True

    # ------------------------------------------------------------------ input
    def open_t1_path(self, path: str | Path) -> None:
        """Load a T1 from the server's disk (the command line's INPUT)."""
        path = Path(path)
        self._show_t1(path, load_volume(path))

    async def on_upload_t1(self, paths: list[Path]) -> None:
        """Read and check the uploaded T1 in a worker thread; only the scene update runs on the loop."""
        with self.showing_errors():
            self._refuse_while_running()
            self.state.msd_message = "reading the uploaded volume"
            self.state.flush()
            path, image = await in_thread(read_t1, paths)
            with self.state:
                self._show_t1(path, image)

    def _refuse_while_running(self) -> None:
        if self.session.running:
            raise InputError("a segmentation is running: wait for it or cancel it first")

    def _show_t1(self, path: Path, image: sitk.Image) -> None:
        self._refuse_while_running()
        stem = case_stem(path)
        volume = scene.add_t1(self.slicer_app.scene, image, stem)
        self.slicer_app.display_manager.show_volume(volume, do_reset_views=True)
        self.editor_logic.on_volume_changed(volume)
        apply_brush(self.editor, self.brush)  # the cleared scene lost the effects' parameters
        self.volume_property_logic.on_volume_changed(volume)
        self.session = Session(stem=stem, input_path=path, image=image, volume_node=volume)
        self._probe = ProbeArrays(scene.ras_to_ijk(volume), sitk.GetArrayViewFromImage(image))
        self.readout.observe(self.slicer_app.scene)
        self.state.msd_cursor = None  # nothing of the previous case under the mouse
        s = self.state
        self.viewer.data.is_volume_loaded = True
        s.msd_input_name = path.name
        size = "x".join(str(n) for n in image.GetSize())
        spacing = "x".join(f"{v:.3g}" for v in image.GetSpacing())
        s.msd_input_summary = f"({size} voxels, {spacing} mm)"
        s.msd_stem = stem
        s.msd_error = ""
        s.msd_progress = 0
        s.msd_message = "Ready: choose a preset and press Segment."
        s.msd_has_result = False
        s.msd_has_uncertainty = False
        s.msd_show_uncertainty = False
        s.msd_untrained = False
        self.volumes = {}
        s.msd_volumes = []
        s.msd_edited_voxels = 0
        s.msd_saved_message = ""
        s.msd_saved_files = []
        s.msd_eta = ""
        s.msd_segment_groups = {}

    # ------------------------------------------------------------------ segmentation job
    @user_errors
    def run(self) -> None:
        if self.session.image is None:
            raise InputError("open a T1 volume first")
        self._refuse_while_running()
        settings = SegmentSettings(preset=self.state.msd_preset, device=self.options.device,
                                   uncertainty=bool(self.state.msd_uncertainty), model=self.options.model)
        settings.resolved()
        job = SegmentationJob(self.session.image, settings)
        self.session.job = job
        job.start()
        self.jobs_started += 1
        self.state.msd_running = True
        self.state.msd_error = ""
        self.state.msd_progress = 0
        self.state.msd_message = "starting"
        create_task(self._watch(job, self.session))

    def cancel(self) -> None:
        if self.session.job is not None:
            self.session.job.cancel()
            self.state.msd_message = "cancelling"

    async def _watch(self, job: SegmentationJob, session: Session) -> None:
        while not (status := job.status()).finished:
            with self.state:
                self.state.msd_progress = round(100 * status.progress, 1)
                self.state.msd_message = f"{status.message} ({status.seconds:.0f} s)"
                self.state.msd_eta = time_left(status.progress, status.seconds)
            await asyncio.sleep(POLL_SECONDS)
        with self.state:
            self.state.msd_running = False
            self.state.msd_eta = ""
            if session is not self.session:
                return
            self.state.msd_progress = 100 if status.state == DONE else 0
            if status.state == DONE and job.result is not None:
                result = job.result
                self.state.msd_message = "importing the result"
                with self.showing_errors():
                    self._show_result(result.labels, result.uncertainty, dict(result.info))
                    self.state.msd_message = (f"done in {status.seconds:.0f} s "
                                              f"({result.info.get('preset')} preset, {result.info.get('device')})")
            elif status.state == FAILED:
                self.state.msd_error = status.error
                self.state.msd_message = "failed"
            elif status.state == CANCELLED:
                self.state.msd_message = "cancelled"

    @contextlib.contextmanager
    def showing_errors(self) -> Iterator[None]:
        """Turn a failure into the page's error message (one line), keep the server running."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            with self.state:
                self.state.msd_error = error_line(exc)

    # ------------------------------------------------------------------ results in the scene
    def _show_result(self, labels: sitk.Image, uncertainty: sitk.Image | None, info: dict[str, Any]) -> None:
        session = self.session
        volume = session.volume_node
        segmentation_node = self.editor.active_segmentation_node
        for view in self.slicer_app.view_manager.get_slice_views():
            view.set_foreground_volume_id(None)  # the old uncertainty node may be removed below
        nodes = scene.import_result(self.slicer_app.scene, volume, labels, uncertainty, segmentation_node,
                                    self.tree, info)
        self.editor.set_active_segmentation(nodes.segmentation, volume)  # also clears the undo stack
        self.slicer_app.display_manager.reset_views()  # fit the slices to the views as the page sizes them
        session.nodes, session.uncertainty, session.info = nodes, uncertainty, info
        session.reference = np.array(sitk.GetArrayViewFromImage(labels), dtype=np.uint16)
        self._probe = ProbeArrays(scene.ras_to_ijk(volume), sitk.GetArrayViewFromImage(session.image),
                                  session.reference.copy(),
                                  None if uncertainty is None else sitk.GetArrayFromImage(uncertainty))
        s = self.state
        s.msd_has_result = True
        s.msd_has_uncertainty = nodes.uncertainty is not None
        s.msd_show_uncertainty = False
        s.msd_untrained = info.get("trained") is False
        s.msd_saved_message = ""
        s.msd_saved_files = []
        for group in self.tree.children(self.tree.root.id):
            s[group_state_key(group.id)] = True
        s.msd_segment_groups = {segment_id: group.id for group in self.tree.children(self.tree.root.id)
                                for segment_id in mrml.segments_of_group(nodes.segmentation, self.tree, group.id)}
        if nodes.uncertainty is not None:
            lower, upper = display_range(self._probe.uncertainty)
            scene.set_uncertainty_range(nodes.uncertainty, lower, upper)
            s.msd_uncertainty_range = [round(lower, 3), round(upper, 3)]
            s.msd_uncertainty_bar = colour_bar_css(nodes.uncertainty.GetDisplayNode().GetColorNode())
        self.viewer.data.active_tool = "segmentation"
        self._set_volumes(labels)

    def _on_group_changed(self, group_id: str, **_: Any) -> None:
        node = self.session.segmentation_node
        if node is None:
            return
        visible = bool(self.state[group_state_key(group_id)])
        if mrml.group_visibility(node, group_id, self.tree) == visible:
            return
        mrml.set_group_visibility(node, group_id, visible, self.tree)
        self.editor.segmentation_display_modified()  # refreshes the editor's segment list (eye icons)

    def _on_uncertainty_display(self, **_: Any) -> None:
        nodes = self.session.nodes
        if nodes is None or nodes.uncertainty is None:
            return
        scene.set_uncertainty_overlay(self.slicer_app.view_manager.get_slice_views(), nodes.uncertainty,
                                      bool(self.state.msd_show_uncertainty),
                                      float(self.state.msd_uncertainty_opacity))

    # ------------------------------------------------------------------ volumes table
    def current_labels(self) -> sitk.Image:
        """The segmentation as it is now (edits included), as aseg labels on the input grid."""
        node = self.session.segmentation_node
        if node is None:
            raise InputError("there is no segmentation yet: press Segment or open a saved result")
        return scene.export_labels(self.slicer_app.segmentations_logic, node, self.session.volume_node)

    def _set_volumes(self, labels: sitk.Image) -> None:
        """Volumes table, edit count and the cursor readout's labels, from the labels as they are now."""
        array = sitk.GetArrayViewFromImage(labels)
        self.volumes = structure_volumes(array, labels.GetSpacing(), self.tree)
        self.state.msd_volumes = volume_rows(self.volumes, self.tree)
        reference = self.session.reference
        self.state.msd_edited_voxels = int(np.count_nonzero(reference != array)) if reference is not None else 0
        if self._probe is not None:
            self._probe.labels = np.array(array, dtype=np.uint16)

    def _schedule_volumes(self, *_: Any) -> None:
        if self.session.segmentation_node is None:
            return
        if self._volumes_task is not None and not self._volumes_task.done():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving yet: the import that triggered this filled the table itself
        self._volumes_task = create_task(self._refresh_volumes_later())

    async def _refresh_volumes_later(self) -> None:
        await asyncio.sleep(VOLUMES_DELAY_SECONDS)
        if self.session.segmentation_node is None:
            return
        with self.state:
            with self.showing_errors():
                self._set_volumes(self.current_labels())

    # ------------------------------------------------------------------ save, download, re-open
    async def save(self) -> None:
        """Export the labels on the loop (MRML), write the files in a worker thread."""
        with self.showing_errors():
            labels = self.current_labels()
            paths = await in_thread(save_result, labels, self.session.uncertainty, self.tree,
                                    self.options.output_dir, self.session.stem)
            with self.state:
                self._saved(paths)

    def _saved(self, paths: dict[str, Path]) -> None:
        names = ", ".join(p.name for p in paths.values())
        note = ""
        if not paths["segmentation"].name.startswith(f"{self.session.stem}.seg"):
            note = f" ({self.session.stem}.* already existed: nothing was replaced)"
        self.state.msd_saved_message = f"Saved {names} in {self.options.output_dir}{note}"
        self.state.msd_saved_files = [p.name for p in paths.values()]
        self.state.msd_error = ""

    def saved_bytes(self, name: str) -> bytes | None:
        """A file of the output folder by its plain name (see :func:`.results.saved_file`)."""
        try:
            return saved_file(self.options.output_dir, name).read_bytes()
        except InputError as exc:
            self.state.msd_error = str(exc)
            return None

    def download_bytes(self, kind: str) -> bytes | None:
        """The current segmentation as a file's bytes; the page names only a kind, never a path."""
        try:
            check_download_kind(kind)
            labels = self.current_labels()
        except InputError as exc:
            self.state.msd_error = str(exc)
            return None
        if kind == "volumes":  # full precision, as msdseg segment writes it; the table only rounds for display
            volumes = structure_volumes(sitk.GetArrayViewFromImage(labels), labels.GetSpacing(), self.tree)
            return volumes_csv_text(volumes, self.tree).encode("utf-8")
        with tempfile.TemporaryDirectory(dir=self._uploads) as tmp:
            if kind == "segmentation":
                path = Path(tmp) / "result.seg.nrrd"
                write_seg_nrrd(path, labels, self.tree)
            else:
                path = Path(tmp) / "result_labels.nii.gz"
                sitk.WriteImage(labels, str(path), useCompression=True)
            return path.read_bytes()

    def open_result_path(self, path: str | Path) -> None:
        """Show a saved ``.seg.nrrd`` or labels image on the loaded T1 (it must share its grid)."""
        path = Path(path)
        if self.session.volume_node is None:
            raise InputError("open the T1 volume before a result")
        self._show_result_labels(path, read_result_labels(path))

    def _show_result_labels(self, path: Path, labels: sitk.Image) -> None:
        try:
            mrml.check_same_grid(labels, self.session.volume_node)
        except mrml.GeometryMismatchError as exc:
            raise InputError(f"{path.name} does not belong to this T1: {exc}") from None
        self._show_result(labels, None, {"source": path.name})
        self.state.msd_message = f"opened {path.name}"

    async def on_upload_result(self, paths: list[Path]) -> None:
        """Read the uploaded result in a worker thread, then show it on the open T1."""
        with self.showing_errors():
            self._refuse_while_running()
            if self.session.volume_node is None:
                raise InputError("open the T1 volume before a result")
            path, labels = await in_thread(read_result_upload, paths)
            with self.state:
                self._show_result_labels(path, labels)
                self.state.msd_error = ""

    # ------------------------------------------------------------------ test hook support
    def label_summary(self) -> dict[str, Any]:
        """Counts per label value and a digest of the current labels (for the browser test)."""
        if self.session.segmentation_node is None:
            return {"counts": {}, "sha1": None}
        labels = self.current_labels()
        array = np.ascontiguousarray(sitk.GetArrayViewFromImage(labels))
        return {"counts": {str(k): v for k, v in scene.label_counts(labels).items()},
                "sha1": hashlib.sha1(array.tobytes()).hexdigest(), "size": list(labels.GetSize())}

    def edit_summary(self) -> dict[str, Any]:
        """How the labels differ from the reference: voxel count, labels before/after, axes touched."""
        reference = self.session.reference
        if reference is None:
            return {}
        labels = sitk.GetArrayFromImage(self.current_labels())
        changed = reference != labels
        where = np.nonzero(changed)
        before = np.bincount(reference[changed].astype(np.int64)) if changed.any() else np.zeros(0)
        after = np.bincount(labels[changed].astype(np.int64)) if changed.any() else np.zeros(0)
        return {"changed": int(changed.sum()),
                "from": {str(v): int(before[v]) for v in np.flatnonzero(before)},
                "to": {str(v): int(after[v]) for v in np.flatnonzero(after)},
                "distinct_k_j_i": [int(np.unique(axis).size) for axis in where]}

    def close(self) -> None:
        shutil.rmtree(self._uploads, ignore_errors=True)
