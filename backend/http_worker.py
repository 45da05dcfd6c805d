"""The gunicorn worker: whole requests are read in the event loop, then a thread runs the Flask app on them.

gunicorn's ``gthread`` worker hands a connection to a request thread as soon as it is accepted (or has a
first byte), and the thread then blocks reading the request. Four connections that send half a request and
stop hold four threads (THREADS=4) until a read times out, so ``/health`` goes unanswered and Label Studio,
which gives it 1 s, marks the backend disconnected; fifty idle connections do the same in turns. This
worker keeps gthread's process model (the arbiter, ``pre_fork`` / ``post_worker_init``, the thread pool of
THREADS, the worker timeout) and changes where requests are read:

- Every connection is read in the worker's selector loop, without a thread, into a ``RequestFramer``
  (``backend/http_framing.py``) until the request is whole. Only then does a request thread take it, parsing
  it from memory: a thread never waits on a client.
- The whole request (head and body) must arrive within REQUEST_READ_TIMEOUT_S of the connection's start (or
  of its first byte after a kept-alive response). Connections past it are closed, a 408 JSON to those that
  sent part of a request; one log line per sweep says how many and from where.
- At most MAX_CONNECTIONS connections per worker; a new one closes the oldest that has no request being
  served yet. The bytes held for incomplete requests are bounded too (BUFFER_REQUESTS of MAX_REQUEST_MB):
  past that a request gets 503 JSON.
- A body over MAX_REQUEST_MB is refused with 413 JSON as soon as its head says so (or a chunked body crosses
  it), never read into memory; malformed heads and chunked bodies get a short JSON 4xx.
- ``GET /health`` and ``GET /`` run on a thread of their own, so Label Studio's liveness check is answered
  even while every request thread computes.

The loop sends the small JSON answers with non-blocking writes and then drains what the client still sends
for a moment (``DRAIN_S``), so a client that writes its whole body before reading still sees the answer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import selectors
import socket
import time
from collections import Counter
from concurrent import futures
from functools import partial
from http import HTTPStatus
from typing import Any

from gunicorn import http
from gunicorn.workers.gthread import TConn, ThreadWorker

from backend.config import Settings
from backend.http_framing import Complete, Limits, NeedMore, Refused, RequestFramer

log = logging.getLogger("backend.http")

#: Requests of MAX_REQUEST_MB a worker may hold in memory at once, read or waiting for a thread.
BUFFER_REQUESTS = 4
#: After a refusal, how long the rest of what the client sends is read and dropped before the socket closes.
DRAIN_S = 2.0
#: Paths answered on their own thread: Label Studio's liveness check must not queue behind predictions.
LIGHT_PATHS = frozenset({"/health", "/"})
_RECV = 256 * 1024


class Connection(TConn):
    """A client connection and where its next request stands."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any, framer_limits: Limits) -> None:
        super().__init__(cfg, sock, client, server)
        self.framer = RequestFramer(cfg, framer_limits, client)
        self.deadline = 0.0
        self.kept_alive = False  # waiting for a next request after a response: closing it then is routine
        self.held = 0  # bytes of a request handed to a thread, counted until it is answered
        self.draining_until = 0.0


def _receive(conn: Connection) -> bytes | None:
    """What the non-blocking socket has: None when nothing yet, b"" when the client is gone (or reset)."""
    try:
        return conn.sock.recv(_RECV)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _peer(conn: Connection) -> str:
    client = conn.client
    return str(client[0]) if isinstance(client, tuple) and client else str(client or "unix")


def json_response(status: int, message: str, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 answer with the app's error body (``{"error", "message", "status"}``); closes."""
    phrase = HTTPStatus(status).phrase
    name = "".join(ch for ch in phrase if ch.isalnum())
    body = json.dumps({"error": name, "message": message, "status": status}).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra_headers}\r\n").encode("latin-1") + body


