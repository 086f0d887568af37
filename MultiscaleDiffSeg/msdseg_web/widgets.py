"""Small trame widgets: a labelled upload field and a download button.

The upload reuses trame-slicer's ``window.load_files_by_chunks`` (served by its trame module) so
large volumes arrive in several messages; the server side collects the chunks and hands the whole
file list to one handler.  A download asks the server for bytes and lets the browser save them.
"""
from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from trame.widgets import html
from trame.widgets.vuetify3 import VBtn, VFileInput, VProgressLinear

FilesHandler = Callable[[list[dict[str, Any]]], Awaitable[None] | None]
BytesProvider = Callable[[str], bytes | None]


class UploadField(html.Div):
    """A file field that uploads the chosen file(s) in chunks and calls ``handler(files)`` once."""

    def __init__(self, label: str, busy_key: str, handler: FilesHandler, accept: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self._handler = handler
        self._files: list[dict[str, Any]] = []
        self.state.setdefault(busy_key, False)
        chunk = self.server.trigger_name(self._on_chunk)
        with self:
            VFileInput(
                v_if=(f"!{busy_key}",),
                label=label,
                accept=accept or None,
                density="compact",
                variant="outlined",
                hide_details=True,
                prepend_icon="",
                prepend_inner_icon="mdi-paperclip",
                change=(
                    f"{busy_key} = true;"
                    f"window.load_files_by_chunks($event.target.files, {{ trigger_name: '{chunk}' }})"
                    f".finally(() => {{ {busy_key} = false; }});"
                ),
            )
            VProgressLinear(v_else=True, indeterminate=True, height=6, classes="my-4")

    async def _on_chunk(self, files: list[dict[str, Any]]) -> None:
        """Chunks arrive as lists of files; an empty list marks the end of the upload."""
        if files:
            self._files.extend(files)
            return
        received, self._files = self._files, []
        if received:
            outcome = self._handler(received)
            if inspect.isawaitable(outcome):
                await outcome


class DownloadButton(VBtn):
    """A button that downloads ``provider(kind)`` as a file named by the JS expression ``file_name``."""

    def __init__(self, text: str, kind: str, file_name: str, provider: BytesProvider, **kwargs: Any):
        self._provider = provider
        super().__init__(text=text, prepend_icon="mdi-download", variant="tonal", size="small", **kwargs)
        trigger = self.server.trigger_name(self._on_download)
        self.click = f"utils.download({file_name}, trigger('{trigger}', ['{kind}']), 'application/octet-stream')"

    def _on_download(self, kind: str) -> Any:
        data = self._provider(kind)
        if data is None:
            return None
        return self.server.protocol.addAttachment(data)
