"""The scratch journal: names of the scratch databases this walacord instance created
and has not yet dropped or renamed into place.

CREATE DATABASE and COMMENT ON DATABASE run as two statements, so a walacord killed
between them leaves a scratch database without its SCRATCH_COMMENT. Its name alone
does not prove walacord created it, but this journal does: the name is written to it,
and the file and its directory are fsynced, before CREATE DATABASE runs. The name is
removed after the database is dropped or renamed into place. Start-up cleanup drops an
uncommented leftover only when this journal names it (see walacord.backup.databases).

The journal is a JSON file in the backups directory:
`{"version": 1, "databases": [NAME, ...]}`. File errors (OSError) and timeouts when
reading or writing it are logged, not raised, because a journal problem must not stop
backups or start-up. A damaged journal is read as empty. Before the next add()
replaces it, it is renamed to `<journal>.damaged-<UTC time>`, so its content stays
for an operator to inspect.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from walacord.backup.databases import (
    DRILL_NAME,
    MAX_IDENTIFIER_BYTES,
    PREVIOUS_NAME,
    RESTORING_NAME,
)
from walacord.backup.manifest import (
    PARTIAL_SUFFIX,
    NotRegularFile,
    _open_regular,
    display_path,
    fsync_directory,
    utc_now,
)

log = logging.getLogger(__name__)

SCRATCH_JOURNAL_NAME = ".scratch-databases"
# Beside the journal: held with flock() for each read-modify-write of the journal.
LOCK_SUFFIX = ".lock"
# Seconds between attempts to take a lock file that another process holds.
LOCK_RETRY_INTERVAL = 0.01
JOURNAL_VERSION = 1
# Each running drill or restore adds one name. A name outlives its database only when
# walacord was killed or a journal write failed, and start-up removes such names. A
# full journal records no more names, so those databases rely on their comment alone.
MAX_JOURNAL_NAMES = 64
# Room for MAX_JOURNAL_NAMES names of 63 bytes even when JSON escapes every byte.
MAX_JOURNAL_BYTES = 64 * 1024


class DamagedJournal(Exception):
    """The journal file exists but is not a journal walacord wrote."""


class JournalLocked(OSError):
    """Another process held the journal's lock file for too long."""


def is_journal_name(name: str) -> bool:
    """Return whether walacord could have journaled `name`: a drill or restore scratch
    name, never the name of a replaced copy."""
    return (0 < len(name.encode()) <= MAX_IDENTIFIER_BYTES
            and (re.search(DRILL_NAME, name) is not None
                 or re.search(RESTORING_NAME, name) is not None)
            and re.search(PREVIOUS_NAME, name) is None)


def parse_journal(data: bytes) -> list[str]:
    """Return the names in a journal file's content; raise DamagedJournal when invalid."""
    if len(data) > MAX_JOURNAL_BYTES:
        raise DamagedJournal(f"it is larger than {MAX_JOURNAL_BYTES} bytes")
    try:
        raw: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedJournal(f"it is not valid JSON: {exc}") from None
    except RecursionError:
        # Deeply nested brackets, which fit well within MAX_JOURNAL_BYTES.
        raise DamagedJournal("it nests arrays or objects too deeply to be a journal"
                             ) from None
    if not isinstance(raw, dict) or raw.get("version") != JOURNAL_VERSION:
        raise DamagedJournal(f"it is not an object with \"version\": {JOURNAL_VERSION}")
    names = raw.get("databases")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DamagedJournal("\"databases\" is not a list of strings")
    if len(names) > MAX_JOURNAL_NAMES:
        raise DamagedJournal(f"it has {len(names)} names, more than {MAX_JOURNAL_NAMES}")
    invalid = [name for name in names if not is_journal_name(name)]
    if invalid:
        raise DamagedJournal(f"{invalid[0]!r} is not a drill or restore scratch database name")
    return list(dict.fromkeys(names))


