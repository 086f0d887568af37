"""``msdseg web``: check the bind address, prepare the environment, build the app, serve.

Heavy imports (VTK, Slicer, trame, torch) happen only after the host check, so a refused
``--host`` costs nothing.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .hosts import check_bind_address

#: Largest browser message (bytes): an uncompressed 1 mm T1 is ~70 MB and arrives in one piece.
MAX_MESSAGE_BYTES = 1 << 30


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


def configure_environment() -> None:
    """Settings that must be in place before VTK and trame are imported.

    * Headless Linux has no X display: render the Slice and 3D views with EGL (off-screen).
    * Raise trame's message limit so a whole volume can be uploaded.
    """
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ.setdefault("TRAME_WS_MAX_MSG_SIZE", str(MAX_MESSAGE_BYTES))
    os.environ.setdefault("WSLINK_MAX_MSG_SIZE", str(MAX_MESSAGE_BYTES))


def run(options: WebOptions) -> int:
    warning = check_bind_address(options.host, options.port, options.allow_remote)
    configure_environment()
    # trame parses sys.argv itself (--port, --host, --server, ...); everything it needs is passed
    # explicitly below, so hide msdseg's own arguments from it.
    sys.argv = sys.argv[:1]
    from .app import AppOptions, MsdsegWebApp

    output_dir = Path(options.output or "msdseg_web_results").resolve()
    app = MsdsegWebApp(AppOptions(output_dir=output_dir, device=options.device, model=options.model))
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
