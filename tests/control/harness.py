"""Test harness for the control channel: in-process servers, a daemon process, raw clients."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import SocketStream
from prometheus_client import CollectorRegistry

from tests.control.standins import register_test_methods
from walacord.config import Config, ControlConfig
from walacord.control.protocol import PROTOCOL_VERSION
from walacord.control.server import ControlServer
from walacord.metrics import Metrics
from walacord.runtime import Runtime
from walacord.systemd import Notifier

HERE = Path(__file__).parent
PYTHON = sys.executable
WALACORCTL = str(Path(sys.executable).with_name("walacorctl"))


def make_config(socket_path: Path, **control: Any) -> Config:
    control.setdefault("group", "")
    return Config(control=dataclasses.replace(ControlConfig(socket=str(socket_path)), **control))


@asynccontextmanager
async def running_server(config: Config, components: Sequence[Any] = ()) -> AsyncIterator[
        Runtime]:
    """Run a ControlServer (plus `components`) in this event loop until the block ends."""
    registry = CollectorRegistry()
    runtime = Runtime(config=config, config_path=None, registry=registry,
                      metrics=Metrics(registry), notifier=Notifier({}))
    register_test_methods(runtime.methods)
    server = ControlServer(runtime)
    async with anyio.create_task_group() as tg:
        for component in components:
            runtime.components[component.name] = component
            await tg.start(component.run)
        runtime.components[server.name] = server
        await tg.start(server.run)
        runtime.ready.set()
        yield runtime
        tg.cancel_scope.cancel()


class LineClient:
    """A raw protocol client over an anyio stream, for tests that send arbitrary bytes."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.next_id = 0

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      **fields: Any) -> None:
        self.next_id += 1
        document = {"id": self.next_id, "method": method, "params": params or {},
                    "version": PROTOCOL_VERSION, **fields}
        await self.send(orjson.dumps(document) + b"\n")

    async def receive(self, wait: float = 5.0) -> dict[str, Any]:
        """Return the next message within `wait` seconds; raise EOFError on a closed stream."""
        with anyio.fail_after(wait):
            while b"\n" not in self.buffer:
                try:
                    chunk = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    raise EOFError("server closed the connection") from None
                self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        message = orjson.loads(line)
        assert isinstance(message, dict)
        return message

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        await self.request(method, params)
        return await self.receive()

    async def is_closed(self, wait: float = 5.0) -> bool:
        """Return True once the server has closed its side (EOF), within `wait` seconds."""
        with anyio.fail_after(wait):
            try:
                chunk = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        self.buffer += chunk
        return False


async def open_stream(path: Path) -> SocketStream:
    """Connect to `path`; the transport-based stream avoids anyio's UNIXSocketStream race."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return await SocketStream.from_socket(sock)


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[LineClient]:
    stream = await open_stream(path)
    async with stream:
        yield LineClient(stream)


# --- a daemon process with the real supervisor -------------------------------------


class DaemonProcess:
    """`daemon_main.py` in a subprocess; its JSON log lines go to a file."""

    def __init__(self, directory: Path, **control: Any) -> None:
        self.directory = directory
        self.socket = directory / "control.sock"
        self.config_path = directory / "walacord.toml"
        self.log_path = directory / "daemon.log"
        self.write_config(**control)
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, **control: Any) -> None:
        control.setdefault("group", "")
        # A state directory of its own, or daemons of parallel runs contend for the
        # default /var/lib/walacord lock.
        state = self.directory / "state"
        lines = ["[http]", 'listen = ""', "[logging]", 'dir = ""', "[state]",
                 f"dir = {orjson.dumps(str(state)).decode()}", "[control]",
                 f"socket = {str(self.socket)!r}".replace("'", '"')]
        for key, value in control.items():
            lines.append(f"{key} = {orjson.dumps(value).decode()}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [PYTHON, str(HERE / "daemon_main.py"), str(self.config_path)],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while "control.listening" not in self.log_text():
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n"
                                     f"{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start:\n{self.log_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def log_events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_text().splitlines():
            if f'"{event}"' in line:
                document = orjson.loads(line)
                if document.get("event") == event:
                    found.append(document)
        return found

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def walacorctl(*args: str, socket: Path | None = None, timeout: float = 30,
               user: Sequence[str] = (), env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run walacorctl (optionally under `user`, a setpriv prefix) and capture its output."""
    command = [*user, WALACORCTL]
    if socket is not None:
        command += ["--socket", str(socket)]
    environment = {**os.environ, **(env or {})}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env=environment, check=False)
