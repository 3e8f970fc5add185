"""A full file system: enqueue gets a clear error, sync keeps running, nothing is lost."""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.conftest import daemon_config, mounted_tmpfs, running_daemon
from tests.outbox.conftest import Alerts, StoreOpener, walacor_op, walacor_rows_per_key
from walacord.config import BackupConfig, StateConfig
from walacord.errors import OutboxDiskFull
from walacord.metrics import Metrics
from walacord.outbox.model import Operation
from walacord.outbox.sinks import BatchResult, WalacorSink
from walacord.outbox.sync import SyncEngine
from walacord.walacor import WalacorClient

pytestmark = pytest.mark.anyio
WALACORCTL = str(Path(sys.executable).parent / "walacorctl")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the state directory."""
    with mounted_tmpfs(tmp_path / "state") as directory:
        yield directory


async def test_enqueue_disk_full_then_resumes(open_store: StoreOpener, small_tmpfs: Path,
                                              alerts: Alerts) -> None:
    path = small_tmpfs / "outbox.db"
    acked: list[str] = []
    async with open_store(path) as store:
        with pytest.raises(OutboxDiskFull) as caught:
            for batch in range(1000):
                keys = [f"fill-{batch}-{i}" for i in range(10)]
                await store.enqueue([walacor_op(key, size=2000) for key in keys])
                acked += keys
        # Smaller enqueues may still fit in the last free pages; fill those too.
        with pytest.raises(OutboxDiskFull):
            for single in range(1000):
                await store.enqueue([walacor_op(f"single-{single}", size=2000)])
                acked.append(f"single-{single}")
        rejected = f"single-{len([k for k in acked if k.startswith('single-')])}"
        full_flag = store.full

        await anyio.run_process(["mount", "-o", "remount,size=8m", str(small_tmpfs)])
        # The store notices the space by itself, before any enqueue.
        with anyio.fail_after(10):
            while store.full:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        resumed_flag = store.full
        await store.enqueue([walacor_op("after-space", size=2000)])
        stats = await store.check_conservation()
        stored = {op.key for op in await store.list(limit=100_000)}

    assert "file system" in str(caught.value)
    assert "is full" in str(caught.value)
    assert len(acked) > 50
    assert full_flag is True
    assert resumed_flag is False
    assert set(acked) <= stored
    assert "after-space" in stored
    assert rejected not in stored
    assert stats.accepted == len(acked) + 1
    assert stats.conserved
    assert alerts.names() == ["outbox_disk_full"]


def fill_disk(directory: Path) -> Path:
    """Write a file in `directory` until its file system has no byte left; return it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (64 * 1024, 4096, 1):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return filler


