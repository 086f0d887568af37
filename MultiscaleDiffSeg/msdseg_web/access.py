"""Who may open the page and its WebSocket: the Origin allow-list and the one-browser lock.

Why an Origin check: a browser lets any web page open a WebSocket to ``127.0.0.1``; without a
check, a page on another site could drive the app (upload, run, save) through the user's own
browser.  Browsers always send the page's origin with the WebSocket handshake, so the server
accepts it only from the origins it serves itself (``http://127.0.0.1:PORT`` and friends) or from
origins the user lists with ``--allow-origin``.  The host name is compared with a fixed list, not
with the request's ``Host`` header, so a DNS-rebinding name that points at 127.0.0.1 is refused.

Why a lock: trame keeps one state and the app one MRML scene per server, so two browsers would
see and change each other's case.  The app therefore serves one browser at a time.  The first
browser that loads the page gets a random token in a cookie; the WebSocket is accepted only with
that token while the browser stays connected, and every other browser gets a short page saying
that the app is in use.  A reload or a second tab of the same browser carries the same cookie and
shares the case, as one user would expect.  When the owner's last connection closes, the next
browser may take the app.
"""
from __future__ import annotations

import html
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from msdseg.core.errors import InputError

from .hosts import LOOPBACK_NAMES, is_loopback

#: How long a browser that loaded the page keeps the app before its WebSocket connects.
CLAIM_SECONDS = 30.0
#: The page that starts the app in a browser (``/`` only redirects to it).
PAGE_PATH = "/index.html"
IN_USE_STATUS = 423  # "Locked"


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, default ports dropped; InputError if not an origin."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise InputError(f"--allow-origin {origin!r}: expected an origin such as http://workstation:8080")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"--allow-origin {origin!r}: the port is not a number") from None
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def served_origins(host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """The origins of the pages this server itself serves, plus ``extra`` (``--allow-origin``).

    A loopback bind is reached as ``127.0.0.1``, ``localhost`` or ``[::1]``; a remote bind by the
    address given, or for a wildcard address by this machine's names.  Other names (a DNS alias, a
    tunnel on another port) must be listed with ``--allow-origin``.
    """
    name = host.strip().strip("[]").lower()
    if is_loopback(name):
        names = {"127.0.0.1", "[::1]", *LOOPBACK_NAMES}
    elif name in ("0.0.0.0", "::", ""):
        names = {"127.0.0.1", "[::1]", *LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names = {f"[{name}]" if _is_ipv6(name) else name}
    origins = {normalise_origin(f"http://{n}:{port}") for n in names}
    origins |= {normalise_origin(o) for o in extra}
    return frozenset(origins)


def _is_ipv6(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).version == 6
    except ValueError:
        return False


@dataclass
class OriginPolicy:
    """Accept a WebSocket handshake only from the listed origins (a missing Origin is refused too)."""

    origins: frozenset[str]

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        try:
            return normalise_origin(origin) in self.origins
        except InputError:
            return False


@dataclass
class BrowserLock:
    """One browser at a time, identified by a random token kept in a cookie.

    ``page(token)`` decides whether a page load may start the app (and returns the token the
    browser is to keep); ``connect``/``disconnect`` follow the owner's WebSocket connections.
    """

    claim_seconds: float = CLAIM_SECONDS
    clock: Callable[[], float] = time.monotonic
    owner: str | None = None
    connections: int = 0
    _claimed_at: float = field(default=float("-inf"), repr=False)
    _issued: set[str] = field(default_factory=set, repr=False)

    def busy_for(self, token: str | None) -> bool:
        """True when another browser holds the app: connected, or loaded the page moments ago."""
        if self.owner is None or token == self.owner:
            return False
        return self.connections > 0 or self.clock() - self._claimed_at < self.claim_seconds

    def page(self, token: str | None) -> str | None:
        """The token of a browser allowed to load the app (a new one if needed), None if in use."""
        if self.busy_for(token):
            return None
        if token not in self._issued:
            token = secrets.token_urlsafe(24)
            self._issued.add(token)
        self.owner = token
        self._claimed_at = self.clock()
        return token

    def connect(self, token: str | None) -> bool:
        """Whether a WebSocket carrying ``token`` may open; counts it when it may."""
        if token is None or token not in self._issued or self.busy_for(token):
            return False
        self.owner = token
        self.connections += 1
        return True

    def disconnect(self) -> bool:
        """One of the owner's connections closed; True when it was the last (the app is free)."""
        self.connections = max(0, self.connections - 1)
        if self.connections == 0:
            self._claimed_at = float("-inf")
            return True
        return False


def in_use_page() -> str:
    """What a second browser sees; it reloads itself so it opens the app once the first one leaves."""
    message = ("MultiscaleDiffSeg is open in another browser. This app serves one user at a time, "
               "because every browser would share one scene. Close it there; this page retries every 15 s.")
    return ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='15'>"
            "<title>MultiscaleDiffSeg: in use</title></head>"
            "<body style='font-family: sans-serif; margin: 3em;'>"
            f"<h1>MultiscaleDiffSeg is in use</h1><p class='msd-in-use'>{html.escape(message)}</p></body></html>")


def cookie_name(port: int) -> str:
    """Cookies ignore ports: a name per port keeps two servers on one machine apart."""
    return f"msdseg_web_{int(port)}"


def middleware(policy: OriginPolicy, lock: BrowserLock, ws_paths: Iterable[str], cookie: str,
               on_free: Callable[[], None] | None = None) -> Callable[..., Awaitable]:
    """An aiohttp middleware that applies the Origin policy and the lock to the page and WebSocket."""
    from aiohttp import web

    ws_paths = frozenset(ws_paths)

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path in ws_paths:
            if not policy.allows(request.headers.get("Origin")):
                return web.Response(status=403, text="WebSocket refused: this origin may not use msdseg web\n")
            if not lock.connect(request.cookies.get(cookie)):
                return web.Response(status=IN_USE_STATUS, text="msdseg web is in use by another browser\n")
            try:
                return await handler(request)
            finally:
                if lock.disconnect() and on_free is not None:
                    on_free()
        if request.path == "/" and lock.busy_for(request.cookies.get(cookie)):
            return web.Response(status=IN_USE_STATUS, text=in_use_page(), content_type="text/html")
        if request.path == PAGE_PATH:
            token = lock.page(request.cookies.get(cookie))
            if token is None:
                return web.Response(status=IN_USE_STATUS, text=in_use_page(), content_type="text/html")
            response = await handler(request)
            response.set_cookie(cookie, token, httponly=True, samesite="Strict", path="/")
            return response
        return await handler(request)

    return guard
