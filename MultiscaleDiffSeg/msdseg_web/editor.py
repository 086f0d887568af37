"""The segment editor as a clinician expects it, on top of trame-slicer's own editor.

What changes, and why:

* **Brush**: a 2-D brush in the slice being viewed, sized in millimetres.  trame-slicer's default
  is a sphere sized relative to the screen, so one stroke reached into slices the user never saw
  (its ``Cylinder`` shape is one slice thick, and ``Absolute`` diameters are in mm).
* **Segment list** grouped as the label tree (Left / Right / Midline), collapsible, each group
  with its own eye, full names wrapped instead of cut, a click on the colour selects the segment,
  and deleting asks first.  The segment names are the tree's and the export maps names to aseg
  numbers, so the list offers no renaming.
* **Undo / Redo** as labelled buttons at the top of the panel, not only as icons in the tool strip.
* **Eraser mode**: "restore the result's label" (what the segmentation said before the edits) or
  "background"; see :mod:`.erase`.
"""
from __future__ import annotations

from typing import Any, Sequence

from trame.widgets import html
from trame.widgets.vuetify3 import (
    VBtn,
    VBtnToggle,
    VCard,
    VCardActions,
    VCardText,
    VCardTitle,
    VDialog,
    VIcon,
    VSpacer,
    VSwitch,
)
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.ui import SegmentEditorUI
from trame_slicer.app.ui.segmentation.paint_effect_ui import PaintEffectState
from trame_slicer.segmentation import BrushDiameterMode, SegmentationEffectErase, SegmentationEffectPaint

#: Brush diameter in mm: default, range and step.
BRUSH_MM = 3.0
BRUSH_MM_RANGE = (1.0, 30.0)
BRUSH_MM_STEP = 0.5
#: Edits the undo button can take back (each keeps a copy of the changed labelmap).
UNDO_STEPS = 10
OTHER_GROUP = ("other", "Other segments")
PAINT, ERASE = SegmentationEffectPaint.get_effect_name(), SegmentationEffectErase.get_effect_name()
STYLE = """
.msd-segment-row .v-list-item-title { white-space: normal; line-height: 1.25; }
.msd-segment-row { min-height: 30px !important; padding-top: 1px !important; padding-bottom: 1px !important; }
.msd-group-header { cursor: pointer; }
"""


def set_brush_defaults(state: Any) -> TypedState:
    """A 2-D brush of :data:`BRUSH_MM` mm for the paint and erase effects (they share this state)."""
    brush = TypedState(state, PaintEffectState)
    brush.data.use_sphere_brush = False
    brush.data.brush_diameter_mode = BrushDiameterMode.Absolute
    slider = brush.data.brush_diameter_slider
    slider.min_value, slider.max_value = BRUSH_MM_RANGE
    slider.step = BRUSH_MM_STEP
    slider.value = BRUSH_MM
    return brush


def apply_brush(editor: Any, brush: TypedState) -> None:
    """Give the paint and erase effects the page's brush (diameter in mm, 2-D or sphere).

    Why: each effect keeps its own parameter node, created with trame-slicer's defaults (a 6 %
    screen-relative sphere) on first use and again after the scene is cleared for a new T1; when
    the effect starts, trame-slicer copies those defaults into the page.  Calling this after every
    scene clear creates the nodes with the page's values first.
    """
    for effect_type in (SegmentationEffectPaint, SegmentationEffectErase):
        effect = editor.get_effect(effect_type)
        effect.set_brush_diameter(float(brush.data.brush_diameter_slider.value), brush.data.brush_diameter_mode)
        effect.set_use_sphere_brush(bool(brush.data.use_sphere_brush))


class GroupedSegmentEditorUI(SegmentEditorUI):
    """trame-slicer's editor panel with the segment list replaced by :class:`GroupedSegmentList`."""

    def __init__(self, groups: Sequence[tuple[str, str]], **kwargs: Any):
        self._groups = [*groups, OTHER_GROUP]  # read by _create_segment_list during the base init
        super().__init__(**kwargs)

    def _create_segment_list(self) -> None:
        names = self._typed_state.name.segment_list
        self.segment_list = GroupedSegmentList(str(names.segments), str(names.active_segment_id), self._groups,
                                               self.server)
        self.segment_list.select.connect(self.select_segment_clicked)
        self.segment_list.toggle.connect(self.toggle_segment_visibility_clicked)
        self.segment_list.delete.connect(self.delete_segment_clicked)


