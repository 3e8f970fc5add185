"""The scratch journal file: durable names of the scratch databases walacord creates."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
from pathlib import Path

import anyio
import pytest

from tests.backup.conftest import FifoReleaser
from walacord.backup.databases import scratch_name
from walacord.backup.journal import (
    LOCK_SUFFIX,
    MAX_JOURNAL_BYTES,
    MAX_JOURNAL_NAMES,
    SCRATCH_JOURNAL_NAME,
    ScratchJournal,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def journal(tmp_path: Path) -> ScratchJournal:
    return ScratchJournal(tmp_path / SCRATCH_JOURNAL_NAME, 5.0)


def stored_names(journal: ScratchJournal) -> list[str]:
    return list(json.loads(journal.path.read_bytes())["databases"])


def damage_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "backup.scratch_journal_damaged"]


async def test_journal_adds_and_discards(journal: ScratchJournal) -> None:
    drill = scratch_name("walacord_drill_app")
    restoring = scratch_name("app", "restoring")

    assert await journal.add(drill)
    assert await journal.add(restoring)
    assert await journal.add(drill)
    assert stored_names(journal) == [drill, restoring]
    assert await journal.read() == {drill, restoring}

    await journal.discard(drill, "never_added_restoring_0123abcd")

    assert stored_names(journal) == [restoring]
    assert sorted(p.name for p in journal.path.parent.iterdir()) == [
        SCRATCH_JOURNAL_NAME, f"{SCRATCH_JOURNAL_NAME}{LOCK_SUFFIX}"]


async def test_missing_journal_reads_empty(journal: ScratchJournal,
                                           caplog: pytest.LogCaptureFixture) -> None:
    assert await journal.read() == frozenset()
    await journal.discard(scratch_name("app", "restoring"))

    assert not journal.path.exists()
    assert caplog.records == []


async def test_full_journal_adds_nothing(journal: ScratchJournal,
                                         caplog: pytest.LogCaptureFixture) -> None:
    names = [scratch_name("app", "restoring") for _ in range(MAX_JOURNAL_NAMES)]
    for name in names:
        assert await journal.add(name)

    assert not await journal.add(scratch_name("app", "restoring"))

    assert stored_names(journal) == names
    assert [r.getMessage() for r in caplog.records] == ["backup.scratch_journal_full"]


DAMAGED_CONTENTS = {
    "not JSON": b"walacord_drill_app_0123abcd\n",
    "not UTF-8": b"\xff\xfe\x00",
    "other version": b'{"version": 2, "databases": []}',
    "names not strings": b'{"version": 1, "databases": [1]}',
    "previous copy": b'{"version": 1, "databases": ["app_previous_0123abcd"]}',
    "other database": b'{"version": 1, "databases": ["app"]}',
    "too large": b'{"version": 1, "databases": []}' + b" " * MAX_JOURNAL_BYTES,
    "nested too deeply": b"[" * 32000 + b"]" * 32000,
}


@pytest.mark.parametrize("content", DAMAGED_CONTENTS.values(), ids=DAMAGED_CONTENTS.keys())
async def test_damaged_journal_reads_empty(journal: ScratchJournal, content: bytes,
                                           caplog: pytest.LogCaptureFixture) -> None:
    journal.path.write_bytes(content)

    assert await journal.read() == frozenset()
    await journal.discard("app_restoring_0123abcd")

    assert journal.path.read_bytes() == content
    assert len(damage_records(caplog)) == 1


async def test_damaged_journal_moved_aside_on_add(journal: ScratchJournal,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    content = b'{"version": 1, "databases": ["app_restoring_0123abcd", "app"]}'
    journal.path.write_bytes(content)
    name = scratch_name("app", "restoring")

    assert await journal.add(name)

    assert stored_names(journal) == [name]
    [aside] = journal.path.parent.glob(f"{SCRATCH_JOURNAL_NAME}.damaged-*")
    assert aside.read_bytes() == content
    [record] = damage_records(caplog)
    assert record.fields["moved_to"] == str(aside)  # type: ignore[attr-defined]


async def test_second_damaged_journal_keeps_first(journal: ScratchJournal) -> None:
    for content in (b"first", b"second"):
        journal.path.write_bytes(content)
        assert await journal.add(scratch_name("app", "restoring"))

    asides = sorted(journal.path.parent.glob(f"{SCRATCH_JOURNAL_NAME}.damaged-*"))
    assert sorted(p.read_bytes() for p in asides) == [b"first", b"second"]


async def test_journal_fifo_does_not_block(journal: ScratchJournal,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with FifoReleaser(journal.path) as releaser:
        assert await journal.read() == frozenset()
        assert releaser.released == 0
    assert len(damage_records(caplog)) == 1


async def test_unwritable_journal_is_logged(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    journal = ScratchJournal(tmp_path / "missing" / SCRATCH_JOURNAL_NAME, 5.0)

    assert not await journal.add(scratch_name("app", "restoring"))

    [record] = caplog.records
    assert record.getMessage() == "backup.scratch_journal_failed"
    assert record.fields["operation"] == "add"  # type: ignore[attr-defined]


# Adds and discards names in the journal at argv[1]; each process its own names.
HAMMER = """
import sys, anyio
from pathlib import Path
from walacord.backup.databases import scratch_name
from walacord.backup.journal import ScratchJournal
journal = ScratchJournal(Path(sys.argv[1]), 30.0)
async def main():
    for index in range(40):
        name = scratch_name(f"app{sys.argv[2]}x{index}", "restoring")
        assert await journal.add(name), name
        if index % 2:
            await journal.discard(name)
anyio.run(main)
"""


async def test_processes_do_not_lose_names(journal: ScratchJournal) -> None:
    """Two processes that update one journal at once keep every name the other added.
    Each update reads, changes and replaces the file, so without the lock file a name
    written between another process's read and its replace would be lost."""
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for writer in "ab":
                group.start_soon(lambda w=writer: anyio.run_process(
                    [sys.executable, "-c", HAMMER, str(journal.path), w],
                    env=environment, stdout=None, stderr=None))

    names = stored_names(journal)
    assert sorted(name.split("_restoring")[0] for name in names) == sorted(
        f"app{writer}x{index}" for writer in "ab" for index in range(0, 40, 2))


async def test_held_lock_file_fails_add_with_reason(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture
                                                    ) -> None:
    """A lock file that someone else holds fails the add after half the time limit, and
    the log names the lock file and what to check. The add works once it is released."""
    journal = ScratchJournal(tmp_path / SCRATCH_JOURNAL_NAME, 0.4)
    lock_path = tmp_path / f"{SCRATCH_JOURNAL_NAME}{LOCK_SUFFIX}"
    # flock() locks belong to an open file description, so this one conflicts with the
    # journal's own open() of the file as another process's would.
    held = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not await journal.add(scratch_name("app", "restoring"))
    finally:
        os.close(held)

    [record] = caplog.records
    assert record.fields["error"] == (  # type: ignore[attr-defined]
        f"another process held the lock file {lock_path} for 0.2 s; check for a second "
        "walacord that uses the same [backup] dir")
    assert await journal.add(scratch_name("app", "restoring"))
