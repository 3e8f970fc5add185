"""Fuzz the control socket of a daemon process while slow-drip and flood clients join in.

A seeded generator makes malformed, oversized and truncated lines (100,000 in the full
run, which is marked slow, and 10,000 by default) and sends them in batches over several
connections. The daemon must send exactly one response per line, never crash or hang,
keep its memory bounded and keep serving a well-behaved client with low latency. A
hypothesis test checks the request decoder on its own.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import time
from pathlib import Path

import anyio
import psutil
import pytest
from anyio.abc import SocketStream
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.control.harness import DaemonProcess, connect, open_stream
from walacord.control.protocol import PROTOCOL_VERSION, ErrorCode, decode_request

SEED = 20261204
FUZZ_LINES = 100_000  # the full run, marked slow; CI runs it with the slow tests
FUZZ_CONNECTIONS = 8
BATCH_LINES = 400
MAX_REQUEST_BYTES = 16 * 1024
MAX_CONNECTIONS = 40
SLOW_DRIP_CLIENTS = 4
FLOOD_CONNECTIONS = 60

# Methods the fuzzer may name. Methods that sleep, crash on purpose, send progress lines
# or change the log level are left out, so every line gets exactly one response quickly.
METHODS = ["status", "health", "mode.get", "mode.set", "mode.clear", "probes.list",
           "probes.run", "pool.recycle", "test.echo", "no.such", "", "status\x00", "Status"]
ODD_VALUES: list[object] = [None, True, False, 0, -1, 2**63, -(2**63) - 1, 1.5, float("inf"),
                            "", "x" * 300, [], {}, [1, [2, [3]]], {"a": {"b": None}}, "\u202e"]


def valid_request(rng: random.Random) -> dict[str, object]:
    params: dict[str, object] = {}
    method = rng.choice(METHODS)
    if method == "mode.set":
        params = {"mode": rng.choice(["normal", "degraded", "panic"]),
                  "ttl_seconds": rng.choice([0.05, 5, -1, "5"]), "reason": "fuzz"}
    elif method == "test.echo":
        params = {"value": rng.choice(ODD_VALUES[:8])}
    return {"id": rng.randrange(10**6), "method": method, "params": params,
            "version": PROTOCOL_VERSION}


def _encode(document: object) -> bytes:
    # The stdlib encoder writes integers past 64 bits and Infinity, which orjson rejects.
    return json.dumps(document, separators=(",", ":")).encode()


def mutate(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        position = rng.randrange(len(buffer) + 1)
        if choice < 0.35 and buffer:
            del buffer[min(position, len(buffer) - 1)]
        elif choice < 0.7:
            buffer.insert(position, rng.randrange(256))
        elif buffer:
            buffer[min(position, len(buffer) - 1)] = rng.randrange(256)
    return bytes(buffer)


def fuzz_line(rng: random.Random) -> bytes:
    """Return one malformed, odd or oversized request line, without its newline."""
    kind = rng.random()
    if kind < 0.30:
        line = mutate(_encode(valid_request(rng)), rng)
    elif kind < 0.45:
        line = rng.randbytes(rng.randint(0, 200))
    elif kind < 0.60:
        document = valid_request(rng)
        field = rng.choice(["id", "method", "params", "version", "extra"])
        document[field] = rng.choice(ODD_VALUES)
        line = _encode(document)
    elif kind < 0.70:
        # Truncated: a valid request cut short, then the newline.
        full = _encode(valid_request(rng))
        line = full[: rng.randrange(len(full))]
    elif kind < 0.78:
        depth = rng.choice([10, 600, 5000])
        line = b"[" * depth + b"]" * rng.choice([0, depth])
    elif kind < 0.80:
        # Oversized: past the limit, sometimes far past it.
        line = b"x" * rng.choice([MAX_REQUEST_BYTES + 1, 3 * MAX_REQUEST_BYTES, 100_000])
    elif kind < 0.90:
        line = _encode(rng.choice([*ODD_VALUES[:6], [valid_request(rng)]]))
    else:
        line = _encode(valid_request(rng))
    return line.replace(b"\n", b" ")


def make_batches(seed: int, lines: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    generated = [fuzz_line(rng) + b"\n" for _ in range(lines)]
    per_connection = -(-lines // FUZZ_CONNECTIONS)
    return [generated[i:i + per_connection] for i in range(0, lines, per_connection)]


class Tally:
    def __init__(self) -> None:
        self.responses = 0
        self.latencies: list[float] = []
        self.drip_timeouts = 0
        self.drips_timed_out = anyio.Event()  # set once drip_timeouts reaches the clients
        self.busy = 0
        self.errors: list[str] = []


async def fuzz_connection(stream: SocketStream, lines: list[bytes], tally: Tally) -> None:
    """Send `lines` in batches while reading responses; end with a truncated request."""
    received = 0
    expected = len(lines) + 1  # plus the error for the truncated tail, sent before close
    async with stream:
        async def read_all() -> None:
            nonlocal received
            with anyio.fail_after(60):
                while True:
                    try:
                        chunk = await stream.receive(1 << 20)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                    received += chunk.count(b"\n")

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            for start in range(0, len(lines), BATCH_LINES):
                await stream.send(b"".join(lines[start:start + BATCH_LINES]))
            await stream.send(b'{"id": 1, "method": "sta')
            await stream.send_eof()
    tally.responses += received
    if received != expected:
        tally.errors.append(f"fuzz connection got {received} responses, expected {expected}")


async def well_behaved_client(path: Path, tally: Tally, stop: anyio.Event) -> None:
    async with connect(path) as client:
        while not stop.is_set():
            began = time.monotonic()
            response = await client.call("test.echo", {"value": "ping"})
            tally.latencies.append(time.monotonic() - began)
            if response.get("result", {}).get("value") != "ping":
                tally.errors.append(f"well-behaved client got {response}")
            await anyio.sleep(0.02)


async def slow_drip_client(path: Path, tally: Tally, stop: anyio.Event) -> None:
    while not stop.is_set():
        try:
            async with connect(path) as client:
                try:
                    for byte in b'{"id": 1, "method": "status", "version": 1}' * 10:
                        await client.send(bytes([byte]))
                        await anyio.sleep(0.1)
                except anyio.BrokenResourceError:
                    pass
                response = await client.receive(wait=10)
        except (EOFError, ConnectionError, anyio.BrokenResourceError):
            continue
        code = response.get("error", {}).get("code")
        if code == ErrorCode.REQUEST_TIMEOUT:
            tally.drip_timeouts += 1
            if tally.drip_timeouts >= SLOW_DRIP_CLIENTS:
                tally.drips_timed_out.set()
        elif code != ErrorCode.BUSY:
            tally.errors.append(f"slow-drip client got {response}")


async def flood_client(path: Path, tally: Tally, stop: anyio.Event) -> None:
    while not stop.is_set():
        sockets = []
        for _ in range(FLOOD_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(str(path))
            except (BlockingIOError, ConnectionRefusedError):
                sock.close()
                continue
            sockets.append(sock)
        await anyio.sleep(0.3)
        for sock in sockets:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, ConnectionError):
                data = b""
            if b'"code":-32004' in data:
                tally.busy += 1
            sock.close()
        await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("lines", [
    pytest.param(10_000, id="10k"),
    pytest.param(FUZZ_LINES, id="100k", marks=pytest.mark.slow),
])
async def test_fuzz_daemon_survives_hostile_clients(socket_dir: Path, lines: int) -> None:
    daemon = DaemonProcess(socket_dir, max_request_bytes=MAX_REQUEST_BYTES,
                           max_connections=MAX_CONNECTIONS, idle_timeout=5,
                           request_timeout=1.0, write_timeout=5)
    batches = make_batches(SEED, lines)
    assert sum(len(batch) for batch in batches) == lines
    daemon.start()
    try:
        memory_before = psutil.Process(daemon.process.pid).memory_info().rss  # type: ignore[union-attr]
        tally = Tally()
        stop = anyio.Event()
        began = time.monotonic()
        # Connect the fuzzers and the well-behaved client before the flood takes the slots.
        streams = [await open_stream(daemon.socket) for _ in batches]
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(well_behaved_client, daemon.socket, tally, stop)
                await anyio.sleep(0.1)
                for _ in range(SLOW_DRIP_CLIENTS):
                    tg.start_soon(slow_drip_client, daemon.socket, tally, stop)
                tg.start_soon(flood_client, daemon.socket, tally, stop)
                async with anyio.create_task_group() as fuzzers:
                    for stream, batch in zip(streams, batches, strict=True):
                        fuzzers.start_soon(fuzz_connection, stream, batch, tally)
                await anyio.sleep(1.5)  # let the slow-drip clients reach their deadline
                # While the flood takes every slot, a slow-drip client gets BUSY instead
                # and tries again, so on a loaded machine this can take longer.
                with anyio.move_on_after(20):
                    await tally.drips_timed_out.wait()
                stop.set()
        duration = time.monotonic() - began

        assert daemon.alive(), daemon.log_text()[-4000:]
        memory_after = psutil.Process(daemon.process.pid).memory_info().rss  # type: ignore[union-attr]
        async with connect(daemon.socket) as client:
            status = await client.call("status")
    finally:
        exit_code = daemon.stop()

    assert tally.errors == []
    assert tally.responses == lines + len(batches)
    assert tally.drip_timeouts >= SLOW_DRIP_CLIENTS
    assert tally.busy > 0
    assert status["result"]["mode"] in ("normal", "degraded")
    assert len(tally.latencies) > 20
    assert max(tally.latencies) < 1.0, f"worst latency {max(tally.latencies):.3f}s"
    assert statistics.median(tally.latencies) < 0.1
    assert memory_after - memory_before < 100 * 1024 * 1024
    assert exit_code == 0
    log = daemon.log_text()
    assert "control.connection_failed" not in log
    assert "control.handler_crashed" not in log
    assert "Traceback" not in log
    print(f"fuzz: {lines} lines in {duration:.1f}s, median latency "
          f"{statistics.median(tally.latencies) * 1000:.1f} ms, worst "
          f"{max(tally.latencies) * 1000:.1f} ms, {tally.busy} busy rejections")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(
    _encode,
    st.dictionaries(st.sampled_from(["id", "method", "params", "version", "x"]),
                    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                    | st.lists(st.integers(), max_size=3)
                    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))))
def test_decode_request_never_raises(line: bytes) -> None:
    request = decode_request(line)
    if request.error is None:
        assert isinstance(request.method, str)
        assert request.method
        assert isinstance(request.params, dict)
    else:
        assert request.error.code in set(ErrorCode)
        assert len(request.error.message) < 400


@pytest.mark.parametrize(("line", "message"), [
    (b'{"id": 1, "method": "ping"}', "missing version"),
    (b'{"id": 1, "method": 7, "version": 1}', "invalid method 7"),
    (b'{"id": 1, "method": "", "version": 1}', "missing method"),
    (b'{"id": 1, "method": "p\xffing", "version": 1}', "byte 22 is not valid UTF-8"),
])
def test_decode_request_names_problem(line: bytes, message: str) -> None:
    request = decode_request(line)
    assert request.error is not None
    assert message in request.error.message
