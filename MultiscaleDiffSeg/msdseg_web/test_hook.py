"""A read-only JSON view of the server's state, for the browser test (``--test-hook`` only).

Why: the browser test drives the page like a user, but whether a paint stroke changed the
segmentation, whether undo restored it and what a re-opened file contains are facts of the
server's MRML scene.  The endpoint reports them; it never changes anything, and it is off unless
the hidden ``--test-hook`` option is given.  It runs on the event-loop thread, like every other
access to the scene.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from MultiscaleDiffSegLib import mrml

ROUTE = "/msdseg-test/state"


def snapshot(app, with_labels: bool = False) -> dict[str, Any]:
    """The server's facts; the label digest and the edit summary (an export of the labels) only on request."""
    session = app.session
    job = session.job.status() if session.job is not None else None
    state = app.state
    views = app.slicer_app.view_manager.get_slice_views()
    undo = app.editor.undo_stack
    return {
        "input": session.stem or None,
        "jobs_started": app.jobs_started,
        "job": None if job is None else {"state": job.state, "progress": job.progress, "message": job.message,
                                         "error": job.error},
        "has_result": session.segmentation_node is not None,
        "labels": app.label_summary() if with_labels else None,
        "edits": app.edit_summary() if with_labels else None,
        "can_undo": bool(undo is not None and undo.can_undo()),
        "can_redo": bool(undo is not None and undo.can_redo()),
        "active_effect": app.editor.active_effect_name,
        "error": state.msd_error,
        "saved_message": state.msd_saved_message,
        "uncertainty_node": None if session.nodes is None or session.nodes.uncertainty is None
        else session.nodes.uncertainty.GetID(),
        "foreground_volumes": sorted({v.get_foreground_volume_id() or "" for v in views}),
        "volumes_rows": len(state.msd_volumes or []),
        "edited_voxels": state.msd_edited_voxels,
        "volumes_ml": dict(app.volumes),
        "groups": group_visibility(app),
        "uncertainty_threshold": uncertainty_threshold(session),
        "brush": brush(app),
        "browser_connections": app.lock.connections,
    }


def group_visibility(app) -> dict[str, bool]:
    """Whether any segment of each hemisphere group is visible, read from the MRML display node."""
    node = app.session.segmentation_node
    if node is None:
        return {}
    return {g.id: mrml.group_visibility(node, g.id, app.tree) for g in app.tree.children(app.tree.root.id)}


def brush(app) -> dict[str, Any] | None:
    """The active paint/erase effect's own brush parameters (what a stroke really uses)."""
    effect = app.editor.active_effect
    if not hasattr(effect, "is_sphere_brush"):
        return None
    return {"sphere": bool(effect.is_sphere_brush()), "mode": effect.get_brush_diameter_mode().name,
            "diameter": float(effect.get_brush_diameter())}


def uncertainty_threshold(session) -> float | None:
    """The lower threshold of the uncertainty overlay as MRML applies it (None without a map)."""
    if session.nodes is None or session.nodes.uncertainty is None:
        return None
    display = session.nodes.uncertainty.GetDisplayNode()
    return float(display.GetLowerThreshold()) if display.GetApplyThreshold() else None


def install(app) -> None:
    """Add ``GET /msdseg-test/state`` (``?labels=1`` adds the label digest) to the server when it binds."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(snapshot(app, with_labels=request.query.get("labels") == "1"))

    def bind(wslink_server) -> None:
        wslink_server.app.router.add_get(ROUTE, handler)

    app.server.controller.on_server_bind.add(bind)
