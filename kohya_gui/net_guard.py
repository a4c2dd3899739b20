"""What the web server accepts: the Host it is reached under, the Origin of state-changing requests, the pace of
failed logins. An ASGI middleware on Gradio's FastAPI app (passed through `launch(app_kwargs={"middleware": ...})`).

Jupyter's rules are the model:
- Host: on a loopback address only localhost names and loopback IPs (and the configured address) are accepted, so a
  DNS-rebinding page (`evil.example` resolving to 127.0.0.1) cannot talk to a login-free local GUI. On a specific
  address, that address; on all interfaces (0.0.0.0 / ::), IP literals, this machine's names, localhost names. A
  share link adds its `*.gradio.live` name; `--allowed_hosts` adds names a reverse proxy uses.
- Origin: a POST/PUT/PATCH/DELETE or WebSocket that carries an Origin must come from the page's own origin (Origin's
  host:port equals Host) or from an allowed host; `Origin: null` is refused. Requests without Origin (curl, the
  Python client) pass: they carry no browser cookies of the user.
- Login: failed logins are counted per client address and in total; past the limit `/login` answers 429 for a while.
Refusals are a one-line plain-text 403/429 naming the header and the fix.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SHARE_SUFFIX = ".gradio.live"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _ip(name: str) -> ipaddress._BaseAddress | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def split_host(host_header: str) -> str:
    """'Example.org:7860' -> 'example.org'; '[::1]:7860' -> '::1'. '' when the header is malformed."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    elif host.count(":") > 1:  # a bare IPv6 address is not a valid Host header
        return ""
    return host.rstrip(".")


@dataclass
class HostPolicy:
    """Which Host names the server answers to, from the address it binds and the extra names allowed."""

    bind: str
    extra: frozenset[str] = frozenset()
    share: bool = False
    machine_names: frozenset[str] = field(default_factory=lambda: frozenset(
        n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n))

    def allows(self, hostname: str) -> bool:
        if not hostname:
            return False
        if hostname in self.extra:
            return True
        if self.share and hostname.endswith(SHARE_SUFFIX):
            return True
        bind = self.bind.strip().lower().strip("[]")
        ip = _ip(hostname)
        if bind in WILDCARDS or bind == "::":
            return ip is not None or hostname in LOOPBACK_NAMES or hostname in self.machine_names
        if hostname == bind:
            return True
        bind_ip = _ip(bind)
        if bind in LOOPBACK_NAMES or (bind_ip is not None and bind_ip.is_loopback):
            return hostname in LOOPBACK_NAMES or (ip is not None and ip.is_loopback)
        return ip is not None and bind_ip is not None and ip == bind_ip

    def describe(self) -> str:
        bind = self.bind or "all interfaces"
        return f"the address the GUI listens on ({bind}) or localhost"


class LoginLimiter:
    """Counts failed logins per client and in total over a sliding window."""

    def __init__(self, per_client: int = 5, total: int = 30, window_s: float = 60.0):
        self.per_client, self.total, self.window_s = per_client, total, window_s
        self._by_client: dict[str, deque[float]] = {}
        self._all: deque[float] = deque()
        self._lock = threading.Lock()

    def _trim(self, times: deque[float], now: float) -> None:
        while times and now - times[0] > self.window_s:
            times.popleft()

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            mine = self._by_client.get(client, deque())
            self._trim(mine, now)
            self._trim(self._all, now)
            waits = []
            if len(mine) >= self.per_client:
                waits.append(self.window_s - (now - mine[0]))
            if len(self._all) >= self.total:
                waits.append(self.window_s - (now - self._all[0]))
            return int(max(waits) + 1) if waits else 0

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._by_client.setdefault(client, deque()).append(now)
            self._all.append(now)
            if len(self._by_client) > 10000:  # bounded memory under a spray of addresses
                self._by_client.clear()

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._by_client.pop(client, None)


async def _refuse(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = (message + "\n").encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware applying HostPolicy, the same-origin rule and the login limiter."""

    def __init__(self, app: Callable, policy: HostPolicy, limiter: LoginLimiter | None = None):
        self.app, self.policy = app, policy
        self.limiter = limiter or LoginLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        problem = self.problem(scope, headers)
        if problem:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return None
            return await _refuse(send, 403, f"kohya_gui: request refused: {problem}")
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").rstrip("/") \
                .endswith("/login"):
            return await self._login(scope, receive, send)
        return await self.app(scope, receive, send)

    def problem(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """Why this request is refused, or None."""
        host_header = headers.get("host", "")
        hostname = split_host(host_header)
        if not self.policy.allows(hostname):
            return (f"Host {host_header!r} is not {self.policy.describe()}; open the GUI by that address, or start "
                    f"it with --allowed_hosts {hostname or 'NAME'} if a proxy or DNS name must reach it")
        changing = scope["type"] == "websocket" or scope.get("method", "GET").upper() in STATE_CHANGING
        origin = headers.get("origin")
        if changing and origin is not None:
            if origin.strip().lower() == "null":
                return "Origin 'null' (a sandboxed or local file page) may not change anything here"
            parts = urlsplit(origin.strip())
            same = parts.netloc.lower() == host_header.strip().lower()
            if not same and (parts.hostname or "") not in self.policy.extra:
                return (f"Origin {origin!r} is another site than this GUI ({host_header}); pages of other sites may "
                        f"not act on it")
        return None

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.limiter.retry_after(client)
        if wait:
            return await _refuse(send, 429, f"kohya_gui: too many failed logins; try again in {wait} s",
                                 [(b"retry-after", str(wait).encode())])
        status_seen: list[int] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        await self.app(scope, receive, watch)
        if status_seen and status_seen[0] == 200:
            self.limiter.succeeded(client)
        elif status_seen and 400 <= status_seen[0] < 500:
            self.limiter.failed(client)


def middleware(bind: str, extra_hosts: list[str] | None = None, share: bool = False) -> list:
    """The `app_kwargs["middleware"]` list for gradio's launch."""
    from starlette.middleware import Middleware

    policy = HostPolicy(bind=bind, extra=frozenset(h.strip().lower() for h in extra_hosts or [] if h.strip()),
                        share=share)
    return [Middleware(RequestGuard, policy=policy)]
