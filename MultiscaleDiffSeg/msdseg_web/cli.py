"""``msdseg web [T1]``: the browser app's command-line options (light: trame loads only on run)."""
from __future__ import annotations

import argparse

HELP = "browser app: segment, review, edit and save (needs the 'web' extra)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", default=None, help="T1 volume to open (or upload one in the page)")
    p.add_argument("--result", default=None, help="a saved .seg.nrrd or labels image of INPUT to open with it")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than localhost (no login: anyone who reaches the port can use it)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="also accept the page from this origin, e.g. http://workstation:8080 (repeatable; "
                        "by default only the address and port the app listens on)")
    p.add_argument("--max-upload-mb", type=float, default=None, metavar="MB",
                   help="largest total upload per browser in MB (default: 1024)")
    p.add_argument("-o", "--output", default=None, help="folder for saved results (default: ./msdseg_web_results)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--model", default=None, help="model .safetensors (default: the shipped model)")
    p.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    p.add_argument("--test-hook", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from msdseg.core.errors import InputError

    try:
        from msdseg_web.server import WebOptions, run as serve
    except ImportError as exc:  # depends on the installed extras
        raise InputError(f"the web app needs the 'web' extra: pip install 'msdseg[web]' ({exc})") from None
    try:
        return serve(WebOptions(
            input=args.input, result=args.result, host=args.host, port=args.port, allow_remote=args.allow_remote,
            output=args.output, device=args.device, model=args.model, open_browser=args.open_browser,
            test_hook=args.test_hook, allow_origins=tuple(args.allow_origin), max_upload_mb=args.max_upload_mb,
        ))
    except ImportError as exc:
        raise InputError(f"the web app needs the 'web' extra: pip install 'msdseg[web]' ({exc})") from None
