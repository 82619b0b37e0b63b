"""serve_limits.py: slow and idle clients against a real uvicorn server on loopback.

Small servers with a trivial app check each deadline and cap; one `python serve.py` with the
model checks the whole attack (slowloris) while a normal client keeps being served."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import httpx2
import pytest
import uvicorn

from data.layout import IMAGES_DIR
from serve import get_args
from serve_limits import ConnectionGate, ConnectionLimits, guarded_protocol, limits_from_args
from tests.test_serve import FILE_PART_HEAD, serve_process

HOST = "127.0.0.1"
PARTIAL_HEAD = b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: mul"


async def count_body(scope, receive, send) -> None:
    """Reads the whole body and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def small_server(**limits: float) -> Iterator[int]:
    """uvicorn with the guarded protocol and `count_body` in a thread; yields its port."""
    config = uvicorn.Config(count_body, host=HOST, port=0, lifespan="off", log_level="warning",
                            http=guarded_protocol(ConnectionLimits(**limits)))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.02)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(data)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (any answer bytes are skipped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(4096):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def sent_or_closed(sock: socket.socket, data: bytes) -> bool:
    """Send `data`; True when the server has already closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of one response on `sock` (a body with a Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < length(data):
        chunk = sock.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def length(head: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    return int(found.group(1)) if found else 0


def request(port: int, body: bytes = b"x") -> int:
    return httpx2.post(f"http://{HOST}:{port}/", content=body, timeout=10).status_code


def body_head(length: int) -> bytes:
    return f"POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {length}\r\n\r\n".encode()


# ------------------------------------------------------------------------------ the gate


class FakeConnection:
    """What the gate sees of a connection: its address and how to close it."""

    def __init__(self, gate: ConnectionGate, address: str) -> None:
        self.gate, self.address, self.dropped = gate, address, False

    def drop(self, reason: str) -> None:
        self.dropped = True
        self.gate.forget(self)


def test_the_gate_evicts_the_longest_waiting_per_address_then_overall_and_caps_requests():
    gate = ConnectionGate(ConnectionLimits(max_idle=4, max_idle_per_client=2, max_connections=3,
                                           max_per_client=2))

    def opened(address: str) -> FakeConnection:
        conn = FakeConnection(gate, address)
        gate.open.add(conn)
        gate.start_waiting(conn)
        return conn

    a1, a2, b1, a3 = (opened(address) for address in ("a", "a", "b", "a"))
    assert a1.dropped and not (a2.dropped or b1.dropped or a3.dropped)  # a's cap is 2
    gate.start_waiting(a2)  # kept alive after an answer: now a's most recent waiter
    c, d = opened("c"), opened("d")  # 5 waiting, cap 4: the longest waiting overall goes
    assert b1.dropped and not (a3.dropped or c.dropped or d.dropped)
    for conn in (a2, a3, c):  # requests in progress: 2 from a, 3 in all
        gate.stop_waiting(conn)
    newcomer = {address: FakeConnection(gate, address) for address in "ae"}
    assert not gate.admits(newcomer["a"]) and not gate.admits(newcomer["e"])
    gate.forget(c)
    assert gate.admits(newcomer["e"]) and not gate.admits(newcomer["a"])


def test_every_limit_is_a_flag_with_the_dataclass_default():
    assert limits_from_args(get_args([])) == ConnectionLimits()
    args = get_args(["--head_timeout_s", "2.5", "--max_idle_per_client", "3"])
    assert limits_from_args(args) == ConnectionLimits(head_timeout_s=2.5, max_idle_per_client=3)
    for bad in (["--head_timeout_s", "0"], ["--max_per_client", "0"]):
        with pytest.raises(SystemExit):
            get_args(bad)


# ------------------------------------------------------------------------------ small servers


def test_a_stalled_head_is_closed_after_the_head_timeout_also_on_a_kept_alive_connection():
    with small_server(head_timeout_s=1.0) as port, ExitStack() as stack:
        start = time.monotonic()
        stalled = stack.enter_context(connect(port, PARTIAL_HEAD))
        kept = stack.enter_context(connect(port, body_head(1) + b"x"))
        assert answer(kept) == (200, b"1")
        kept.sendall(PARTIAL_HEAD)  # uvicorn's keep-alive timer stops at the first byte
        assert closed_within(stalled, 10) and closed_within(kept, 10)
        assert time.monotonic() - start > 0.9


def test_a_trickled_body_is_cut_off_and_a_steady_one_is_not():
    with small_server(body_timeout_s=1.0, min_body_rate=1000.0) as port:
        with connect(port, body_head(100)) as trickle:
            start = time.monotonic()
            for _ in range(40):  # a byte every 0.1 s: far below 1000 bytes/s
                if sent_or_closed(trickle, b"x") or closed_within(trickle, 0.1):
                    break
            assert 0.9 < time.monotonic() - start < 3.5 and closed_within(trickle, 0.5)
        with connect(port, body_head(3000)) as steady:  # 2000 bytes/s: twice the minimum
            for _ in range(3):
                time.sleep(0.5)
                steady.sendall(b"x" * 1000)
            assert answer(steady) == (200, b"3000")


def test_idle_connections_do_not_count_against_requests_in_progress():
    with small_server(max_connections=2) as port, ExitStack() as stack:
        for _ in range(10):
            stack.enter_context(connect(port, PARTIAL_HEAD))
        assert request(port) == 200
        for _ in range(2):  # two requests in progress: their bodies are not complete
            sock = stack.enter_context(connect(port, body_head(10) + b"x"))
        time.sleep(0.3)
        busy = httpx2.post(f"http://{HOST}:{port}/", content=b"x", timeout=10)
        # the gate's 503 in the app's own form: clients handle one kind of busy
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert busy.json()["detail"].startswith("busy")
        sock.sendall(b"x" * 9)
        assert answer(sock) == (200, b"10")
        assert request(port) == 200


def test_past_its_idle_cap_an_address_loses_its_longest_waiting_connections():
    with small_server(max_idle_per_client=3) as port, ExitStack() as stack:
        socks = []
        for _ in range(5):
            socks.append(stack.enter_context(connect(port, PARTIAL_HEAD)))
            time.sleep(0.05)  # the server sees them in this order
        assert closed_within(socks[0], 5) and closed_within(socks[1], 5)
        assert not any(closed_within(s, 0.3) for s in socks[2:])
        assert request(port) == 200  # a newcomer is served (and evicts socks[2])
        assert not any(closed_within(s, 0.3) for s in socks[3:])


# ------------------------------------------------------------------------------ the attack


def trickle(socks: list[socket.socket], stop: threading.Event, seconds: int = 30) -> None:
    """A byte a second on each socket until `stop` (or `seconds`), ignoring closed ones."""
    for _ in range(seconds):
        for sock in socks:
            sent_or_closed(sock, b"a")
        if stop.wait(1.0):
            return


def timed(call: Callable[[], httpx2.Response]) -> tuple[int, float]:
    start = time.monotonic()
    return call().status_code, time.monotonic() - start


def test_70_stalled_and_trickling_sockets_do_not_deny_a_real_client(tiny_model, tiny_dataset,
                                                                     tmp_path):
    image = sorted((tiny_dataset / IMAGES_DIR).glob("*.png"))[0].read_bytes()
    head_s = 3.0
    flags = ("--beam_size", "1", "--head_timeout_s", str(head_s), "--body_timeout_s", "3",
             "--min_body_rate", "1000")
    stop = threading.Event()
    with serve_process(tiny_model, tmp_path / "serve.log", *flags) as url, ExitStack() as stack:
        port = int(url.rsplit(":", 1)[1])
        opened = time.monotonic()
        stalled = [stack.enter_context(connect(port, PARTIAL_HEAD)) for _ in range(70)]
        slow_head = [stack.enter_context(connect(port, PARTIAL_HEAD)) for _ in range(5)]
        upload = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=x\r\n\r\n" + FILE_PART_HEAD)
        slow_body = [stack.enter_context(connect(port, upload)) for _ in range(5)]
        tricklers = threading.Thread(target=trickle, args=(slow_head + slow_body, stop))
        tricklers.start()
        try:
            for _ in range(3):
                status, seconds = timed(lambda: httpx2.get(f"{url}/api/health", timeout=10))
                assert status == 200 and seconds < 5, (status, seconds)
            status, seconds = timed(lambda: httpx2.post(
                f"{url}/api/predict", files={"image": ("f.png", image, "image/png")}, timeout=20))
            assert status == 200 and seconds < 10, (status, seconds)
            attackers = stalled + slow_head + slow_body
            left = [s for s in attackers if not closed_within(s, opened + head_s + 10
                                                             - time.monotonic())]
            assert not left, f"{len(left)} of {len(attackers)} attacking sockets still open"
        finally:
            stop.set()
            tricklers.join()
