"""One HTTP/1.1 request cut out of a byte stream before any thread is spent on it.

The server's event loop (``backend/http_worker.py``) feeds a ``RequestFramer`` whatever a connection sends and
hands a request to a request thread only once it is whole. That is what keeps slow and idle clients from
holding the threads the model needs: a thread never waits on a socket for a request to arrive.

The framer decides three things the worker cannot leave to a thread: where the request ends (``Content-Length``
or a chunked body), whether it is too big to take (the head and body limits, checked before the body is read
into memory), and whether the head is malformed. The head is checked by gunicorn's own parser, the one the
request thread runs again on the same bytes, so what passes here parses there; a chunked body is decoded here
(the thread gets the same request with a ``Content-Length``), so a bad chunk is refused here too. Each refusal
carries the HTTP status and a message for a short JSON answer.

No sockets and no clocks in this module: deadlines are the worker's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gunicorn.http import errors as http_errors
from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader

#: The largest request head (request line and headers) taken, in bytes. Label Studio's are under 2 KiB; gunicorn's
#: own limits (4094 bytes a request line, 100 fields of 8190 bytes) would allow 800 KiB per connection.
MAX_HEAD_BYTES = 64 * 1024
#: A chunk-size line (hex size and extensions) longer than this is refused.
MAX_CHUNK_LINE = 1024

#: Chunked trailers (dropped: the app never sees them) longer than this are refused.
MAX_TRAILER_BYTES = 8 * 1024

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# What may precede the first space of a request line (an RFC 9110 token, the method), and a line feed that no
# carriage return precedes: seen early, either means the rest of the head need not be waited for.
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass(frozen=True)
class Limits:
    """What one request may weigh before it is refused."""

    max_body_bytes: int
    max_head_bytes: int = MAX_HEAD_BYTES


@dataclass(frozen=True)
class NeedMore:
    """The request is not whole yet. ``send_continue``: the client waits for ``100 Continue`` before its body."""

    send_continue: bool = False


@dataclass(frozen=True)
class Complete:
    """A whole request: ``data`` is what the request thread parses, ``leftover`` what the client sent after it."""

    data: bytes
    leftover: bytes
    method: str
    path: str


@dataclass(frozen=True)
class Refused:
    """A request that will not be served: the status and message of the JSON answer, then the connection closes."""

    status: int
    message: str


Outcome = NeedMore | Complete | Refused


def refusal_for(error: Exception) -> Refused:
    """The status and message for one of gunicorn's parse errors (its own choice of status, as JSON)."""
    if isinstance(error, http_errors.LimitRequestLine):
        return Refused(414, f"request line too long ({error})")
    if isinstance(error, http_errors.LimitRequestHeaders):
        return Refused(431, f"request headers too large ({error})")
    if isinstance(error, http_errors.UnsupportedTransferCoding):
        return Refused(501, f"unsupported transfer coding: {error}")
    if isinstance(error, http_errors.InvalidHTTPVersion):  # a well-formed version (9, 9) is one not supported
        return Refused(505 if "(" in str(error) else 400, f"invalid HTTP version: {error}")
    if isinstance(error, http_errors.ExpectationFailed):
        return Refused(417, f"expectation failed: {error}")
    if isinstance(error, http_errors.InvalidRequestMethod):
        return Refused(400, f"invalid method: {error}")
    if isinstance(error, http_errors.InvalidRequestLine):
        return Refused(400, f"invalid request line: {error}")
    if isinstance(error, http_errors.ParseException):
        return Refused(400, f"malformed request: {error}")
    return Refused(400, "malformed request")


