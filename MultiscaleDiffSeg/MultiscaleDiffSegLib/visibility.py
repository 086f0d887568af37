"""The eye icons of the hemisphere folders drive their segments, in every scene the module watches.

Slicer has no groups of segments, so each result has three subject-hierarchy folders ("Left
hemisphere", "Right hemisphere", "Midline") whose folder display nodes reference the segmentation
(see :mod:`.mrml`).  Clicking a folder's eye icon changes that display node's visibility; an
observer passes the change on to the group's segments.

Why a scene watcher and not observers made when results are imported: observers are not saved with
a scene, and a saved scene can be loaded (File > Load Scene, drag and drop, a .mrb) before anyone
opens the module.  The module class therefore starts :func:`watch_scene` on Slicer's scene when
the application has started.  From then on every folder display node that enters the scene is
observed (the attributes that make it one of ours may be set only after it was added, so the
check happens when its visibility changes), a finished scene import is scanned again, and closing
the scene removes every folder observer, so nothing refers to nodes of a closed scene.

Qt-free: VTK observers on MRML objects only, so it runs (and is tested) with ``slicer-core``.
"""
from __future__ import annotations

from typing import Any

import vtk

from . import mrml

FOLDER_DISPLAY_CLASS = "vtkMRMLFolderDisplayNode"


class GroupVisibilitySync:
    """The observers of one scene: five scene events plus one per folder display node."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self._scene_tags: list[int] = []
        #: folder display node -> [observer tag, visibility last passed on]
        self._folders: dict[Any, list] = {}

    # ------------------------------------------------------------------ lifetime
    def start(self) -> GroupVisibilitySync:
        """Observe the scene and the folders already in it (idempotent)."""
        if not self._scene_tags:
            scene = self.scene
            for event, handler in ((scene.NodeAddedEvent, self._on_node_added),
                                   (scene.NodeRemovedEvent, self._on_node_removed),
                                   (scene.EndImportEvent, self._on_scene_changed),
                                   (scene.StartCloseEvent, self._on_start_close),
                                   (scene.EndCloseEvent, self._on_scene_changed)):
                self._scene_tags.append(scene.AddObserver(event, handler))
        self.attach()
        return self

    def stop(self) -> None:
        """Remove every observer this object added (folders and scene)."""
        self.detach_folders()
        for tag in self._scene_tags:
            self.scene.RemoveObserver(tag)
        self._scene_tags.clear()

    def attach(self) -> int:
        """Observe every folder display node of the scene; returns how many are hemisphere groups."""
        groups = 0
        for index in range(self.scene.GetNumberOfNodesByClass(FOLDER_DISPLAY_CLASS)):
            node = self.scene.GetNthNodeByClass(index, FOLDER_DISPLAY_CLASS)
            self._observe(node)
            groups += is_group_folder(node)
        return groups

    def detach_folders(self) -> None:
        for node, (tag, _) in list(self._folders.items()):
            node.RemoveObserver(tag)
        self._folders.clear()

    def observed_folders(self) -> list[tuple[Any, int]]:
        """(folder display node, observer tag) pairs, for checks that no observer outlives a scene."""
        return [(node, entry[0]) for node, entry in self._folders.items()]

    def scene_observer_tags(self) -> list[int]:
        return list(self._scene_tags)

    # ------------------------------------------------------------------ folders
    def _observe(self, node) -> None:
        if node not in self._folders:
            tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_folder_modified)
            self._folders[node] = [tag, bool(node.GetVisibility())]

    def _forget(self, node) -> None:
        entry = self._folders.pop(node, None)
        if entry is not None:
            node.RemoveObserver(entry[0])

    def _on_folder_modified(self, node, _event) -> None:
        """Pass on a *change* of the folder's visibility only, so that segments hidden one by one
        are not shown again by an unrelated modification of the folder (a rename, say)."""
        entry = self._folders.get(node)
        visible = bool(node.GetVisibility())
        if entry is None or entry[1] == visible:
            return
        entry[1] = visible
        if not is_group_folder(node):
            return
        segmentation_node = node.GetNodeReference(mrml.SEGMENTATION_REFERENCE_ROLE)
        if segmentation_node is not None:
            mrml.set_group_visibility(segmentation_node, node.GetAttribute(mrml.GROUP_ATTRIBUTE), visible)

    # ------------------------------------------------------------------ scene events
    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_added(self, _scene, _event, node) -> None:
        if node is not None and node.IsA(FOLDER_DISPLAY_CLASS):
            self._observe(node)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_removed(self, _scene, _event, node) -> None:
        if node is not None:
            self._forget(node)

    def _on_start_close(self, _scene, _event) -> None:
        self.detach_folders()

    def _on_scene_changed(self, _scene, _event) -> None:
        self.attach()


def is_group_folder(node) -> bool:
    """A folder display node that stands for one hemisphere group of a result."""
    return (node.GetAttribute(mrml.ROLE_ATTRIBUTE) == mrml.ROLE_GROUP
            and bool(node.GetAttribute(mrml.GROUP_ATTRIBUTE)))


#: The scenes being watched (one watcher per scene).
_WATCHERS: dict[Any, GroupVisibilitySync] = {}


def watch_scene(scene) -> GroupVisibilitySync:
    """Start (or return the running) watcher of ``scene``: the one entry point for the module."""
    watcher = _WATCHERS.get(scene)
    if watcher is None:
        watcher = _WATCHERS[scene] = GroupVisibilitySync(scene)
    return watcher.start()


def unwatch_scene(scene) -> None:
    """Stop watching ``scene`` (module reload, tests); a scene never watched is fine."""
    watcher = _WATCHERS.pop(scene, None)
    if watcher is not None:
        watcher.stop()


def watcher_of(scene) -> GroupVisibilitySync | None:
    return _WATCHERS.get(scene)
