"""Connection limits for serve.py, so that slow and idle clients cannot starve real ones.

uvicorn has no deadline for a request's head or body, and its `limit_concurrency` counts every
open socket: a few dozen sockets that send half a request line and stall (slowloris), or a
body trickled a byte a second, held the server for everyone. Here an HTTP/1.1 connection is in
one of three phases, read from h11's view of the client:

- waiting for a request head (new, or kept alive after an answer): it must send the whole head
  within `head_timeout_s`; waiting connections are capped overall and per client address, and
  past a cap the one that has waited longest is closed, so a flood of new idle sockets evicts
  its own elders instead of locking newcomers out (a real client's head arrives at once, so it
  is never the oldest waiting).
- sending a body: it gets `body_timeout_s` plus one second for every `min_body_rate` bytes
  received; a client that falls behind that rate is closed.
- waiting for the answer: the server's work, bounded by serve.py's JobPool, not here.

Only requests in progress (the last two phases) count against `max_connections` and
`max_per_client`: they hold an ASGI task and a spooled upload, while a waiting connection holds
one socket and a head buffer (h11 refuses a head over 16 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("im2latex.serve")


def _limit(default: float, text: str) -> Any:
    """A field with its flag's help text."""
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take and how many connections it may hold.

    head_timeout_s: a browser sends its whole head in one packet; 10 s covers a slow mobile
    round trip many times over while keeping a stalled socket's life short.
    body_timeout_s, min_body_rate: Apache mod_reqtimeout's scheme (a grace period extended as
    bytes arrive). 8 KiB/s is below any mobile link still in service, and holding one request
    slot for long then costs an attacker real bandwidth, not a byte a second.
    max_connections: each request in progress may spool a whole upload to disk, so this bounds
    the disk and memory of uploads (64 x the upload limit).
    max_per_client: a browser opens at most 6 connections to a host; 16 leaves room for a
    small office behind one address while no single address can take the whole server.
    max_idle: waiting connections cost little, but each is a file descriptor: 256 plus the
    requests in progress stays well below the common limit of 1024 open files.
    max_idle_per_client: one address can keep at most this many idle sockets, so a single
    attacker cannot evict everyone else's kept-alive connections.
    """

    head_timeout_s: float = _limit(10.0, "seconds a client has to send a request's head")
    body_timeout_s: float = _limit(20.0, "seconds a client has to send a body, extended as "
                                         "bytes arrive (see --min_body_rate)")
    min_body_rate: float = _limit(8192.0, "slowest accepted upload, bytes per second")
    max_connections: int = _limit(64, "requests in progress at once; more get 503 (bounds "
                                      "spooled uploads); idle connections do not count")
    max_per_client: int = _limit(16, "requests in progress from one address; more get 503")
    max_idle: int = _limit(256, "connections waiting for a request; past it the longest "
                                "waiting is closed")
    max_idle_per_client: int = _limit(32, "connections one address may keep waiting; past it "
                                          "its longest waiting is closed")


def add_limit_flags(parser: argparse.ArgumentParser, positive: Callable[[str], float],
                    count: Callable[[str], int]) -> None:
    """One flag per field of ConnectionLimits, its default taken from the field."""
    for f in fields(ConnectionLimits):
        parse = count if f.type == "int" else positive
        parser.add_argument(f"--{f.name}", type=parse, default=f.default, help=f.metadata["help"])


def limits_from_args(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(**{f.name: getattr(args, f.name) for f in fields(ConnectionLimits)})


class ConnectionGate:
    """The open connections of one server and the limits they share."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[GuardedH11Protocol] = set()
        self.waiting: dict[GuardedH11Protocol, None] = {}  # longest waiting first

    def start_waiting(self, conn: GuardedH11Protocol) -> None:
        """Count `conn` as waiting for a head, closing the longest waiting past a cap."""
        self.waiting.pop(conn, None)
        self.waiting[conn] = None
        same = [c for c in self.waiting if c.address == conn.address]
        self._evict(same, self.limits.max_idle_per_client)
        self._evict(list(self.waiting), self.limits.max_idle)

    @staticmethod
    def _evict(oldest_first: list[GuardedH11Protocol], cap: int) -> None:
        for old in oldest_first[:max(0, len(oldest_first) - cap)]:
            old.drop("evicted: too many idle connections")

    def stop_waiting(self, conn: GuardedH11Protocol) -> None:
        self.waiting.pop(conn, None)

    def admits(self, conn: GuardedH11Protocol) -> bool:
        """Whether a request may start on `conn` given the requests in progress elsewhere."""
        busy = [c for c in self.open if c is not conn and c not in self.waiting]
        mine = sum(c.address == conn.address for c in busy)
        return len(busy) < self.limits.max_connections and mine < self.limits.max_per_client

    def forget(self, conn: GuardedH11Protocol) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)


HEAD, BODY = "head", "body"
BUSY = json.dumps({"detail": "busy: too many requests in progress; try again in a moment"}
                  ).encode()


async def refuse_busy(scope: Any, receive: Any, send: Any) -> None:
    """The 503 of a request over the gate's caps, in the app's own form (JSON `detail` and
    Retry-After, as the decode queue answers), so that clients handle one kind of busy."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(BUSY)).encode()),
        (b"retry-after", b"2"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": BUSY, "more_body": False})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and caps of a ConnectionGate.

    Hooks: connection_made/connection_lost, data_received (to count body bytes) and
    handle_events (after every parse: a request the gate does not admit is answered by
    `refuse_busy` instead of the app; uvicorn's own `limit_concurrency` is off, the gate
    counting for it)."""

    gate: ClassVar[ConnectionGate]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None
        self._app = self.app
        self.address = ""
        self._phase: str | None = None
        self._since = 0.0
        self._body_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = self.client[0] if self.client else ""
        self.gate.open.add(self)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.forget(self)
        self._set_timer(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == BODY:
            self._body_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        self.app = self._app if self.gate.admits(self) else refuse_busy
        super().handle_events()
        self._watch()

    def drop(self, reason: str) -> None:
        log.debug("closed the connection of %s: %s", self.address, reason)
        self.gate.forget(self)
        self.transport.abort()

    def _watch(self) -> None:
        """Follow the client's phase; a new phase starts its own clock."""
        state = self.conn.their_state
        phase = HEAD if state is h11.IDLE else BODY if state is h11.SEND_BODY else None
        if phase == self._phase or self.transport.is_closing():
            return
        self._phase, self._since, self._body_bytes = phase, self.loop.time(), 0
        if phase == HEAD:
            self.gate.start_waiting(self)
        else:
            self.gate.stop_waiting(self)
        self._set_timer(self._deadline())

    def _deadline(self) -> float | None:
        limits = self.gate.limits
        if self._phase == HEAD:
            return self._since + limits.head_timeout_s
        if self._phase == BODY:
            return self._since + limits.body_timeout_s + self._body_bytes / limits.min_body_rate
        return None

    def _set_timer(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if deadline is None else self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        """Close the connection if its phase is past its deadline; bytes may have moved it."""
        deadline = self._deadline()
        if deadline is not None and self.loop.time() < deadline:
            self._set_timer(deadline)
        elif deadline is not None:
            self.drop(f"{self._phase} not received in time")


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` whose connections share one gate."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"gate": ConnectionGate(limits)})
