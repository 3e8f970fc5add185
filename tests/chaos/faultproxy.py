"""A TCP fault proxy that tests place between walacord and PostgreSQL or the emulator.

The proxy listens on 127.0.0.1 at a free port and forwards every connection to one
target. Its mode can be switched at run time from any thread:

- ``pass``: forward bytes as they arrive;
- ``latency``: hold each chunk for ``latency_ms`` before forwarding it;
- ``blackhole``: forward nothing and keep every socket open. Bytes that arrive are
  held, not dropped, so a connection carries on intact when the mode goes back to
  pass, as after a healed network partition. New connections are accepted by the
  kernel but never reach the target while the blackhole lasts. `arm_blackhole()`
  starts one right after the next chunk reaches the target, so a request gets through
  and its response is held: a blackhole in the middle of a query;
- ``reset``: abort every connection with an RST on both sides (``SO_LINGER`` 0), and
  reset each new connection at once for as long as the mode lasts;
- ``bandwidth``: forward at most ``bytes_per_second`` in each direction of each
  connection.

`FaultProxy` runs its asyncio loop in a daemon thread, so both synchronous tests and
anyio tests can use it. ``python tests/chaos/faultproxy.py --target HOST:PORT`` runs it
as a process: it prints ``listening PORT`` and then reads one command a line on stdin,
such as ``latency 50``, ``bandwidth 2048``, ``blackhole``, ``reset`` or ``pass``.

On loopback the proxy acknowledges every byte itself, so a blackhole looks to the
client like a peer that stopped responding, not like lost packets: TCP keepalives and
``tcp_user_timeout`` do not fire, and only application-level deadlines do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

MODES = ("pass", "latency", "blackhole", "reset", "bandwidth")
CHUNK_SIZE = 65536
CONNECT_TIMEOUT = 5.0
# A bandwidth-limited write is split into slices of at most this many seconds of
# traffic, so a mode change takes effect within that time.
BANDWIDTH_SLICE_SECONDS = 0.05


@dataclass(frozen=True)
class Mode:
    """One proxy mode with its parameter (milliseconds or bytes per second)."""

    name: str = "pass"
    latency_ms: float = 0.0
    bytes_per_second: int = 0

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ValueError(f"invalid proxy mode {self.name!r}; expected one of {MODES}")
        if self.name == "latency" and self.latency_ms <= 0:
            raise ValueError(f"latency mode needs latency_ms > 0, got {self.latency_ms}")
        if self.name == "bandwidth" and self.bytes_per_second <= 0:
            raise ValueError(
                f"bandwidth mode needs bytes_per_second > 0, got {self.bytes_per_second}")


@dataclass
class ProxyStats:
    """Counters the tests read to prove traffic did or did not flow."""

    accepted: int = 0
    reset: int = 0
    bytes_forwarded: int = 0
    active: int = 0


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close the socket so the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port` with switchable faults."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self.port = listen_port
        self.stats = ProxyStats()
        self._mode = Mode()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        # Set while the mode lets bytes flow; pipes wait on it before forwarding.
        self._flowing: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._armed = False

    # --- control, callable from any thread ------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, name: str, *, latency_ms: float = 0.0, bytes_per_second: int = 0) -> None:
        """Switch the mode; takes effect on every open connection within milliseconds."""
        mode = Mode(name, latency_ms=latency_ms, bytes_per_second=bytes_per_second)
        loop = self._require_loop()
        done = threading.Event()

        def apply() -> None:
            self._apply_mode(mode)
            done.set()

        loop.call_soon_threadsafe(apply)
        if not done.wait(5.0):
            raise TimeoutError("fault proxy did not apply the mode change within 5 s")

    def passthrough(self) -> None:
        self.set_mode("pass")

    def latency(self, milliseconds: float) -> None:
        self.set_mode("latency", latency_ms=milliseconds)

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def reset(self) -> None:
        self.set_mode("reset")

    def arm_blackhole(self) -> None:
        """Blackhole right after the next chunk sent toward the target is forwarded."""
        loop = self._require_loop()
        loop.call_soon_threadsafe(setattr, self, "_armed", True)

    def bandwidth(self, bytes_per_second: int) -> None:
        self.set_mode("bandwidth", bytes_per_second=bytes_per_second)

    @contextlib.contextmanager
    def fault(self, name: str, *, latency_ms: float = 0.0,
              bytes_per_second: int = 0) -> Iterator[FaultProxy]:
        """Hold a mode for the body of a `with` block, then go back to pass."""
        self.set_mode(name, latency_ms=latency_ms, bytes_per_second=bytes_per_second)
        try:
            yield self
        finally:
            self.passthrough()

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start the proxy thread and return once the listening socket is bound."""
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                asyncio.run(self._serve(started))
            except BaseException as exc:  # reported to start()'s caller below
                failure.append(exc)
                started.set()

        self._thread = threading.Thread(target=main, name="faultproxy", daemon=True)
        self._thread.start()
        if not started.wait(10.0):
            raise TimeoutError("fault proxy did not start listening within 10 s")
        if failure:
            raise RuntimeError(f"fault proxy failed to start: {failure[0]!r}") from failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then join the thread."""
        if self._loop is None or self._thread is None or self._stopped is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10.0)
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # --- the event loop side ----------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("fault proxy is not running; call start() first")
        return self._loop

    async def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for connection in list(self._connections):
                self._close(connection, rst=False)
            await self._server.wait_closed()

    def _apply_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self._mode = mode
        if mode.name == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode.name == "reset":
            for connection in list(self._connections):
                self._close(connection, rst=True)

    def _close(self, connection: _Connection, *, rst: bool) -> None:
        for writer in (connection.client, connection.upstream):
            if writer is None:
                continue
            if rst:
                _abort_with_rst(writer)
            else:
                writer.transport.abort()
        for task in connection.tasks:
            task.cancel()
        if connection in self._connections:
            self._connections.discard(connection)
            self.stats.active -= 1
            if rst:
                self.stats.reset += 1

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.stats.accepted += 1
        connection = _Connection(client=client_writer)
        self._connections.add(connection)
        self.stats.active += 1
        if self._mode.name == "reset":
            self._close(connection, rst=True)
            return

        # A blackhole holds new connections before they reach the target.
        await self._flowing.wait()
        if connection not in self._connections:
            return
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            # The target refused the connection or timed out: pass that on as a reset.
            self._close(connection, rst=True)
            return
        if connection not in self._connections:
            upstream_writer.transport.abort()
            return
        connection.upstream = upstream_writer

        to_target = asyncio.create_task(
            self._pipe(client_reader, upstream_writer, toward_target=True))
        to_client = asyncio.create_task(
            self._pipe(upstream_reader, client_writer, toward_target=False))
        connection.tasks = [to_target, to_client]
        await asyncio.wait(connection.tasks, return_when=asyncio.FIRST_COMPLETED)
        # One side closed: close the other as well, as a plain TCP relay would.
        self._close(connection, rst=False)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    toward_target: bool) -> None:
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            try:
                chunk = await reader.read(CHUNK_SIZE)
            except ConnectionError:
                return
            if not chunk:
                return
            mode = self._mode
            if mode.name == "latency":
                await asyncio.sleep(mode.latency_ms / 1000)
            # A chunk read just before a blackhole began is held until it ends.
            await self._flowing.wait()
            try:
                if self._mode.name == "bandwidth":
                    await self._write_throttled(writer, chunk)
                else:
                    writer.write(chunk)
                    await writer.drain()
            except ConnectionError:
                return
            self.stats.bytes_forwarded += len(chunk)
            if toward_target and self._armed:
                self._armed = False
                self._apply_mode(Mode("blackhole"))

    async def _write_throttled(self, writer: asyncio.StreamWriter, chunk: bytes) -> None:
        assert self._flowing is not None
        offset = 0
        while offset < len(chunk):
            await self._flowing.wait()
            rate = self._mode.bytes_per_second if self._mode.name == "bandwidth" else 0
            if rate <= 0:
                writer.write(chunk[offset:])
                await writer.drain()
                return
            size = max(1, int(rate * BANDWIDTH_SLICE_SECONDS))
            piece = chunk[offset:offset + size]
            writer.write(piece)
            await writer.drain()
            offset += len(piece)
            await asyncio.sleep(len(piece) / rate)


def _parse_command(line: str) -> tuple[str, float, int]:
    words = line.split()
    name = words[0]
    value = float(words[1]) if len(words) > 1 else 0.0
    if name == "latency":
        return name, value, 0
    if name == "bandwidth":
        return name, 0.0, int(value)
    return name, 0.0, 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", required=True, metavar="HOST:PORT",
                        help="address to forward every connection to")
    parser.add_argument("--port", type=int, default=0,
                        help="port to listen on at 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    proxy = FaultProxy(host, int(port), listen_port=args.port).start()
    print(f"listening {proxy.port}", flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                name, latency_ms, rate = _parse_command(line)
                proxy.set_mode(name, latency_ms=latency_ms, bytes_per_second=rate)
            except (ValueError, IndexError) as exc:
                print(f"error {exc}", flush=True)
                continue
            print(f"mode {proxy.mode.name}", flush=True)
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
