"""The page: app bar, a tool strip on the left, the active tool's panel, and Slicer's slice/3D views.

Modelled on trame-slicer's ``SegmentationAppUI`` with this app's own panels; trame-slicer's segment
editor panel (effects, segment list, undo/redo) and volume display panel are used as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import client, html
from trame.widgets.vuetify3 import (
    VAppBar,
    VDivider,
    VMain,
    VNavigationDrawer,
    VProgressCircular,
    VSpacer,
    VToolbarTitle,
)
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.ui import (
    ControlButton,
    FlexContainer,
    LayoutButton,
    SegmentEditorUI,
    SegmentEditorUndoRedoUI,
    ViewerLayoutState,
    VolumePropertyUI,
)
from trame_slicer.app.ui import LayoutButtonState
from trame_slicer.core import LayoutManager
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from msdseg.core.labels import LabelTree

from . import editor as editor_ui
from . import views
from .panels import SegmentationPanel, VolumesPanel

#: tool id -> (icon, tooltip); the drawer shows the panel of the active tool.
TOOLS = {
    "segmentation": ("mdi-brain", "Segmentation"),
    "editor": ("mdi-brush", "Segment editor"),
    "volumes": ("mdi-table-large", "Structure volumes"),
    "display": ("mdi-tune-variant", "Volume display"),
}
DEFAULT_TOOL = "segmentation"
#: The default view layout: three slice views.  A segmentation is reviewed and edited on slices;
#: the 3D layouts stay one click away in the layout menu.
SLICES_LAYOUT = "Axial Primary (slices only)"


@dataclass
class PageWidgets:
    """The trame-slicer widgets whose logic the app connects after building the page."""

    layout: VAppLayout
    editor: SegmentEditorUI
    volume_property: VolumePropertyUI
    layout_button: LayoutButton


def use_slices_layout(server, layout_manager: LayoutManager) -> None:
    """Register :data:`SLICES_LAYOUT` (axial left, coronal and sagittal right) and select it."""
    layout_manager.register_layout(SLICES_LAYOUT, Layout(
        LayoutDirection.Horizontal,
        [ViewLayoutDefinition.axial_view(),
         Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()])],
    ))
    TypedState(server.state, LayoutButtonState).data.current_layout_id = SLICES_LAYOUT


def build_page(server, app, tree: LabelTree, layout_manager: LayoutManager) -> PageWidgets:
    viewer = TypedState(server.state, ViewerLayoutState)
    viewer.data.is_drawer_visible = True
    viewer.data.active_tool = DEFAULT_TOOL
    tool = viewer.name.active_tool
    with VAppLayout(server, template_name="main") as layout:
        layout.root.theme = "dark"
        client.Style("html { overflow-y: auto; } .msd-panel .v-card-text { padding-top: 4px; }"
                     + views.STYLE + editor_ui.STYLE)
        with VAppBar(density="compact"):
            VToolbarTitle("MultiscaleDiffSeg", style="flex: none;", classes="mr-6")
            html.Div("{{ msd_input_name }}", classes="text-body-2 text-medium-emphasis msd-title-input")
            VSpacer()
            with html.Div(v_if=("msd_cursor",), classes="text-caption msd-cursor mr-4 text-right",
                          style="line-height: 1.2;"):
                html.Div("{{ msd_cursor.label ? msd_cursor.label + ' · ' : '' }}T1 {{ msd_cursor.intensity }}"
                         "{{ msd_cursor.uncertainty ? ' · uncertainty ' + msd_cursor.uncertainty : '' }}",
                         classes="msd-cursor-values")
                html.Div("{{ msd_cursor.position }} · voxel {{ msd_cursor.voxel }}",
                         classes="text-medium-emphasis msd-cursor-position")
            VProgressCircular(v_if=("msd_running",), model_value=("msd_progress",), size=24, width=3,
                              color="primary", classes="mr-2")
            VProgressCircular(indeterminate=("!!trame__busy",), color="#04a94d", size=16, width=3, classes="mr-4")
        with VMain(), FlexContainer(row=True, fill_height=True):
            layout_manager.initialize_layout_grid(layout)
        with VNavigationDrawer(permanent=True, location="left", width=(f"{tool} === 'volumes' ? 480 : 400",),
                               order=1, disable_resize_watcher=True,
                               v_model=(viewer.name.is_drawer_visible,)):
            SegmentationPanel(app, tree, v_if=(f"{tool} === 'segmentation'",))
            with html.Div(v_if=(f"{tool} === 'editor'",), classes="msd-editor-panel d-flex flex-column",
                          style="height: 100%;"):
                groups = [(group.id, group.name) for group in tree.children(tree.root.id)]
                editor = editor_ui.GroupedSegmentEditorUI(groups, style="order: 1; min-height: 0;")
                editor_ui.EditorHeader(editor, TypedState(server.state, editor_ui.PaintEffectState),
                                       style="order: 0;")
            VolumesPanel(app, v_if=(f"{tool} === 'volumes'",))
            volume_property = VolumePropertyUI(v_if=(f"{tool} === 'display'",))
        with VNavigationDrawer(permanent=True, location="left", width=44, order=0, disable_resize_watcher=True), \
                FlexContainer(fill_height=True):
            with FlexContainer(classes="py-2", align="center"):
                for tool_id, (icon, name) in TOOLS.items():
                    ControlButton(
                        name=name, icon=icon, classes=f"mt-1 msd-tool-{tool_id}",
                        active=(f"{tool} === '{tool_id}'",),
                        click=(f"{viewer.name.is_drawer_visible} = !({viewer.name.is_drawer_visible} && {tool} === "
                               f"'{tool_id}'); {tool} = '{tool_id}'"),
                    )
                layout_button = LayoutButton(classes="mt-1")
            VDivider()
            VSpacer()
            VDivider()
            with FlexContainer(classes="py-2 msd-undo-redo", align="center"):
                SegmentEditorUndoRedoUI(editor_ui=editor, v_if=(viewer.name.is_volume_loaded,))
    return PageWidgets(layout, editor, volume_property, layout_button)
