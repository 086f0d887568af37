"""The page's own JavaScript, served as a trame module (``server.enable_module``).

``upload.js`` sends a file selection to the server in slices (see :mod:`msdseg_web.transfer`).
"""
from pathlib import Path

BASE_URL = "msdseg_web"
serve = {BASE_URL: str(Path(__file__).with_name("serve").resolve())}
scripts = [f"{BASE_URL}/upload.js"]