class GroupedSegmentList(html.Div):
    """Segments by group; the group of each segment id is in the state ``msd_segment_groups``."""

    def __init__(self, segments: str, active: str, groups: Sequence[tuple[str, str]], server: Any, **kwargs: Any):
        from undo_stack import Signal

        super().__init__(classes="msd-segment-list", **kwargs)
        self.select, self.toggle, self.delete = Signal(str), Signal(str), Signal(str)
        state = server.state
        state.setdefault("msd_segment_groups", {})
        state.setdefault("msd_collapsed", {})
        state.setdefault("msd_delete_candidate", None)
        select, toggle, delete = (server.trigger_name(s) for s in (self.select, self.toggle, self.delete))
        with self:
            for group_id, title in groups:
                members = f"{segments}.filter(s => (msd_segment_groups[s.segment_id] || 'other') === '{group_id}')"
                with html.Div(v_if=(f"{members}.length",), classes=f"msd-segment-group msd-segment-group-{group_id}"):
                    with html.Div(classes="d-flex align-center msd-group-header py-1",
                                  click=f"msd_collapsed = {{...msd_collapsed, {group_id}: !msd_collapsed.{group_id}}}"):
                        VIcon(icon=(f"msd_collapsed.{group_id} ? 'mdi-chevron-right' : 'mdi-chevron-down'",), size="small")
                        html.Span(f"{title} ({{{{ {members}.length }}}})", classes="text-subtitle-2 ml-1")
                        VSpacer()
                        if group_id != OTHER_GROUP[0]:
                            VSwitch(v_model=(f"msd_group_{group_id}", True), density="compact", hide_details=True,
                                    color="primary", classes=f"flex-grow-0 msd-list-group-switch-{group_id}",
                                    click="$event.stopPropagation()")
                    with html.Div(v_if=(f"!msd_collapsed.{group_id}",)):
                        with html.Div(v_for=f"item in {members}", key="item.segment_id",
                                      classes=("['d-flex align-center msd-segment-row px-1', "
                                               f"item.segment_id === {active} ? 'bg-primary-darken-1 msd-active' : '']",),
                                      click=f"trigger('{select}', [item.segment_id])",
                                      style="cursor: pointer; border-radius: 4px;"):
                            VIcon(icon="mdi-circle", color=("item.color",), size="small", classes="mr-2 msd-swatch")
                            html.Span("{{ item.name }}", classes="text-body-2 flex-grow-1 msd-segment-name",
                                      style="white-space: normal;")
                            VBtn(icon=("item.is_visible ? 'mdi-eye-outline' : 'mdi-eye-off-outline'",),
                                 variant="text", size="x-small", classes="msd-segment-eye",
                                 click=f"$event.stopPropagation(); trigger('{toggle}', [item.segment_id])")
                            VBtn(icon="mdi-delete-outline", variant="text", size="x-small",
                                 classes="msd-segment-delete",
                                 click="$event.stopPropagation(); msd_delete_candidate = item")
            with VDialog(model_value=("!!msd_delete_candidate",), max_width=420, persistent=True,
                         classes="msd-delete-dialog"):
                with VCard():
                    VCardTitle("Delete {{ msd_delete_candidate && msd_delete_candidate.name }}?")
                    VCardText("Its voxels become unlabelled. Undo brings the segment back.")
                    with VCardActions():
                        VSpacer()
                        VBtn("Cancel", classes="msd-delete-cancel", click="msd_delete_candidate = null")
                        VBtn("Delete", color="error", classes="msd-delete-confirm",
                             click=(f"trigger('{delete}', [msd_delete_candidate.segment_id]); "
                                    "msd_delete_candidate = null"))


class EditorHeader(html.Div):
    """Undo/redo with labels, and what the brush does, above trame-slicer's editor panel."""

    def __init__(self, editor: SegmentEditorUI, brush: TypedState, **kwargs: Any):
        super().__init__(classes="msd-editor-header d-flex flex-column ga-2 pa-3", **kwargs)
        undo_state = editor._typed_state.name  # trame-slicer keeps can_undo / can_redo there
        effect_key = undo_state.active_effect_name
        diameter, sphere = brush.name.brush_diameter_slider.value, brush.name.use_sphere_brush
        with self:
            with html.Div(classes="d-flex ga-2"):
                VBtn("Undo", prepend_icon="mdi-undo", classes="msd-undo", size="small", variant="tonal",
                     click=editor.undo_clicked, disabled=(f"!{undo_state.can_undo}",))
                VBtn("Redo", prepend_icon="mdi-redo", classes="msd-redo", size="small", variant="tonal",
                     click=editor.redo_clicked, disabled=(f"!{undo_state.can_redo}",))
            brush_on = f"['{PAINT}', '{ERASE}'].includes({effect_key})"
            with html.Div(v_if=(brush_on,), classes="text-caption msd-brush-info"):
                html.Span(f"Brush {{{{ {diameter} }}}} mm wide, ")
                html.Span("paints only the slice you are looking at (2-D)", v_if=(f"!{sphere}",))
                html.Span("a sphere through neighbouring slices too (3-D)", v_else=True, classes="text-warning")
            VSwitch(v_if=(brush_on,), v_model=(sphere,), label="3-D sphere brush",
                    density="compact", hide_details=True, color="warning", classes="msd-sphere-brush")
            with html.Div(v_if=(f"{effect_key} === '{ERASE}'",), classes="d-flex flex-column"):
                html.Div("Erasing gives the voxels", classes="text-caption")
                with VBtnToggle(v_model=("msd_erase_mode", "restore"), mandatory=True, density="compact",
                                variant="outlined", divided=True, classes="msd-erase-mode"):
                    VBtn("the result's label", value="restore", size="small", classes="msd-erase-restore")
                    VBtn("background", value="background", size="small", classes="msd-erase-background")
