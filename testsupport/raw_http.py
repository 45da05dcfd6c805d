"""Raw-socket HTTP for the serving-stack tests: what no well-behaved client library sends.

Slow, idle and malformed clients are byte streams, not requests: these helpers open connections, send exact
bytes, read whatever comes back, and find the gunicorn worker's process so its memory can be watched.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection, or until ``timeout`` s pass."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def parse_responses(data: bytes) -> list[RawResponse]:
    """The HTTP/1.1 responses in ``data`` (interim 1xx included), each framed by its Content-Length."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        responses.append(RawResponse(status, headers, rest[:length]))
        data = rest[length:]
    return responses


def exchange(url: str, data: bytes, timeout: float = 5.0) -> list[RawResponse]:
    """Send ``data`` on a new connection and parse what comes back until the server closes it."""
    with connect(url) as sock:
        sock.sendall(data)
        return parse_responses(read_until_closed(sock, timeout))


def worker_pid(arbiter_pid: int) -> int:
    """The one gunicorn worker of an arbiter started with WORKERS=1."""
    children = Path(f"/proc/{arbiter_pid}/task/{arbiter_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