class RequestFramer:
    """Bytes of one connection in, one request (or a refusal) out; ``reset(leftover)`` for the next request."""

    def __init__(self, cfg: Any, limits: Limits, peer: Any) -> None:
        self._cfg, self._limits, self._peer = cfg, limits, peer
        self.reset(b"")

    def reset(self, leftover: bytes) -> None:
        """Start on the next request of a kept-alive connection; ``leftover`` are bytes already received."""
        self._buf = bytearray(leftover)
        self._scanned = self._line_end = 0  # how far the head has been scanned, where its first line ends
        self._head: bytes | None = None
        self._method = self._path = ""
        self._length: int | None = None  # Content-Length, None for a chunked body
        self._continue_asked = False
        self._continue_sent = False
        # chunked decoding state
        self._body = bytearray()
        self._chunk_left: int | None = None  # bytes of the current chunk still to come, None: a size line is next
        self._in_trailer = False

    @property
    def buffered(self) -> int:
        """Bytes this request holds in memory now (for the worker's budget)."""
        return len(self._buf) + len(self._body) + len(self._head or b"")

    @property
    def started(self) -> bool:
        """Whether any byte of a request has arrived (an idle kept-alive connection has none)."""
        return bool(self._buf) or self._head is not None

    def feed(self, data: bytes) -> Outcome:
        """Take what the connection sent next; say whether the request is whole, refused, or needs more."""
        self._buf += data
        if self._head is None:
            outcome = self._read_head()
            if outcome is not None:
                return outcome
        if self._length is not None:
            end = self._length
            if len(self._buf) < end:
                return self._need_more()
            return self._complete(self._head_bytes(), bytes(self._buf[:end]), bytes(self._buf[end:]))
        return self._read_chunks()

    # -- the head
    def _read_head(self) -> Outcome | None:
        buf = self._buf
        # RFC 9112 2.2: a server SHOULD ignore at least one empty line received before the request line.
        if buf.startswith(b"\r\n"):
            while buf.startswith(b"\r\n"):
                del buf[:2]
            self._scanned = self._line_end = 0
        # Each byte is scanned once, however the head trickles in: a slow client must not cost quadratic time.
        scanned, self._scanned = self._scanned, len(buf)
        start = max(0, scanned - 3)
        if not _METHOD_PREFIX.fullmatch(bytes(buf[:64]).split(b" ", 1)[0].split(b"\r", 1)[0]):
            hint = " (a TLS handshake on the plain HTTP port? TLS ends at a proxy)" if buf[:1] == b"\x16" else ""
            return Refused(400, "not an HTTP/1.1 request" + hint)
        end = buf.find(b"\r\n\r\n", start)
        if _BARE_LF.search(buf, max(0, scanned - 1), end + 4 if end >= 0 else len(buf)):
            return Refused(400, "bare LF as line terminator")
        if self._line_end <= 0:
            self._line_end = buf.find(b"\r\n", start)
        if end < 0:
            line_limit = self._cfg.limit_request_line
            if line_limit > 0 and self._line_end < 0 and len(buf) > line_limit + 2:
                return Refused(414, f"request line over {line_limit} bytes")
            if len(buf) > self._limits.max_head_bytes:
                return Refused(431, f"request head over {self._limits.max_head_bytes} bytes")
            return NeedMore()
        head = bytes(self._buf[:end + 4])
        if len(head) > self._limits.max_head_bytes:
            return Refused(431, f"request head over {self._limits.max_head_bytes} bytes")
        try:
            request = Request(self._cfg, IterUnreader([head]), self._peer)
        except Exception as error:  # every parse error of gunicorn's becomes a JSON answer
            return refusal_for(error)
        del self._buf[:end + 4]
        self._head = head
        self._method, self._path = str(request.method), str(request.path)
        reader = request.body.reader
        if isinstance(reader, LengthReader):
            self._length = int(reader.length)
            if self._length > self._limits.max_body_bytes:
                return self._too_large(f"a body of {self._length} bytes")
        elif not isinstance(reader, ChunkedReader):  # requests have a length or chunks; anything else is refused
            return Refused(400, "request body without a length")
        else:
            codings = [v.strip(" \t").lower() for name, value in request.headers if name == "TRANSFER-ENCODING"
                       for v in value.split(",")]
            if codings != ["chunked"]:  # gzip / deflate would reach the app undecoded, its header gone: refuse
                return Refused(501, f"unsupported transfer coding: {', '.join(codings)} (only chunked is)")
        self._continue_asked = any(name == "EXPECT" and value.strip().lower() == "100-continue"
                                   for name, value in request.headers)
        return None

    def _too_large(self, what: str) -> Refused:
        limit_mb = self._limits.max_body_bytes / 2**20
        return Refused(413, f"{what} is over the limit of {limit_mb:g} MiB (MAX_REQUEST_MB)")

    def _need_more(self) -> NeedMore:
        if self._continue_asked and not self._continue_sent:
            self._continue_sent = True
            return NeedMore(send_continue=True)
        return NeedMore()

    def _head_bytes(self) -> bytes:
        """The head for the request thread: ``Expect`` dropped once the loop answered it, so it is not sent twice."""
        assert self._head is not None
        if not self._continue_sent:
            return self._head
        return _without_headers(self._head, {b"expect"})

    def _complete(self, head: bytes, body: bytes, leftover: bytes) -> Complete:
        return Complete(head + body, leftover, self._method, self._path)

    # -- a chunked body, decoded as it arrives (RFC 9112 7.1)
    def _read_chunks(self) -> Outcome:
        pos = 0
        buf = self._buf
        try:
            while True:
                if self._in_trailer:
                    if buf.startswith(b"\r\n", pos):
                        pos += 2
                        break
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if len(buf) - pos > MAX_TRAILER_BYTES:
                            return Refused(431, "chunked trailer too large")
                        return self._need_more()
                    pos = end + 4
                    break
                if self._chunk_left is None:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        if len(buf) - pos > MAX_CHUNK_LINE:
                            return Refused(400, "invalid chunked body: chunk size line too long")
                        return self._need_more()
                    size = bytes(buf[pos:end]).split(b";", 1)[0].rstrip(b" \t")
                    if not _HEX.fullmatch(size):
                        return Refused(400, f"invalid chunked body: chunk size {size[:32]!r}")
                    pos = end + 2
                    left = int(size, 16)
                    if left == 0:
                        self._in_trailer = True
                        continue
                    if len(self._body) + left > self._limits.max_body_bytes:
                        return self._too_large("a chunked body")
                    self._chunk_left = left
                take = min(self._chunk_left, len(buf) - pos)
                self._body += buf[pos:pos + take]
                pos += take
                self._chunk_left -= take
                if self._chunk_left:
                    return self._need_more()
                if len(buf) - pos < 2:
                    self._chunk_left = 0  # the data is in; its CRLF is not
                    return self._need_more()
                if buf[pos:pos + 2] != b"\r\n":
                    return Refused(400, "invalid chunked body: chunk data not followed by CRLF")
                pos += 2
                self._chunk_left = None
        finally:
            del buf[:pos]  # consumed bytes leave memory as they are decoded
        head = _without_headers(self._head_bytes(), {b"transfer-encoding", b"content-length"})
        head = head[:-2] + b"Content-Length: %d\r\n\r\n" % len(self._body)
        return self._complete(head, bytes(self._body), bytes(self._buf))


def _without_headers(head: bytes, names: set[bytes]) -> bytes:
    """``head`` (request line, header lines, empty line) without the header lines named in ``names`` (lower case)."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in names]
    return b"\r\n".join(kept) + b"\r\n\r\n"
