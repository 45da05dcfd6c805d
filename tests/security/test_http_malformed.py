"""Malformed HTTP against a real ``sam-backend serve``: a short JSON answer, the status gunicorn would pick.

gunicorn answers a malformed request with an HTML page; the backend's worker (backend/http_worker.py) frames
requests itself (backend/http_framing.py) and answers them with the app's JSON error body instead. The framer's
decisions are also checked byte by byte: a request trickled one byte at a time frames exactly like one sent
at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from gunicorn.config import Config

from backend.http_framing import Complete, Limits, NeedMore, Refused, RequestFramer
from testsupport.backend import ServerProcess, fixture_body, make_tiny_checkpoint, start_server
from testsupport.raw_http import connect, exchange, parse_responses, read_until_closed

MAX_REQUEST_MB = 1
HOST = b"Host: backend\r\n"

MALFORMED = {
    "request line too long": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    "request line never ends": (b"GET /" + b"a" * 5000, 414),
    "head over 64 KiB": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 4000) for i in range(20)), 431),
    "header field too large": (b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "too many header fields": (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n",
                               431),
    "content-length not a number": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Content-Length: abc\r\n\r\n", 400),
    "negative content-length": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n", 400),
    "two content-lengths": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                            400),
    "content-length and chunked": (b"POST /predict HTTP/1.1\r\n" + HOST
                                   + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "unknown transfer coding": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: br\r\n\r\n", 501),
    "compressed transfer coding": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
                                   501),
    "chunk size not hex": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "chunk without its CRLF": (b"POST /predict HTTP/1.1\r\n" + HOST
                               + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", 400),
    "chunk size line too long": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n1;"
                                 + b"x" * 2000, 400),
    "chunked body over the cap": (b"POST /predict HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                                  + b"%x\r\n" % (2 * 2**20), 413),
    "invalid method": (b"G@T / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "unsupported HTTP version": (b"GET / HTTP/9.9\r\n" + HOST + b"\r\n", 505),
    "garbage version": (b"GET / HTTX/1.1\r\n" + HOST + b"\r\n", 400),
    "bare LF line ends": (b"GET / HTTP/1.1\nHost: backend\n\n", 400),
    "TLS handshake on the HTTP port": (bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40, 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "header name with a space": (b"GET / HTTP/1.1\r\n" + HOST + b"Bad Name: 1\r\n\r\n", 400),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("malformed")
    checkpoint = make_tiny_checkpoint(directory / "sam_tiny.pth", seed=5)
    try:
        server = start_server(checkpoint, directory / "server.log", MAX_REQUEST_MB=str(MAX_REQUEST_MB),
                              REQUEST_READ_TIMEOUT_S="5")
    except RuntimeError as error:
        pytest.fail(str(error))
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_a_json_answer_and_a_log_line(server: ServerProcess, name: str) -> None:
    request, status = MALFORMED[name]
    responses = exchange(server.url, request, timeout=4)
    assert [r.status for r in responses] == [status], responses
    (response,) = responses
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    body = response.json()
    assert body["status"] == status and body["message"] and body["error"]
    assert f"-> {status}: {body['message']}" in server.log.read_text()  # one line, what was refused and why


def test_the_worker_keeps_serving_after_malformed_requests(server: ServerProcess) -> None:
    for request, _ in MALFORMED.values():
        exchange(server.url, request, timeout=4)
    assert server.get("/health").json()["status"] == "UP"
    assert "Traceback" not in server.log.read_text()


def test_a_chunked_body_with_trailers_reaches_the_app(server: ServerProcess) -> None:
    body = json.dumps(fixture_body("setup.json")).encode()
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
    request = (b"POST /setup HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\nX-Trailer: 1\r\n\r\n")
    (response,) = exchange(server.url, request)
    assert response.status == 200 and "model_version" in response.json()


def test_expect_100_continue_is_answered_before_the_body_or_refused_with_413(server: ServerProcess) -> None:
    body = json.dumps(fixture_body("setup.json")).encode()
    with connect(server.url) as sock:
        sock.sendall(b"POST /setup HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(3)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        responses = parse_responses(read_until_closed(sock, 5))
    assert [r.status for r in responses] == [200]  # one interim answer in all, not a second from gunicorn
    (refused,) = exchange(server.url, b"POST /predict HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\n"
                                      b"Content-Length: %d\r\n\r\n" % (100 * 2**20))
    assert refused.status == 413  # no 100 Continue: the client never sends the body


def test_pipelined_requests_on_one_connection_are_all_answered(server: ServerProcess) -> None:
    one = b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n"
    responses = exchange(server.url, one + one + b"GET /nowhere HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    assert [r.status for r in responses] == [200, 200, 404]
    assert responses[2].headers["content-type"].startswith("application/json")


# ---- the framer alone: the same decision however the bytes arrive
def _frame(parts: list[bytes]) -> NeedMore | Complete | Refused:
    framer = RequestFramer(Config(), Limits(max_body_bytes=MAX_REQUEST_MB * 2**20), ("127.0.0.1", 1))
    outcome: NeedMore | Complete | Refused = NeedMore()
    for part in parts:
        outcome = framer.feed(part)
        if not isinstance(outcome, NeedMore):
            break
    return outcome


@pytest.mark.parametrize("name", list(MALFORMED))
def test_the_framer_refuses_a_trickled_request_like_a_whole_one(name: str) -> None:
    request, status = MALFORMED[name]
    whole = _frame([request])
    assert isinstance(whole, Refused) and whole.status == status
    trickled = _frame([request[i:i + 1] for i in range(len(request))])
    assert isinstance(trickled, Refused) and trickled.status == status


def test_the_framer_turns_a_chunked_body_into_a_length_and_keeps_what_follows() -> None:
    request = (b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;a=b\r\nabcd\r\n3\r\nefg\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\n")
    expected = Complete(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\nabcdefg", b"GET / HTTP/1.1\r\n",
                        "POST", "/x")
    assert _frame([request]) == expected
    end = request.index(b"GET /") - 1  # the last byte of the body comes with what follows
    assert _frame([request[i:i + 1] for i in range(end)] + [request[end:]]) == expected
