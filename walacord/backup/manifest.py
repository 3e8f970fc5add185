"""Backup manifests: the JSON file beside each dump that says what it holds and how it
was checked, plus the file naming and durable-write helpers both use.

A dump `<id>.dump` (custom format) or `<id>.sql.gz` (plain SQL, gzip) has its manifest
in `<id>.json`. While pg_dump runs, the dump is written as `.<id>.<ext>.partial`; the
dot prefix and suffix keep a half-written file from ever looking like a backup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from walacord.errors import BackupError

log = logging.getLogger(__name__)

FORMAT_EXTENSIONS = {"custom": "dump", "plain-gzip": "sql.gz"}
PARTIAL_SUFFIX = ".partial"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 1024 * 1024
# Ids become file names with a suffix, and Linux file names end at 255 bytes.
MAX_ID_BYTES = 200
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def safe_name_part(text: str) -> str:
    """Return `text` with every character outside [A-Za-z0-9._-] replaced by "-"."""
    return _UNSAFE_NAME_CHARS.sub("-", text).strip("-") or "unknown"


def backup_id(database: str, host: str, started: datetime) -> str:
    """Return the id `<database>__<host>__<UTC timestamp>` that names the files."""
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    # A database name has at most 63 bytes, but a host name may have 253. The host part
    # is cut so that the id, with a "-N" suffix, stays within MAX_ID_BYTES.
    host_part = safe_name_part(host)[:100].rstrip("-") or "unknown"
    return f"{safe_name_part(database)}__{host_part}__{stamp}"


@dataclass
class CheckResult:
    """The outcome of one verification step."""

    ok: bool
    at: str
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Manifest:
    """What one backup holds: source, versions, timing, size, checksum and checks."""

    id: str
    file: str
    format: str
    database: str
    server_host: str
    server_version: str
    pg_dump_version: str
    started_at: str
    finished_at: str
    duration_seconds: float
    size_bytes: int
    sha256: str
    table_count: int
    # Exact row counts of the largest tables, counted in the dump's own snapshot.
    row_counts: dict[str, int]
    lock_wait_timeout_seconds: float
    list_check: CheckResult | None = None
    checksum_check: CheckResult | None = None
    drill: CheckResult | None = None
    manifest_version: int = MANIFEST_VERSION

    @property
    def verified(self) -> bool:
        """True when the latest list and checksum checks, and any drill, passed."""
        checks_ok = bool(self.list_check and self.list_check.ok
                         and self.checksum_check and self.checksum_check.ok)
        return checks_ok and (self.drill is None or self.drill.ok)

    @property
    def created(self) -> datetime:
        return parse_time(self.finished_at)

    def verified_at(self) -> datetime | None:
        """Return when the latest passing list-and-checksum verification ran."""
        if not self.verified or self.checksum_check is None:
            return None
        return parse_time(self.checksum_check.at)

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self),
                            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw = orjson.loads(data)
        for key in ("list_check", "checksum_check", "drill"):
            if raw.get(key) is not None:
                raw[key] = CheckResult(**raw[key])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})


# --- files ---------------------------------------------------------------------------


def dump_path(directory: Path, backup: str, fmt: str) -> Path:
    return directory / f"{backup}.{FORMAT_EXTENSIONS[fmt]}"


def partial_path(directory: Path, backup: str, fmt: str) -> Path:
    return directory / f".{backup}.{FORMAT_EXTENSIONS[fmt]}{PARTIAL_SUFFIX}"


def manifest_path(directory: Path, backup: str) -> Path:
    return directory / f"{backup}.json"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Flush the directory entry so a rename inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write the manifest through a temp file, fsync and rename; return its path."""
    final = manifest_path(directory, manifest.id)
    temporary = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
    with open(temporary, "wb") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    fsync_directory(directory)
    return final


def read_manifest(directory: Path, backup: str) -> Manifest:
    """Return the manifest of backup `backup`; raise BackupError when it is missing."""
    backup_text = repr(backup) if len(backup) <= 80 else repr(backup[:77] + "...")
    if (backup != safe_name_part(backup) or backup.startswith(".")
            or len(backup.encode()) > MAX_ID_BYTES):
        raise BackupError(f"invalid backup id {backup_text}: run `walacorctl backup list` for ids")
    path = manifest_path(directory, backup)
    try:
        return Manifest.from_json(path.read_bytes())
    except FileNotFoundError:
        raise BackupError(f"backup {backup_text} not found in {directory}; "
                          "run `walacorctl backup list` for ids") from None
    except OSError as exc:
        raise BackupError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise BackupError(f"manifest {path} is invalid: {exc}") from None


def unreadable_manifests(directory: Path) -> list[dict[str, str | None]]:
    """Return the path and error of each manifest in `directory` that cannot be parsed,
    with the path of its dump when one is there (key "dump", else None)."""
    unreadable: list[dict[str, str | None]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            Manifest.from_json(path.read_bytes())
        except (OSError, orjson.JSONDecodeError, TypeError) as exc:
            dumps = [path.with_suffix(f".{extension}")
                     for extension in FORMAT_EXTENSIONS.values()]
            dump = next((str(each) for each in dumps if each.is_file()), None)
            unreadable.append({"path": str(path), "error": str(exc), "dump": dump})
    return unreadable


def scan_manifests(directory: Path) -> list[Manifest]:
    """Return every readable manifest in `directory`, oldest first.

    A manifest that cannot be parsed is logged and skipped rather than hiding the rest.
    """
    manifests = []
    for path in sorted(directory.glob("*.json")):
        try:
            manifests.append(Manifest.from_json(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError, TypeError) as exc:
            log.warning("backup.manifest_invalid", extra={"fields": {
                "path": str(path), "error": str(exc)}})
    manifests.sort(key=lambda m: (m.finished_at, m.id))
    return manifests


# File types other than a regular file, named for error messages.
_SPECIAL_FILE_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"))


def _not_regular(path: Path, mode: int) -> str:
    kind = next((name for test, name in _SPECIAL_FILE_KINDS if test(mode)), "special file")
    return f"backup file {path} is a {kind}, not a regular file"


def dump_file_problem(path: Path) -> str | None:
    """Return why the dump at `path` cannot be read, or None when it is a regular file.

    Only stat() runs, which follows symbolic links and opens nothing, so a FIFO in
    place of the dump cannot block the caller.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"backup file {path} is missing"
    except OSError as exc:
        return f"cannot read backup file {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return _not_regular(path, mode)
    return None


def open_dump(path: Path) -> BinaryIO:
    """Open the dump at `path` for reading; raise BackupError unless it is a regular file.

    O_NONBLOCK makes open() return at once for a FIFO, which then fails the fstat()
    check. So a FIFO put in place after `dump_file_problem` cannot block the thread.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BackupError(_not_regular(path, mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_dump(path: Path) -> BinaryIO:
    """Open the dump at `path` as `open_dump()` does, for a client program's standard
    input. Raise BackupError for a missing or unreadable file too."""
    try:
        return open_dump(path)
    except OSError as exc:
        raise BackupError(f"cannot read backup file {path}: {exc.strerror or exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_dump(path) as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
