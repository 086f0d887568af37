"""``msdseg web``: check the bind address, prepare the environment, build the app, serve.

Heavy imports (VTK, Slicer, trame, torch) happen only after the host check, so a refused
``--host`` costs nothing.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from msdseg.core.errors import InputError

from .access import served_origins
from .hosts import check_bind_address

#: Largest WebSocket frame (bytes): uploads arrive in 8 MiB slices (:mod:`.transfer`), and a
#: longer message is sent as several frames.
MAX_FRAME_BYTES = 16 * 2**20


@dataclass
class WebOptions:
    input: str | None = None
    result: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    allow_remote: bool = False
    output: str | None = None
    device: str = "auto"
    model: str | None = None
    open_browser: bool = False
    test_hook: bool = False
    allow_origins: tuple[str, ...] = ()
    max_upload_mb: float | None = None


def configure_environment() -> None:
    """Settings that must be in place before VTK and trame are imported.

    * Headless Linux has no X display: render the Slice and 3D views with EGL (off-screen).
    * Frames large enough for one upload slice.
    """
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ.setdefault("TRAME_WS_MAX_MSG_SIZE", str(MAX_FRAME_BYTES))
    os.environ.setdefault("WSLINK_MAX_MSG_SIZE", str(MAX_FRAME_BYTES))


def run(options: WebOptions) -> int:
    warning = check_bind_address(options.host, options.port, options.allow_remote)
    served_origins(options.host, options.port, options.allow_origins)  # a bad --allow-origin fails before any import
    if options.max_upload_mb is not None and not options.max_upload_mb > 0:
        raise InputError(f"--max-upload-mb must be positive (got {options.max_upload_mb:g})")
    configure_environment()
    # trame parses sys.argv itself (--port, --host, --server, ...); everything it needs is passed
    # explicitly below, so hide msdseg's own arguments from it.
    sys.argv = sys.argv[:1]
    from .app import AppOptions, MsdsegWebApp

    output_dir = Path(options.output or "msdseg_web_results").resolve()
    limits = {} if options.max_upload_mb is None else {"max_upload_mb": options.max_upload_mb}
    app = MsdsegWebApp(AppOptions(output_dir=output_dir, device=options.device, model=options.model,
                                  host=options.host, port=options.port, allow_origins=options.allow_origins,
                                  **limits))
    try:
        if options.input:
            app.open_t1_path(options.input)
        if options.result:
            app.open_result_path(options.result)
        if options.test_hook:
            from .test_hook import install

            install(app)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        print(f"msdseg web: results are saved in {output_dir}", flush=True)
        app.server.start(port=options.port, host=options.host, open_browser=options.open_browser, timeout=0)
    finally:
        app.close()
    return 0
