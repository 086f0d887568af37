"""Small trame widgets: a labelled upload field and a download button.

An upload goes through ``window.msdsegUpload`` (:mod:`msdseg_web.module`): the page announces the
files, sends them in slices and says when it is done; :class:`~msdseg_web.transfer.UploadReceiver`
writes the slices of each connection to its own folder, off the event loop, and the handler gets
the finished files.  A download asks the server for bytes and lets the browser save them.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Awaitable, Callable

from trame.widgets import html
from trame.widgets.vuetify3 import VBtn, VFileInput, VProgressLinear

from msdseg.core.errors import InputError

from .transfer import UploadReceiver, in_thread
from .uploads import file_content

FilesHandler = Callable[[list[Path]], Awaitable[None]]
BytesProvider = Callable[[str], bytes | None]
#: Bytes per upload message: small enough that the server holds little, large enough to be quick.
SLICE_BYTES = 8 * 2**20


class UploadField(html.Div):
    """A file field whose upload ends in ``await handler(paths)`` (the files are deleted after it).

    ``client_id()`` names the connection that called (uploads are kept apart by it) and
    ``report(exc)`` shows a refusal in the page.
    """

    def __init__(self, label: str, busy_key: str, handler: FilesHandler, receiver: UploadReceiver,
                 client_id: Callable[[], str], report: Callable[[Exception], None], accept: str = "",
                 **kwargs: Any):
        super().__init__(**kwargs)
        self._handler = handler
        self._receiver = receiver
        self._client_id = client_id
        self._report = report
        self.state.setdefault(busy_key, False)
        self.state.client_only(busy_key)  # a browser that closes mid-upload must not leave the field busy
        chunk = self.server.trigger_name(self._on_message)
        with self:
            VFileInput(
                v_if=(f"!{busy_key}",),
                label=label,
                multiple=True,  # a detached header comes with its data file
                accept=accept or None,
                density="compact",
                variant="outlined",
                hide_details=True,
                prepend_icon="",
                prepend_inner_icon="mdi-paperclip",
                change=(
                    f"{busy_key} = true;"
                    f"window.msdsegUpload($event.target.files, '{chunk}', {SLICE_BYTES})"
                    f".finally(() => {{ {busy_key} = false; }});"
                ),
            )
            VProgressLinear(v_else=True, indeterminate=True, height=6, classes="my-4")

    async def _on_message(self, kind: str, upload_id: str, *args: Any) -> bool:
        """``begin`` (names, sizes), ``data`` (file number, offset, slice), ``end``; False stops the page."""
        client = self._client_id()  # read before the first await: it names the calling connection
        try:
            if kind == "begin":
                self._receiver.begin(client, str(upload_id), list(args[0]))
            elif kind == "data":
                index, offset, part = args
                content = file_content(part) if isinstance(part, dict) else bytes(part)
                await in_thread(self._receiver.add, client, str(upload_id), int(index), int(offset), content)
            elif kind == "end":
                folder, paths = self._receiver.finish(client, str(upload_id))
                try:
                    await self._handler(paths)
                finally:
                    await in_thread(shutil.rmtree, folder, True)
            else:
                raise InputError(f"upload refused: unknown message '{kind}'")
        except Exception as exc:  # noqa: BLE001 - the page shows one line, the upload stops
            self._receiver.discard(client, str(upload_id))
            self._report(exc)
            return False
        return True


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


class SavedFileLinks(html.Div):
    """One download link per name in the state list ``names_key``; the server reads ``provider(name)``."""

    def __init__(self, names_key: str, provider: BytesProvider, **kwargs: Any):
        super().__init__(**kwargs)
        self._provider = provider
        trigger = self.server.trigger_name(self._on_download)
        with self:
            VBtn("{{ name }}", v_for=f"name in {names_key}", key="name", prepend_icon="mdi-download",
                 variant="text", size="x-small", classes="msd-saved-file text-none",
                 click=f"utils.download(name, trigger('{trigger}', [name]), 'application/octet-stream')")

    def _on_download(self, name: str) -> Any:
        data = self._provider(name)
        if data is None:
            return None
        return self.server.protocol.addAttachment(data)
