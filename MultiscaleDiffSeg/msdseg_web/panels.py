"""The side panels: segmentation (input, run, groups, uncertainty, save/open) and volumes.

Every control carries an ``msd-*`` CSS class: the user guide names them and the browser test
finds them by it.  All state keys start with ``msd_`` so they never collide with trame-slicer's.
"""
from __future__ import annotations

from trame.widgets import html
from trame.widgets.vuetify3 import (
    VAlert,
    VBtn,
    VCard,
    VCardText,
    VCardTitle,
    VCheckbox,
    VDivider,
    VProgressLinear,
    VSelect,
    VSlider,
    VSwitch,
    VTable,
)

from msdseg.core.labels import LabelTree
from msdseg.core.settings import DEFAULT_PRESET, PRESETS as PRESET_TABLE, preset_label

from .widgets import DownloadButton, SavedFileLinks, UploadField

PRESETS = [{"title": preset_label(name), "value": name} for name in PRESET_TABLE]


def group_state_key(group_id: str) -> str:
    return f"msd_group_{group_id}"


class SegmentationPanel(VCard):
    """Input -> run (progress, cancel) -> groups and uncertainty display -> save, download, re-open."""

    def __init__(self, app, tree: LabelTree, **kwargs):
        super().__init__(variant="flat", classes="msd-panel", **kwargs)
        with self:
            VCardTitle("MultiscaleDiffSeg", classes="text-subtitle-1")
            with VCardText(classes="d-flex flex-column ga-3"):
                self._input(app)
                self._run(app)
                self._messages()
                with html.Div(v_if=("msd_has_result",), classes="d-flex flex-column ga-2"):
                    VDivider()
                    self._groups(app, tree)
                    self._uncertainty()
                    VDivider()
                    self._save(app)
                self._reopen(app)

    @staticmethod
    def _input(app) -> None:
        html.Div("T1-weighted volume (NIfTI, NRRD, MHA, MGZ)", classes="text-caption")
        UploadField("Open T1 volume…", "msd_upload_t1_busy", app.on_upload_t1, app.uploads, app.client_id,
                    app.report_error, classes="msd-upload-t1")
        html.Div("{{ msd_input_name }} {{ msd_input_summary }}", v_if=("msd_input_name",),
                 classes="text-body-2 msd-input-name")

    @staticmethod
    def _run(app) -> None:
        VSelect(v_model=("msd_preset", DEFAULT_PRESET), items=("msd_presets", PRESETS), label="Preset",
                density="compact", hide_details=True, disabled=("msd_running",))
        VCheckbox(v_model=("msd_uncertainty", True), label="Uncertainty map", density="compact",
                  hide_details=True, disabled=("msd_running",))
        with html.Div(classes="d-flex ga-2"):
            VBtn("Segment", prepend_icon="mdi-brain", color="primary", classes="msd-run", click=app.run,
                 disabled=("!msd_input_name || msd_running",))
            VBtn("Cancel", prepend_icon="mdi-stop", classes="msd-cancel", click=app.cancel,
                 disabled=("!msd_running",))
        VProgressLinear(v_if=("msd_running || msd_progress > 0",), model_value=("msd_progress", 0), height=8,
                        color="primary", classes="msd-progress")
        html.Div("{{ msd_message }}", classes="text-caption msd-message")
        html.Div("{{ msd_eta }}", v_if=("msd_running && msd_eta",), classes="text-caption msd-eta")

    @staticmethod
    def _messages() -> None:
        VAlert(v_if=("msd_error",), text=("msd_error",), type="error", density="compact", closable=True,
               classes="msd-error", click_close="msd_error = ''")
        VAlert(v_if=("msd_untrained",), type="warning", density="compact", classes="msd-untrained",
               text="Untrained model: no trained weights are installed, so the labels are meaningless "
                    "(the whole pipeline still runs).")

    @staticmethod
    def _groups(app, tree: LabelTree) -> None:
        html.Div("Groups", classes="text-caption")
        for group in tree.children(tree.root.id):
            VSwitch(v_model=(group_state_key(group.id), True), label=group.name, density="compact",
                    hide_details=True, color="primary", classes=f"msd-group-{group.id}")

    @staticmethod
    def _uncertainty() -> None:
        with html.Div(v_if=("msd_has_uncertainty",)):
            VSwitch(v_model=("msd_show_uncertainty", False), label="Uncertainty overlay", density="compact",
                    hide_details=True, color="warning", classes="msd-show-uncertainty")
            with html.Div(v_if=("msd_show_uncertainty",), classes="msd-uncertainty-legend"):
                html.Div(style=("{ background: msd_uncertainty_bar, height: '10px', borderRadius: '2px' }",),
                         classes="msd-colorbar")
                with html.Div(classes="d-flex text-caption"):
                    html.Span("{{ msd_uncertainty_range[0] }}", classes="msd-colorbar-low")
                    html.Span("probability that the label is wrong", classes="flex-grow-1 text-center")
                    html.Span("≥ {{ msd_uncertainty_range[1] }}", classes="msd-colorbar-high")
                html.Div("Voxels below {{ msd_uncertainty_range[0] }} are not shown: the threshold separates "
                         "this map's unsure voxels from its floor (Otsu).", classes="text-caption text-medium-emphasis")
            VSlider(v_if=("msd_show_uncertainty",), v_model=("msd_uncertainty_opacity", 0.6), min=0.0, max=1.0,
                    step=0.05, label="Opacity", density="compact", hide_details=True)

    @staticmethod
    def _reopen(app) -> None:
        _reopen_field(app)

    @staticmethod
    def _save(app) -> None:
        html.Div("Results", classes="text-caption")
        VBtn("Save to output folder", prepend_icon="mdi-content-save", classes="msd-save", click=app.save,
             variant="tonal")
        html.Div("{{ msd_saved_message }}", v_if=("msd_saved_message",), classes="text-caption msd-saved")
        SavedFileLinks("msd_saved_files", app.saved_bytes, v_if=("msd_saved_files.length",),
                       classes="d-flex flex-wrap msd-saved-files")
        with html.Div(classes="d-flex ga-2 flex-wrap"):
            DownloadButton(".seg.nrrd", "segmentation", "msd_stem + '.seg.nrrd'", app.download_bytes,
                           classes="msd-download-seg")
            DownloadButton("labels .nii.gz", "labels", "msd_stem + '_labels.nii.gz'", app.download_bytes,
                           classes="msd-download-labels")


