"""Backup manifests: the JSON file beside each dump that says what it holds and how it
was checked, plus the file naming and durable-write helpers both use.

A dump `<id>.dump` (custom format) or `<id>.sql.gz` (plain SQL, gzip) has its manifest
in `<id>.json`. While pg_dump runs, the dump is written as `.<id>.<ext>.partial`; the
dot prefix and suffix keep a half-written file from ever looking like a backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shlex
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from walacord.backup.space import disk_full_advice, is_disk_full
from walacord.errors import BackupError
from walacord.terminal import CONTROL_CHARACTERS, shorten

log = logging.getLogger(__name__)

FORMAT_EXTENSIONS = {"custom": "dump", "plain-gzip": "sql.gz"}
PARTIAL_SUFFIX = ".partial"
MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 1024 * 1024
# Ids become file names with a suffix, and Linux file names end at 255 bytes.
MAX_ID_BYTES = 200
# The largest value of a signed 64-bit integer: a file size (off_t) or a row count
# (bigint) cannot be larger.
MAX_INT64 = 2**63 - 1
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
ID_RULE = (f"an id has only the characters A-Z, a-z, 0-9, '.', '_' and '-', does not start "
           f"with '.' and has at most {MAX_ID_BYTES} bytes")


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def safe_name_part(text: str) -> str:
    """Return `text` with every character outside [A-Za-z0-9._-] replaced by "-"."""
    return _UNSAFE_NAME_CHARS.sub("-", text).strip("-") or "unknown"


def is_valid_id(backup: str) -> bool:
    """Return whether `backup` can be a backup id; see ID_RULE."""
    return (backup == safe_name_part(backup) and not backup.startswith(".")
            and len(backup.encode()) <= MAX_ID_BYTES)


def backup_id(database: str, host: str, started: datetime) -> str:
    """Return the id `<database>__<host>__<UTC timestamp>` that names the files.

    A database part that would start with "." gets a "_" in front. A file whose name
    starts with "." is hidden from `ls` and from shell patterns such as `*.dump`, so
    a copy made with them would silently leave the backup behind.
    """
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    database_part = safe_name_part(database)
    if database_part.startswith("."):
        database_part = f"_{database_part}"
    # A database name has at most 63 bytes, but a host name may have 253. The host part
    # is cut so that the id, with a "-N" suffix, stays within MAX_ID_BYTES.
    host_part = safe_name_part(host)[:100].rstrip("-") or "unknown"
    return f"{database_part}__{host_part}__{stamp}"


def display_path(path: Path | str) -> str:
    """Return `path` as valid UTF-8 text for messages, responses and log fields.

    Python decodes file-name bytes that are not UTF-8 to lone surrogates, which JSON
    encoders reject. Here such bytes appear as `\\xNN` instead, so the text may name no
    existing file.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
        """True when the latest list and checksum checks passed, and so did the drill
        unless there is none or it is stale (see `drill_stale`)."""
        checks_ok = bool(self.list_check and self.list_check.ok
                         and self.checksum_check and self.checksum_check.ok)
        return checks_ok and (self.drill is None or self.drill.ok or self.drill_stale)

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
    def from_json(cls, data: bytes, backup: str) -> Manifest:
        """Parse the manifest of backup `backup`, the name of its file without ".json".

        Raise InvalidManifest when `data` is not JSON, a field is missing or has the
        wrong type, or the id, format and dump name are not the ones walacord writes.
        """
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidManifest(f"not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidManifest(f"the file contains a JSON {_json_type(raw)}, expected an "
                                  "object")
        # A newer version may change any other field, so the version is checked first.
        values: dict[str, Any] = {}
        if "manifest_version" in raw:
            values["manifest_version"] = _checked_version(raw)
        for name, kind in _FIELD_TYPES.items():
            values[name] = _checked_field(raw, name, kind)
        for name in _COUNT_FIELDS:
            _check_count(name, values[name])
        for name in _DURATION_FIELDS:
            if values[name] < 0:
                raise InvalidManifest(f"field {name!r} is {_json_text(raw[name])}, expected "
                                      "a number of at least 0")
        values["row_counts"] = _checked_row_counts(raw)
        for name in ("list_check", "checksum_check", "drill"):
            values[name] = _checked_result(raw, name)
        for name in ("started_at", "finished_at"):
            _check_time(name, values[name])
        _check_names(values, backup)
        return cls(**values)

    def drill_sha256(self) -> str | None:
        """Return the sha256 of the file the drill tested, or None when it is unknown.

        Drills store it in their detail. An older drill that created its scratch
        database had found the manifest's sha256, since a drill restores nothing
        after a mismatch.
        """
        if self.drill is None:
            return None
        recorded = self.drill.detail.get("sha256")
        if isinstance(recorded, str):
            return recorded
        if self.drill.detail.get("scratch") is not None:
            return self.sha256
        return None

    @property
    def drill_stale(self) -> bool:
        """True when a checksum check after the drill found other file content.

        A stale drill describes bytes the file no longer has, so it does not decide
        whether the backup is verified. When the drill's sha256 is unknown (it could not
        read the file, or it ran before drills stored one and stopped at a checksum
        mismatch), a later checksum check that passed makes it stale.
        """
        drill, checksum = self.drill, self.checksum_check
        if drill is None or checksum is None or parse_time(checksum.at) < parse_time(drill.at):
            return False
        tested = self.drill_sha256()
        if tested is None:
            return checksum.ok
        if self.size_changed:
            # The drill hashed the file, so the file had the manifest's size then.
            return True
        current = checksum.detail.get("sha256")
        return isinstance(current, str) and current != tested

    @property
    def size_changed(self) -> bool:
        """True when the latest checksum check found a size other than the manifest's.

        Such a check hashes nothing, and `verify` then skips the readability check.
        """
        checksum = self.checksum_check
        return checksum is not None and not checksum.ok and "size_bytes" in checksum.detail

    @property
    def list_stale(self) -> bool:
        """True when a checksum check after the readability check found another size, so
        the readability check read bytes the file no longer has."""
        listing, checksum = self.list_check, self.checksum_check
        return (listing is not None and checksum is not None and self.size_changed
                and parse_time(checksum.at) >= parse_time(listing.at))