class DiskFillingSink(WalacorSink):
    """A Walacor sink that fills the state directory's disk before its first batch."""

    def __init__(self, *args: object, directory: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.directory = directory
        self.filler: Path | None = None

    async def apply_batch(self, operations: Sequence[Operation]) -> list[BatchResult]:
        if self.filler is None:
            self.filler = fill_disk(self.directory)
        return await super().apply_batch(operations)


async def test_sync_disk_full_keeps_running(open_store: StoreOpener, small_tmpfs: Path,
                                            walacor_client: WalacorClient,
                                            metrics: Metrics) -> None:
    keys = [f"pay-{i}" for i in range(40)]
    sink = DiskFillingSink(walacor_client, timeout=10, directory=small_tmpfs)
    async with open_store(small_tmpfs / "outbox.db", sync_interval=3600.0,
                          sync_batch_min=40) as store:
        await store.enqueue([walacor_op(key) for key in keys])
        engine = SyncEngine(store, {"walacor": sink}, store.config, metrics=metrics)
        async with anyio.create_task_group() as tasks:
            await tasks.start(engine.run)
            with anyio.fail_after(10):
                failed = await engine.sync_now()
            during = await store.stats()

            # The engine retries on its own after a backoff once space returns.
            assert sink.filler is not None, failed
            sink.filler.unlink()
            with anyio.fail_after(10):
                # The store offers no event for "all done", so poll it.
                while (await store.stats()).done < len(keys):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            with anyio.fail_after(10):
                after = await engine.sync_now()
            stats = await store.check_conservation()
            tasks.cancel_scope.cancel()

    assert failed.error is not None
    assert "the state directory's file system is full" in failed.error
    assert during.in_flight == len(keys)
    assert after.error is None
    assert (stats.done, stats.pending, stats.in_flight, stats.dead) == (40, 0, 0, 0)
    assert stats.conserved
    assert metrics.outbox_store_errors._value.get() >= 1
    counts = await walacor_rows_per_key(walacor_client)
    assert {key: counts[key] for key in keys} == dict.fromkeys(keys, 1)


async def walacorctl(socket: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Run `walacorctl --json ARGS`; return its exit code, JSON output and stderr."""
    result = await anyio.run_process([WALACORCTL, "--socket", str(socket), "--json", *args],
                                     check=False)
    document = orjson.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, document, result.stderr.decode()


@pytest.mark.slow
async def test_daemon_starts_on_full_disk(small_tmpfs: Path, tmp_path: Path,
                                          pg_db: str) -> None:
    config = daemon_config(tmp_path, pg_db, state=StateConfig(dir=str(small_tmpfs)),
                           backup=BackupConfig(enabled=False))
    socket = Path(config.control.socket)
    operation = orjson.dumps({"amount": 1}).decode()
    enqueue = ("enqueue", "--sink", "walacor", "--etid", "10001", "--key", "k-1",
               "--data", operation)
    filler = fill_disk(small_tmpfs)
    async with running_daemon(config):
        rejected = await walacorctl(socket, *enqueue)
        # Polling: the mode and the store's reopening have no event a client can wait on.
        with anyio.fail_after(20):
            while (status := await walacorctl(socket, "status"))[1].get("mode") != "emergency":  # noqa: ASYNC110
                await anyio.sleep(0.2)
        filler.unlink()
        # Without any enqueue, the store opens and the mode leaves emergency.
        with anyio.fail_after(20):
            while (await walacorctl(socket, "status"))[1].get("mode") == "emergency":  # noqa: ASYNC110
                await anyio.sleep(0.2)
        with anyio.fail_after(20):
            while (accepted := await walacorctl(socket, *enqueue))[0] != 0:  # noqa: ASYNC110
                await anyio.sleep(0.5)
        _, stats, _ = await walacorctl(socket, "outbox", "stats")

    error = rejected[1]["error"]
    assert rejected[0] != 0
    assert error["data"]["reason"] == "disk_full"
    assert "No space left on device" in error["message"]
    assert str(small_tmpfs) in error["message"]
    assert "file system" in status[1]["reason"]
    assert accepted[1]["key"] == "k-1"
    assert stats["accepted"] == 1
    assert stats["disk_full"] is False


@pytest.fixture
def read_only_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs as the state directory."""
    with mounted_tmpfs(tmp_path / "read-only", "ro,size=1m") as directory:
        yield directory


@pytest.mark.slow
async def test_daemon_starts_on_read_only_state_dir(read_only_tmpfs: Path, tmp_path: Path,
                                                   pg_db: str) -> None:
    # Backups stay on: their default directory, <state dir>/backups, cannot be created.
    config = daemon_config(tmp_path, pg_db, state=StateConfig(dir=str(read_only_tmpfs)))
    socket = Path(config.control.socket)
    async with running_daemon(config):
        rejected = await walacorctl(socket, "enqueue", "--sink", "walacor", "--etid", "10001",
                                    "--key", "k-1", "--data", "{}")
        with anyio.fail_after(20):
            while (status := await walacorctl(socket, "status"))[1].get("mode") != "emergency":  # noqa: ASYNC110
                await anyio.sleep(0.2)

    error = rejected[1]["error"]
    assert rejected[0] != 0
    assert error["data"]["reason"] == "state_dir_unusable"
    assert "Read-only file system" in error["message"]
    assert "[state] dir" in error["message"]
    assert "[state] dir" in status[1]["reason"]
