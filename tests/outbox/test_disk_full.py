"""Enqueue on a full file system: a clear error, nothing lost, resumes with space."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.outbox.conftest import Alerts, StoreOpener, walacor_op
from walacord.errors import OutboxDiskFull

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the state directory; skipped where mounting is not allowed."""
    directory = tmp_path / "state"
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


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
        await store.enqueue([walacor_op("after-space", size=2000)])
        resumed_flag = store.full
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