class InvalidManifest(ValueError):
    """A manifest that is not valid JSON or does not have the shape walacord writes."""


_FIELD_TYPES: dict[str, type] = {
    "id": str, "file": str, "format": str, "database": str, "server_host": str,
    "server_version": str, "pg_dump_version": str, "started_at": str, "finished_at": str,
    "duration_seconds": float, "size_bytes": int, "sha256": str, "table_count": int,
    "lock_wait_timeout_seconds": float,
}
_COUNT_FIELDS = ("size_bytes", "table_count")
_DURATION_FIELDS = ("duration_seconds", "lock_wait_timeout_seconds")
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "an object"}


def _json_type(value: Any) -> str:
    """Return the JSON name of the type of a value that orjson parsed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _json_text(value: Any) -> str:
    """Return `value` as JSON for an error message, cut to 300 characters, which leaves
    file names built from ids of MAX_ID_BYTES whole."""
    return shorten(orjson.dumps(value).decode(), 300)


def _has_type(value: Any, kind: type) -> bool:
    # bool is a subclass of int in Python, but true and false are not numbers in JSON.
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _checked_field(raw: dict[str, Any], name: str, kind: type, *,
                   label: str | None = None) -> Any:
    """Return `raw[name]`; raise InvalidManifest, naming the field as `label` (default
    `name`), when it is missing or not of `kind`."""
    label = label or name
    if name not in raw:
        raise InvalidManifest(f"field {label!r} is missing")
    value = raw[name]
    if not _has_type(value, kind):
        raise InvalidManifest(f"field {label!r} is {_json_text(value)}, expected "
                              f"{_TYPE_NAMES[kind]}")
    return float(value) if kind is float else value


def _checked_version(raw: dict[str, Any]) -> int:
    version: int = _checked_field(raw, "manifest_version", int)
    if version > MANIFEST_VERSION:
        raise InvalidManifest(f"field 'manifest_version' is {version}: a newer walacord "
                              "wrote this manifest, and this one reads versions up to "
                              f"{MANIFEST_VERSION}; upgrade walacord to use the backup")
    if version < 1:
        raise InvalidManifest(f"field 'manifest_version' is {version}, expected an integer "
                              f"from 1 to {MANIFEST_VERSION}")
    return version


def _check_count(name: str, value: int) -> None:
    if not 0 <= value <= MAX_INT64:
        raise InvalidManifest(f"field {name!r} is {value}, expected an integer from 0 to "
                              f"{MAX_INT64}")


def _checked_row_counts(raw: dict[str, Any]) -> dict[str, int]:
    counts = _checked_field(raw, "row_counts", dict)
    for table, count in counts.items():
        if not _has_type(count, int):
            raise InvalidManifest(f"field 'row_counts' has {_json_text(count)} for table "
                                  f"{table!r}, expected an integer")
        if not 0 <= count <= MAX_INT64:
            raise InvalidManifest(f"field 'row_counts' has {count} for table {table!r}, "
                                  f"expected an integer from 0 to {MAX_INT64}")
    return dict(counts)


def _checked_result(raw: dict[str, Any], name: str) -> CheckResult | None:
    """Return the check result stored under `name`, or None when there is none."""
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidManifest(f"field {name!r} is {_json_text(value)}, expected an object "
                              "or null")
    ok = _checked_field(value, "ok", bool, label=f"{name}.ok")
    at = _checked_field(value, "at", str, label=f"{name}.at")
    _check_time(f"{name}.at", at)
    detail = value.get("detail", {})
    if not isinstance(detail, dict):
        raise InvalidManifest(f"field '{name}.detail' is {_json_text(detail)}, expected "
                              "an object")
    error = value.get("error")
    if error is not None and not isinstance(error, str):
        raise InvalidManifest(f"field '{name}.error' is {_json_text(error)}, expected a "
                              "string or null")
    return CheckResult(ok=ok, at=at, detail=detail, error=error)


def _check_time(name: str, text: str) -> None:
    try:
        parse_time(text)
    except (ValueError, OverflowError):
        raise InvalidManifest(f"field {name!r} is {_json_text(text)}, expected an ISO 8601 "
                              "time such as \"2026-01-05T02:30:12.345Z\"") from None


def _check_names(values: dict[str, Any], backup: str) -> None:
    """Raise InvalidManifest unless the format is known and the id and dump name are the
    ones walacord derives from the manifest's file name `<backup>.json`.

    The dump is opened as `<backups dir>/<file>`, so a `file` with "/" or ".." would
    make verify and restore read a file outside the backups directory.
    """
    fmt = values["format"]
    if fmt not in FORMAT_EXTENSIONS:
        known = ", ".join(_json_text(name) for name in FORMAT_EXTENSIONS)
        raise InvalidManifest(f"field 'format' is {_json_text(fmt)}, expected one of {known}")
    if values["id"] != backup:
        raise InvalidManifest(f"field 'id' is {_json_text(values['id'])}, expected "
                              f"{_json_text(backup)}, the manifest's file name without "
                              "\".json\"")
    if not is_valid_id(backup):
        raise InvalidManifest(f"field 'id' is {_json_text(backup)}, which is not a backup "
                              f"id: {ID_RULE}")
    expected = f"{backup}.{FORMAT_EXTENSIONS[fmt]}"
    if values["file"] != expected:
        raise InvalidManifest(f"field 'file' is {_json_text(values['file'])}, expected "
                              f"{_json_text(expected)}: the dump of a {fmt} backup is "
                              "named after its id, inside the backups directory")


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
    """Write the manifest through a temp file, fsync and rename; return its path.

    The temp file is removed when writing it fails. A full file system raises
    BackupError with what to do, and other errors raise OSError.
    """
    final = manifest_path(directory, manifest.id)
    temporary = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise BackupError(f"cannot write the manifest of backup {manifest.id}: "
                              f"{exc.strerror}. {disk_full_advice(directory)}") from exc
        raise
    fsync_directory(directory)
    return final


def find_dump(directory: Path, backup: str) -> Path | None:
    """Return the dump of backup `backup` found by its name alone, or None when no
    regular file has that name. It needs no manifest, so it works for a damaged one."""
    dumps = (dump_path(directory, backup, fmt) for fmt in FORMAT_EXTENSIONS)
    return next((path for path in dumps if path.is_file()), None)


def shell_word(path: Path | str) -> str:
    """Return `path` quoted as one word for bash, so that a printed command runs as shown.

    A valid UTF-8 path is quoted for any POSIX shell. Other bytes have no text form, and
    control characters must not reach a terminal, so such a path becomes bash's `$'...'`
    quoting with `\\xNN` escapes, which bash, zsh and ksh turn back into the same bytes.
    """
    raw = os.fsencode(path)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None and CONTROL_CHARACTERS.search(text) is None:
        return shlex.quote(text)
    # Control characters are escaped too, so that printing the command cannot send a
    # terminal escape sequence.
    escaped = (chr(byte) if 0x20 <= byte < 0x7f and byte not in b"'\\" else f"\\x{byte:02x}"
               for byte in raw)
    return f"$'{''.join(escaped)}'"


def manual_restore_command(dump: Path | str) -> str:
    """Return the shell command that loads `dump` into an empty database NEW_DB."""
    quoted = shell_word(dump)
    if os.fsencode(dump).endswith(f".{FORMAT_EXTENSIONS['plain-gzip']}".encode()):
        return f"gzip -dc {quoted} | psql -X -v ON_ERROR_STOP=1 --dbname=NEW_DB"
    return f"pg_restore --exit-on-error --dbname=NEW_DB {quoted}"


def manual_restore_advice(dump: Path | str, command: str | None = None) -> str:
    """Return how to restore `dump` by hand when its manifest cannot be read.

    `command` is the one `manual_restore_command` returned for the real path. Pass it
    when `dump` is already display text (see `display_path`), whose `\\xNN` escapes
    may stand for bytes that are not UTF-8.
    """
    load = command or manual_restore_command(dump)
    return (f"its dump {display_path(dump)} is still there, but walacord cannot check it "
            f"without the manifest. To use it anyway, create an empty database NEW_DB and "
            f"run: {load}")


def load_manifest(path: Path) -> Manifest:
    """Read and parse the manifest at `path`, named `<id>.json`.

    Raise OSError when it cannot be read, and InvalidManifest when it is damaged, is
    not a regular file or has a file name that is not UTF-8.
    """
    try:
        path.name.encode()
    except UnicodeEncodeError:
        raise InvalidManifest("the file name is not valid UTF-8, but backup ids are ASCII; "
                              "rename or remove the file") from None
    return Manifest.from_json(read_manifest_bytes(path), path.name.removesuffix(".json"))


def read_manifest_bytes(path: Path) -> bytes:
    """Return the content of the manifest at `path`.

    Raise InvalidManifest when it is not a regular file, and OSError when it cannot be
    read. Like `open_dump()`, this never blocks on a FIFO.
    """
    try:
        handle = _open_regular(path)
    except NotRegularFile as exc:
        raise InvalidManifest(f"the file is a {exc.kind}, not a regular file") from None
    with handle:
        return handle.read()


def read_manifest(directory: Path, backup: str) -> Manifest:
    """Return the manifest of backup `backup`; raise BackupError when it is missing or
    damaged. The error for a damaged one names the dump when it is there."""
    backup_text = repr(shorten(backup, 80))
    if not is_valid_id(backup):
        raise BackupError(f"invalid backup id {backup_text}: run `walacorctl backup list` for ids")
    path = manifest_path(directory, backup)
    try:
        return load_manifest(path)
    except FileNotFoundError:
        dump = find_dump(directory, backup)
        if dump is None:
            raise BackupError(f"backup {backup_text} not found in {display_path(directory)}; "
                              "run `walacorctl backup list` for ids") from None
        raise BackupError(f"backup {backup_text} has no manifest {display_path(path)}; "
                          f"{manual_restore_advice(dump)}") from None
    except OSError as exc:
        problem = f"cannot read manifest {display_path(path)}: {exc.strerror or exc}"
    except InvalidManifest as exc:
        problem = f"manifest {display_path(path)} is invalid: {exc}"
    advice = "restore the manifest from a copy, or take a new backup"
    dump = find_dump(directory, backup)
    if dump is not None:
        advice += f"; {manual_restore_advice(dump)}"
    raise BackupError(f"{problem}; {advice}")


def dumps_without_manifest(directory: Path) -> list[str]:
    """Return the paths of dumps in `directory` that have no manifest file.

    walacord writes the manifest before it renames the dump into place, so such a dump
    comes from outside: a manifest deleted by hand, or files copied in.
    """
    found = []
    for extension in FORMAT_EXTENSIONS.values():
        for dump in sorted(directory.glob(f"*.{extension}")):
            backup = dump.name[:-len(extension) - 1]
            if dump.is_file() and not manifest_path(directory, backup).exists():
                found.append(display_path(dump))
    return found


def restore_commands(directory: Path, dumps: Collection[str]) -> dict[str, str]:
    """Return `manual_restore_command` for each dump in `directory` whose display path
    (see `display_path`) is in `dumps`, keyed by that display path.

    The command is built from the real file name, so it runs as printed also when the
    name is not UTF-8 and its display path shows `\\xNN` escapes.
    """
    commands = {}
    for extension in FORMAT_EXTENSIONS.values():
        for dump in directory.glob(f"*.{extension}"):
            shown = display_path(dump)
            if shown in dumps:
                commands[shown] = manual_restore_command(dump)
    return commands


def unreadable_manifests(directory: Path) -> list[dict[str, str | None]]:
    """Return the path and error of each manifest in `directory` that cannot be read or
    is invalid, with the path of its dump when one is there (key "dump", else None)."""
    unreadable: list[dict[str, str | None]] = []
    for path in sorted(directory.glob("*.json")):
        try:
            load_manifest(path)
        except (OSError, InvalidManifest) as exc:
            dump = find_dump(directory, path.name.removesuffix(".json"))
            unreadable.append({"path": display_path(path), "error": str(exc),
                               "dump": None if dump is None else display_path(dump)})
    return unreadable


def scan_manifests(directory: Path) -> list[Manifest]:
    """Return every readable manifest in `directory`, oldest first.

    A manifest that cannot be read or is invalid is logged and skipped rather than
    hiding the rest.
    """
    manifests = []
    for path in sorted(directory.glob("*.json")):
        try:
            manifests.append(load_manifest(path))
        except (OSError, InvalidManifest) as exc:
            log.warning("backup.manifest_invalid", extra={"fields": {
                "path": display_path(path), "error": str(exc)}})
    manifests.sort(key=lambda m: (m.finished_at, m.id))
    return manifests


# File types other than a regular file, named for error messages.
_SPECIAL_FILE_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"))


def _file_kind(mode: int) -> str:
    return next((name for test, name in _SPECIAL_FILE_KINDS if test(mode)), "special file")


def _not_regular(path: Path, mode: int) -> str:
    return f"backup file {display_path(path)} is a {_file_kind(mode)}, not a regular file"


class NotRegularFile(Exception):
    """A file that walacord reads is a FIFO, directory, device or socket."""

    def __init__(self, mode: int) -> None:
        super().__init__(_file_kind(mode))
        self.mode = mode
        self.kind = _file_kind(mode)


def _open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading; raise NotRegularFile unless it is a regular file.

    stat() runs first, so a device is never opened. O_NONBLOCK makes open() return at
    once for a FIFO put in place after the stat(), which then fails the fstat() check.
    So a FIFO cannot block the thread.
    """
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def dump_file_problem(path: Path) -> str | None:
    """Return why the dump at `path` cannot be read, or None when it is a regular file.

    Only stat() runs, which follows symbolic links and opens nothing, so a FIFO in
    place of the dump cannot block the caller.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"backup file {display_path(path)} is missing"
    except OSError as exc:
        return f"cannot read backup file {display_path(path)}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return _not_regular(path, mode)
    return None


def open_dump(path: Path) -> BinaryIO:
    """Open the dump at `path` for reading; raise BackupError unless it is a regular file.

    A FIFO put in place after `dump_file_problem` cannot block the thread, as
    `_open_regular` explains.
    """
    try:
        return _open_regular(path)
    except NotRegularFile as exc:
        raise BackupError(_not_regular(path, exc.mode)) from None


def read_dump(path: Path) -> BinaryIO:
    """Open the dump at `path` as `open_dump()` does, for a client program's standard
    input. Raise BackupError for a missing or unreadable file too."""
    try:
        return open_dump(path)
    except OSError as exc:
        raise BackupError(f"cannot read backup file {display_path(path)}: "
                          f"{exc.strerror or exc}") from None


class SizeMismatch(Exception):
    """A dump whose size differs from the size its manifest records."""

    def __init__(self, size_bytes: int, manifest_size_bytes: int) -> None:
        super().__init__(f"size is {size_bytes} bytes, the manifest records "
                         f"{manifest_size_bytes} bytes")
        self.size_bytes = size_bytes
        self.manifest_size_bytes = manifest_size_bytes


def check_open_size(handle: BinaryIO, expected_size: int | None) -> None:
    """Raise SizeMismatch when the open file's size differs from `expected_size`.

    fstat() reads the size of the file that is open, so a file renamed into place
    after the open cannot pass the check in place of the one that is read.
    """
    if expected_size is None:
        return
    size = os.fstat(handle.fileno()).st_size
    if size != expected_size:
        raise SizeMismatch(size, expected_size)


def sha256_file(path: Path, expected_size: int | None = None) -> str:
    """Return the sha256 of the dump at `path`.

    With `expected_size`, a file of another size raises SizeMismatch before any byte
    is read, because hashing a replaced, oversized file can take minutes.
    """
    digest = hashlib.sha256()
    with open_dump(path) as handle:
        check_open_size(handle, expected_size)
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
