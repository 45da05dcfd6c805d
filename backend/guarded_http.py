"""A requests session whose connections obey a wall-clock deadline and the image-host allow-list.

Why a deadline needs more than requests' ``timeout``: that timeout bounds each socket read, not the
transfer. A host that sends its status line and headers one byte a second never lets a read time out, and
an image download promised to end after IMAGE_TIMEOUT_S took 40 s. Here every request runs inside a
``Hop``; a single watchdog thread shuts the hop's socket down when its deadline passes, which ends whatever
read (headers, TLS handshake, body) is blocked on it, and the caller turns that into the timeout error.

Why the address check sits in the connection: the allow-list (``backend.urls.HostPolicy``) must judge the
addresses the client really connects to. A check on a name before the request would resolve it once and
let the client resolve it again (DNS rebinding); here the name is resolved once, every address is checked,
and the socket is opened to a checked address — or to none, without a packet sent to a refused host.
Why proxies are off unless enabled: through an HTTP(S) proxy the connection goes to the proxy's address,
which is all this check could see, and the proxy connects on to any host it can reach (the internal network,
cloud metadata). So the environment's HTTP_PROXY / HTTPS_PROXY / ALL_PROXY are ignored (``ProxySession``)
unless SAM_IMAGE_PROXY enables them; then the target's name is resolved and every address judged before
the request is handed to the proxy (``lookup``, ``backend.http_download``). The proxy resolves the name once
more, so that check cannot stop a name whose answer changes in between (DNS rebinding): the admin who
enables a proxy trusts its own egress rules for that.

Why names are resolved here, in a small pool of threads: ``getaddrinfo`` has no timeout, and a DNS server
that does not answer would hold a request past any deadline. The lookup is waited for until the hop's
deadline at most; a lookup that outlives it finishes in its thread and is dropped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import ipaddress
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.util.connection

from backend.urls import HostPolicy

_current = threading.local()
# Name lookups in flight at once; more wait for a free thread (within their own deadline).
RESOLVER_THREADS = 8
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="resolve")


def lookup(host: str, port: int, deadline: float) -> list[str]:
    """The addresses of ``host``, looked up by the resolver threads until ``deadline`` at most.

    An IP literal is its own address. ``TimeoutError`` when the lookup outlives the deadline (it finishes in
    its thread and is dropped), ``socket.gaierror`` when the name does not resolve.
    """
    try:
        ipaddress.ip_address(host.split("%")[0])
        return [host]
    except ValueError:
        pass
    found = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = found.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        found.cancel()
        raise TimeoutError(f"looking up {host} took longer than the download limit") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class ProxySession(requests.Session):
    """A session that uses the environment's proxies only when ``use_proxies`` (SAM_IMAGE_PROXY) says so.

    ``trust_env`` stays on for the rest of what the environment says (``REQUESTS_CA_BUNDLE``); only the
    proxies that requests would take from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY are dropped.
    """

    def __init__(self, use_proxies: bool) -> None:
        super().__init__()
        self.use_proxies = use_proxies

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if not self.use_proxies:
            settings["proxies"] = {}
        return settings

    def proxy_for(self, url: str) -> str | None:
        """The proxy a request to ``url`` goes through (the environment's, NO_PROXY applied), None: direct."""
        if not self.use_proxies:
            return None
        proxies = requests.utils.get_environ_proxies(url)
        return requests.utils.select_proxy(url, proxies) or None


class HostRefused(OSError):
    """A connection the allow-list forbids: raised before any packet goes to the host."""

    def __init__(self, host: str, port: int, addresses: list[str]) -> None:
        super().__init__(f"{host}:{port} resolves to {', '.join(addresses) or 'nothing'}, not allowed")
        self.host, self.port, self.addresses = host, port, addresses


class Hop:
    """One request under a deadline, and (``policy``) the allow-list its connection's addresses must pass."""

    def __init__(self, deadline: float, policy: HostPolicy | None) -> None:
        self.deadline = deadline
        self.policy = policy
        self.fired = False
        self.refused: HostRefused | None = None
        self._done = False
        self._conn: Any = None
        self._lock = threading.Lock()

    def attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn
            conn.sam_hop = self

    def fire(self) -> None:
        """The deadline passed: shut the socket down, which wakes a read blocked on it in the request thread."""
        with self._lock:
            if self._done:
                return
            self.fired = True
            conn = self._conn
            sock = getattr(conn, "sock", None) if conn is not None and getattr(conn, "sam_hop", None) is self else None
        if sock is not None:
            # The plain socket's shutdown, also under TLS: it must not touch the SSL object another thread reads.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self._done = True


class _Watchdog:
    """One thread per session that fires the hops whose deadline passed, earliest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hop]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, hop: Hop) -> None:
        with self._cond:
            heapq.heappush(self._heap, (hop.deadline, next(self._order), hop))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="download-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, hop = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            hop.fire()


def current_hop() -> Hop | None:
    return getattr(_current, "hop", None)


class _GuardedConnectionMixin:
    """What both connection classes add: the hop's deadline, and the allow-list on the addresses."""

    sam_hop: Hop | None = None
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any
    _tunnel_host: str | None

    def connect(self) -> None:
        hop = current_hop()
        if hop is not None:
            hop.attach(self)
        super().connect()  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        hop = current_hop()
        if hop is not None:
            hop.attach(self)
        super().request(*args, **kwargs)  # type: ignore[misc]

    def _new_conn(self) -> socket.socket:
        hop = current_hop()
        if hop is None or getattr(self, "proxy", None) is not None or self._tunnel_host:
            return super()._new_conn()  # type: ignore[misc]
        policy = hop.policy
        host = self.host.strip("[]")
        addresses = self._resolve(host, hop.deadline)
        allowed = [a for a in addresses
                   if policy is None or policy.admits(ipaddress.ip_address(a.split("%")[0]), self.port)]
        if not addresses or len(allowed) != len(addresses):
            # Every address must pass: a name that also points inside the network is refused as a whole.
            refused = HostRefused(host, self.port, addresses)
            if hop is not None:
                hop.refused = refused
            raise urllib3.exceptions.NewConnectionError(self, str(refused))  # type: ignore[arg-type]
        last: OSError | None = None
        for address in allowed:
            try:
                return urllib3.util.connection.create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options)
            except TimeoutError as error:
                raise urllib3.exceptions.ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})") from error
            except OSError as error:
                last = error
        raise urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {last}")  # type: ignore[arg-type]

    def _resolve(self, host: str, deadline: float) -> list[str]:
        """The addresses of ``host`` (``lookup``), its failures as urllib3's connection errors."""
        try:
            return lookup(host, self.port, deadline)
        except TimeoutError as error:
            raise urllib3.exceptions.ConnectTimeoutError(self, f"Looking up {host} took longer than the download "
                                                               "limit") from error
        except socket.gaierror as error:
            raise urllib3.exceptions.NameResolutionError(self.host, self, error) from error  # type: ignore[arg-type]


class _HTTPConnection(_GuardedConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_GuardedConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


class GuardedSession:
    """A pooled ``requests.Session`` and the watchdog of its hops."""

    def __init__(self, session: ProxySession) -> None:
        adapter = _GuardedAdapter(pool_connections=16, pool_maxsize=32, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.session = session
        self._watchdog = _Watchdog()

    @contextmanager
    def hop(self, deadline: float, policy: HostPolicy | None = None) -> Iterator[Hop]:
        """Requests made in this thread inside the block obey ``deadline`` (and ``policy``, when given)."""
        hop = Hop(deadline, policy)
        previous = current_hop()
        _current.hop = hop
        self._watchdog.watch(hop)
        try:
            yield hop
        finally:
            hop.finish()
            _current.hop = previous
