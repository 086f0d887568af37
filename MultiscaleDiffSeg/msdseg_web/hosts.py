"""Which addresses ``msdseg web`` may listen on.

Why a policy: the app reads and writes files on the server and runs a model on its CPU/GPU, and
trame has no login.  Anyone who can reach the port can use it, so the default is the loopback
interface and binding anywhere else needs an explicit ``--allow-remote`` (and prints a warning).
"""
from __future__ import annotations

import ipaddress

from msdseg.core.errors import InputError

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

REMOTE_WARNING = (
    "WARNING: msdseg web is listening on {host}: anyone who can reach port {port} can upload images, "
    "run the model and read or overwrite results, without a password. Use it only on a trusted "
    "network, or keep the default --host 127.0.0.1 and use an SSH tunnel (ssh -L {port}:127.0.0.1:{port} HOST)."
)


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, port: int, allow_remote: bool) -> str | None:
    """Return a warning to print for a remote bind, None for loopback; refuse without the flag."""
    if not host.strip():
        raise InputError("--host must not be empty")
    if is_loopback(host):
        return None
    if not allow_remote:
        raise InputError(
            f"refusing to listen on {host}: the web app has no login, so it only listens on this machine "
            f"by default; add --allow-remote to make it reachable from other computers"
        )
    return REMOTE_WARNING.format(host=host, port=port)