class ScratchJournal:
    """The journal file at `path`. Its methods log file errors and timeouts instead of
    raising them.

    Each read-modify-write holds a thread lock, for concurrent drills and restores in
    this process, and an flock() on `<journal>.lock`, for other processes that use the
    same backups directory (two daemons configured with the same `[backup] dir`, on one
    host or on a shared file system). Without them, concurrent updates could lose names.
    Waiting for the lock file takes at most half of `time_limit`.
    """

    def __init__(self, path: Path, time_limit: float) -> None:
        self.path = path
        self.time_limit = time_limit  # seconds for each file operation
        self._lock = threading.Lock()
        # Why the last read found no usable journal, or None when it was read.
        self.problem: str | None = None

    async def read(self) -> frozenset[str]:
        """Return the journaled names; an empty set when the file is missing, damaged or
        cannot be read."""
        try:
            names = await self._run(self._read_names)
        except (OSError, TimeoutError) as exc:
            self._log_failure("read", exc)
            self.problem = (f"the scratch journal {display_path(self.path)} cannot be "
                            f"read: {'timed out' if isinstance(exc, TimeoutError) else exc}")
            return frozenset()
        return frozenset(names)

    async def add(self, name: str) -> bool:
        """Write `name` to the journal durably; return False when it was not written.

        A damaged journal is renamed aside first. The name is not written when the
        journal is full or cannot be read, because rewriting it would lose its names.
        """
        try:
            return await self._run(self._add, name)
        except (OSError, TimeoutError) as exc:
            self._log_failure("add", exc, name)
            return False

    async def discard(self, *names: str) -> None:
        """Remove `names` from the journal; names it does not hold are ignored."""
        try:
            await self._run(self._discard, names)
        except (OSError, TimeoutError) as exc:
            self._log_failure("discard", exc, *names)

    async def _run(self, function: Any, *args: Any) -> Any:
        with anyio.fail_after(self.time_limit):
            return await anyio.to_thread.run_sync(function, *args, abandon_on_cancel=True)

    def _log_failure(self, operation: str, error: BaseException, *names: str) -> None:
        text = ("timed out; check the file system of the backups directory"
                if isinstance(error, TimeoutError) else str(error))
        log.warning("backup.scratch_journal_failed", extra={"fields": {
            "path": display_path(self.path), "operation": operation,
            "databases": list(names), "error": text}})

    # --- file operations, run in a worker thread -----------------------------------

    def _load(self) -> list[str]:
        """Return the names in the file; raise DamagedJournal or OSError."""
        try:
            handle = _open_regular(self.path)
        except FileNotFoundError:
            return []
        except NotRegularFile as exc:
            raise DamagedJournal(f"it is a {exc.kind}, not a regular file") from None
        with handle:
            data = handle.read(MAX_JOURNAL_BYTES + 1)
        return parse_journal(data)

    def _read_names(self) -> list[str]:
        with self._lock:
            try:
                names = self._load()
            except DamagedJournal as exc:
                self._log_damaged(exc, None)
                self.problem = (f"the scratch journal {display_path(self.path)} is damaged "
                                f"({exc}), so scratch databases without their comment are "
                                "only listed, not dropped; walacord moves it aside at the "
                                "next drill or restore")
                return []
            self.problem = None
            return names

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the thread lock and the lock file. Raise JournalLocked when another
        process holds the file for half of `time_limit`, which leaves the other half for
        the file operation."""
        wait = self.time_limit / 2
        deadline = time.monotonic() + wait
        lock_path = self.path.with_name(f"{self.path.name}{LOCK_SUFFIX}")
        with self._lock:
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise JournalLocked(
                                f"another process held the lock file "
                                f"{display_path(lock_path)} for {wait:g} s; check for a "
                                "second walacord that uses the same [backup] dir") from None
                        time.sleep(LOCK_RETRY_INTERVAL)
                yield
            finally:
                os.close(descriptor)  # releases the flock

    def _add(self, name: str) -> bool:
        with self._locked():
            try:
                names = self._load()
            except DamagedJournal as exc:
                self._log_damaged(exc, self._move_aside())
                names = []
            if name in names:
                return True
            if len(names) >= MAX_JOURNAL_NAMES:
                log.warning("backup.scratch_journal_full", extra={"fields": {
                    "path": display_path(self.path), "database": name,
                    "max_names": MAX_JOURNAL_NAMES,
                    "action": "start-up cleanup removes the names of databases that no "
                              "longer exist; until then, new scratch databases rely on "
                              "their comment alone"}})
                return False
            self._store([*names, name])
            return True

    def _discard(self, names: tuple[str, ...]) -> None:
        if not os.path.lexists(self.path):
            return  # no journal names nothing, and its directory may be missing too
        with self._locked():
            try:
                stored = self._load()
            except DamagedJournal:
                return  # read as empty: it names nothing to discard
            kept = [name for name in stored if name not in names]
            if len(kept) != len(stored):
                self._store(kept)

    def _store(self, names: list[str]) -> None:
        """Replace the file with `names` through a fsynced temporary file and rename."""
        temporary = self.path.with_name(f"{self.path.name}{PARTIAL_SUFFIX}")
        data = json.dumps({"version": JOURNAL_VERSION, "databases": names}).encode()
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        fsync_directory(self.path.parent)

    def _move_aside(self) -> Path:
        """Rename the damaged file to a free `<name>.damaged-<UTC time>[-N]`; return it."""
        stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        number = 1
        while aside.exists():
            number += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{number}")
        os.rename(self.path, aside)
        fsync_directory(self.path.parent)
        return aside

    def _log_damaged(self, error: DamagedJournal, moved_to: Path | None) -> None:
        fields: dict[str, Any] = {"path": display_path(self.path), "error": str(error)}
        if moved_to is None:
            fields["action"] = ("read as empty, so uncommented scratch databases are not "
                                "dropped; the next drill or restore renames the file aside")
        else:
            fields["moved_to"] = display_path(moved_to)
            fields["action"] = (f"kept as {display_path(moved_to)}; drop the databases it "
                                "names by hand if they are leftovers, then delete it")
        log.error("backup.scratch_journal_damaged", extra={"fields": fields})