class BufferingWorker(ThreadWorker):
    """gthread, with requests read whole in the event loop (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings.from_env()
        self.limits = Limits(max_body_bytes=settings.max_request_bytes)
        self.read_timeout_s = settings.request_read_timeout_s
        self.max_connections = settings.max_connections
        self.buffer_budget = BUFFER_REQUESTS * settings.max_request_bytes
        self.buffered = 0
        self.reading: dict[Connection, None] = {}  # insertion order = the order their wait began
        self.draining: dict[Connection, None] = {}
        self.evicted: Counter[str] = Counter()
        self.light_pool: futures.ThreadPoolExecutor | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        # The loop frames HTTP/1.1 bytes only; TLS and HTTP/2 would hand a thread a socket to read from again.
        if cfg.is_ssl:
            raise RuntimeError("backend.http_worker serves plain HTTP: terminate TLS at a proxy in front of it")
        if cfg.http2_cleartext != "off" or list(cfg.http_protocols) != ["h1"]:
            raise RuntimeError("backend.http_worker serves HTTP/1.1 only: leave http2_cleartext and http_protocols")

    def init_process(self) -> None:
        self.light_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
        super().init_process()

    # -- accepting and reading
    def accept(self, listener: socket.socket) -> None:
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        if len(self.reading) >= self.max_connections:
            oldest = next(iter(self.reading))
            self.evicted[_peer(oldest)] += 1
            self._forget(oldest)
            if oldest.framer.started:
                self._refuse(oldest, json_response(503, "too many connections (MAX_CONNECTIONS); retry shortly",
                                                   "Retry-After: 5\r\n"))
            else:
                self._close(oldest)
        conn = Connection(self.cfg, sock, client, listener.getsockname(), self.limits)
        self._start_reading(conn, kept_alive=False)

    def _start_reading(self, conn: Connection, kept_alive: bool) -> None:
        conn.sock.setblocking(False)
        conn.kept_alive = kept_alive
        conn.deadline = time.monotonic() + (self.cfg.keepalive if kept_alive else self.read_timeout_s)
        self.reading[conn] = None
        self.buffered += conn.framer.buffered  # leftover of a pipelined request; _forget takes it off again
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: Connection, _sock: Any) -> None:
        data = _receive(conn)
        if data is None:
            return
        if not data:  # the client went away before its request was whole
            self._forget(conn)
            self._close(conn)
            return
        if conn.kept_alive:  # a next request began: from now on it has the whole read deadline
            conn.kept_alive = False
            conn.deadline = time.monotonic() + self.read_timeout_s
        self._feed(conn, data)

    def _feed(self, conn: Connection, data: bytes) -> None:
        before = conn.framer.buffered
        outcome = conn.framer.feed(data)
        self.buffered += conn.framer.buffered - before
        if isinstance(outcome, NeedMore):
            if self.buffered > self.buffer_budget:
                outcome = Refused(503, "the server holds too many incomplete requests; retry shortly")
            elif outcome.send_continue:
                self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            else:
                return
        if isinstance(outcome, Refused):
            log.warning("%s -> %d: %s", _peer(conn), outcome.status, outcome.message)
            headers = "Retry-After: 5\r\n" if outcome.status == 503 else ""
            self._forget(conn)
            self._refuse(conn, json_response(outcome.status, outcome.message, headers))
            return
        self._dispatch(conn, outcome)

    def _dispatch(self, conn: Connection, request: Complete) -> None:
        """A whole request: off the poller, to a request thread (or the health thread), parsed from memory."""
        held = conn.framer.buffered  # the request and anything pipelined behind it, counted until it is answered
        self._forget(conn)
        conn.held = held
        self.buffered += held
        conn.framer.reset(request.leftover)
        conn.parser = http.get_parser(self.cfg, iter([request.data]), conn.client)
        conn.initialized = conn.data_ready = True
        light = request.method in ("GET", "HEAD") and request.path in LIGHT_PATHS
        pool = self.light_pool if light and self.light_pool is not None else self.tpool
        future = pool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self.finish_request, conn, done))

    def _forget(self, conn: Connection) -> None:
        """Off the reading set and the poller; its buffered bytes leave the budget."""
        if self.reading.pop(conn, False) is None:
            self.buffered -= conn.framer.buffered
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)

    # -- answering in the loop
    def _send(self, conn: Connection, data: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(data)  # a few hundred bytes into an empty socket buffer: not partial in practice

    def _refuse(self, conn: Connection, response: bytes) -> None:
        """Answer, stop writing, and read what the client still sends for DRAIN_S so that it sees the answer."""
        self._send(conn, response)
        self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        """Close after an answer without a reset (RFC 9112 9.6): half-close, drop what still comes for DRAIN_S.

        gunicorn's own graceful close waits for that in the calling thread; here the loop's poller does.
        """
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.draining_until = time.monotonic() + DRAIN_S
        self.draining[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_drain, conn))

    def _on_drain(self, conn: Connection, _sock: Any) -> None:
        if _receive(conn) == b"":
            self._stop_draining(conn)

    def _stop_draining(self, conn: Connection) -> None:
        self.draining.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        self.nr_conns -= 1
        conn.close()

    # -- deadlines: gthread's loop calls these about once a second
    def murder_pending(self) -> None:
        now = time.monotonic()
        partial_from: Counter[str] = Counter()
        idle_from: Counter[str] = Counter()
        stopping = not self.alive  # a stopping worker keeps only requests already under way
        for conn in [c for c in self.reading if c.deadline <= now or (stopping and not c.framer.started)]:
            self._forget(conn)
            if conn.kept_alive or (stopping and not conn.framer.started):
                self._close(conn)
            elif conn.framer.started:
                partial_from[_peer(conn)] += 1
                self._refuse(conn, json_response(408, f"the request did not arrive within "
                                                       f"{self.read_timeout_s:g} s (REQUEST_READ_TIMEOUT_S)"))
            else:
                idle_from[_peer(conn)] += 1
                self._close(conn)
        for conn in [c for c in self.draining if c.draining_until <= now]:
            self._stop_draining(conn)
        if partial_from or idle_from or self.evicted:
            clients = partial_from + idle_from + self.evicted
            log.warning("closed %d connection(s) past the %g s read deadline (%d with part of a request, %d that sent "
                        "nothing) and %d over MAX_CONNECTIONS=%d; from %s",
                        partial_from.total() + idle_from.total(), self.read_timeout_s, partial_from.total(),
                        idle_from.total(), self.evicted.total(), self.max_connections,
                        ", ".join(f"{peer} x{count}" for peer, count in clients.most_common(5)))
            self.evicted.clear()

    def murder_keepalived(self, force: bool = False) -> None:
        if force:  # the worker stops: whatever is still being read or drained closes
            for conn in list(self.reading):
                self._forget(conn)
                self._close(conn)
            for conn in list(self.draining):
                self._stop_draining(conn)

    # -- the request thread and its end
    def handle_request(self, req: Any, conn: Any) -> bool:
        # Responses are written with a deadline too: a client that stops reading must not hold a thread.
        conn.sock.settimeout(self.read_timeout_s)
        try:
            return bool(super().handle_request(req, conn))
        except TimeoutError:
            log.warning("%s: the client read no response for %g s; closed", _peer(conn), self.read_timeout_s)
            return False

    def finish_request(self, conn: Connection, fs: futures.Future[Any]) -> None:
        self.buffered -= conn.held
        conn.held = 0
        try:
            keep = bool(fs.result()) if not fs.cancelled() else False
        except Exception:
            keep = False
        if not keep or not self.alive:
            self._linger(conn)
            return
        try:
            self._start_reading(conn, kept_alive=not conn.framer.started)
        except (OSError, ValueError):
            self._forget(conn)
            self._close(conn)
            return
        if conn.framer.started:  # the client sent its next request already: it may be whole
            self._feed(conn, b"")

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.light_pool is not None:
                self.light_pool.shutdown(wait=False)