def swatch(colour: str) -> None:
    html.Span(classes="msd-swatch", style=(f"{{ display: 'inline-block', width: '10px', height: '10px', "
                                          f"borderRadius: '2px', marginRight: '4px', background: {colour} }}",))


def _reopen_field(app) -> None:
    with html.Div(v_if=("msd_input_name && !msd_running",)):
        html.Div("Open a saved result of this T1 (.seg.nrrd or labels image)", classes="text-caption mt-2")
        UploadField("Open result…", "msd_upload_result_busy", app.on_upload_result, app.uploads, app.client_id,
                    app.report_error, classes="msd-upload-result")


class VolumesPanel(VCard):
    """Structure volumes (mL): left and right side by side with their asymmetry, then the midline.

    Values are rounded to 0.1 mL on screen; the CSV download has full precision.  Parents are the
    sums of their children.
    """

    def __init__(self, app, **kwargs):
        super().__init__(variant="flat", classes="msd-volumes", **kwargs)
        indent = "{ paddingLeft: (4 + 10 * row.level) + 'px', fontWeight: row.leaf ? 'normal' : 'bold' }"
        with self:
            VCardTitle("Structure volumes (mL)", classes="text-subtitle-1")
            with VCardText(classes="d-flex flex-column ga-2"):
                html.Div("Run a segmentation first.", v_if=("!msd_volumes.length",), classes="text-caption")
                VAlert(v_if=("msd_volumes.length && msd_edited_voxels",), type="info", density="compact",
                       classes="msd-edited",
                       text=("`Includes manual edits: ${msd_edited_voxels} voxels differ from the result "
                             "as segmented or opened.`",))
                with html.Div(v_if=("msd_volumes.length",), classes="d-flex ga-2 align-center"):
                    DownloadButton("CSV", "volumes", "msd_stem + '_volumes.csv'", app.download_bytes,
                                   classes="msd-download-volumes")
                    html.Span("Asymmetry index: 100 × (L − R) / mean(L, R)", classes="text-caption")
                with VTable(v_if=("msd_volumes.length",), density="compact", fixed_header=True, height="68vh",
                            classes="msd-volumes-table"):
                    with html.Thead(), html.Tr():
                        html.Th("Structure")
                        html.Th("Left", classes="text-right")
                        html.Th("Right", classes="text-right")
                        html.Th("AI %", classes="text-right")
                    with html.Tbody(), html.Tr(v_for="row in msd_volumes", key="row.id",
                                               classes=("row.paired ? 'msd-row-paired' : 'msd-row-single'",)):
                        with html.Td(style=(indent,)):
                            html.Span("{{ row.name }}")
                        with html.Td(v_if=("row.paired",), classes="text-right text-no-wrap msd-left"):
                            swatch("row.colour")
                            html.Span("{{ row.left }}")
                        with html.Td(v_if=("row.paired",), classes="text-right text-no-wrap msd-right"):
                            swatch("row.twin_colour")
                            html.Span("{{ row.right }}")
                        html.Td("{{ row.ai }}", v_if=("row.paired",), classes="text-right msd-ai")
                        with html.Td(v_if=("!row.paired",), colspan=3, classes="text-right text-no-wrap msd-single"):
                            swatch("row.colour")
                            html.Span("{{ row.ml }}")
