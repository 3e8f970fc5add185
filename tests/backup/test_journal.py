"""The scratch journal file: durable names of the scratch databases walacord creates."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.backup.conftest import FifoReleaser
from walacord.backup.databases import scratch_name
from walacord.backup.journal import (
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
    assert [p.name for p in journal.path.parent.iterdir()] == [SCRATCH_JOURNAL_NAME]


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
