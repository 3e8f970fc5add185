"""Structured JSON logs that never block the event loop and never carry a secret.

Callers log a dotted event name with fields:

    log.warning("probe.failed", extra={"fields": {"probe": "database", "reason": "timeout"}})

A `QueueHandler` hands records to a writer thread, which formats each as one JSON
object per line (orjson) and writes it to stderr for journald and to the files in
`[logging] dir`. Files are reopened when logrotate moves them and on SIGUSR1.
Identical warnings and errors are collapsed: the first of a run is written, repeats
within `repeat_window` are counted, and the next line after the window carries the count.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from walacord.terminal import utf8_document, utf8_text

ALERT_LOGGER = "walacord.alerts"
PERFORMANCE_LOGGER = "walacord.performance"
MAIN_FILE = "walacor_integrity.log"
ERROR_FILE = "walacor_integrity_errors.log"
ALERT_FILE = "alerts.log"
PERFORMANCE_FILE = "performance.log"

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "fields", "message", "asctime", "taskName"}
_VOLATILE_FIELDS = ("latency", "duration", "elapsed", "attempt", "seconds", "_ms", "since")

# --- redaction ------------------------------------------------------------------

_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/\s:@\"']+:)(?P<secret>[^@\s\"']+)(?=@)", re.IGNORECASE)
_KV_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|sslpassword)\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|[^\s\"',;&]+)",
    re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
_JSON_SECRET = re.compile(
    r'(?P<head>\\?"(?:password|api_token|token|authorization|secret|userPassword)\\?"\s*:\s*\\?")'
    r'(?P<secret>(?:[^"\\]|\\.)*?)(?=\\?")',
    re.IGNORECASE)
_HEADER_SECRET = re.compile(
    r"(?P<head>\bAuthorization\s*:\s*)(?P<secret>[^\s,\"']+(?:\s+[^\s,\"']+)?)", re.IGNORECASE)


# Loggers of libraries that report routine traffic at INFO.
QUIET_LIBRARIES = ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access")


class Redactor:
    """Replace secrets in text: configured values plus passwords and tokens by pattern."""

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()

    def set_secrets(self, values: Iterable[str]) -> None:
        expanded: set[str] = set()
        for value in values:
            if value and len(value) >= 3:
                expanded.add(value)
                expanded.add(orjson.dumps(value).decode()[1:-1])
        # Sorted by length, descending, so a secret that contains another is replaced whole.
        self._values = tuple(sorted(expanded, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, "***")
        for pattern in (_URL_PASSWORD, _KV_PASSWORD, _JSON_SECRET, _HEADER_SECRET, _BEARER):
            text = pattern.sub(lambda m: m.group("head") + "***", text)
        return text


redact = Redactor()


# --- formatting -----------------------------------------------------------------


def _default(value: object) -> object:
    if isinstance(value, Path | BaseException):
        return utf8_text(str(value))
    if isinstance(value, set | frozenset | tuple):
        return utf8_document(list(value))
    return utf8_text(repr(value))


def _event_name(record: logging.LogRecord) -> tuple[str, str | None]:
    """Return (event, message): our loggers log a dotted event, libraries log prose."""
    message = record.getMessage()
    if " " not in message and "." in message and record.name.startswith("walacord"):
        return message, None
    return record.name + ".message", message


class JsonFormatter(logging.Formatter):
    """Format a record as one redacted JSON object with ts, level, event, logger, fields."""

    def format(self, record: logging.LogRecord) -> str:
        event, message = _event_name(record)
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": event,
            "logger": record.name,
        }
        if message is not None:
            document["message"] = message
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                document.setdefault(key, value)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                document.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            document["error_type"] = type(exc).__name__
            document["error"] = str(exc)
            document["traceback"] = self.formatException(record.exc_info)
        try:
            line = orjson.dumps(document, default=_default, option=orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError:
            # A string with lone surrogates, such as a file name that is not UTF-8.
            line = orjson.dumps(utf8_document(document), default=_default,
                                option=orjson.OPT_NON_STR_KEYS)
        return redact(line.decode())


# --- repeat suppression ---------------------------------------------------------


class RepeatFilter(logging.Filter):
    """Collapse identical warnings and errors; the next line after a window carries the count."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [first_at, suppressed]
        self._lock = threading.Lock()

    def _key(self, record: logging.LogRecord) -> tuple[Any, ...]:
        fields = getattr(record, "fields", None) or {}
        stable = tuple(sorted(
            (k, str(v)) for k, v in fields.items()
            if not any(part in k for part in _VOLATILE_FIELDS)
        ))
        return (record.name, record.levelno, record.msg, stable)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "no_collapse", False):
            return True
        key = self._key(record)
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window:
                suppressed = int(entry[1]) if entry else 0
                self._seen[key] = [now, 0]
                if len(self._seen) > 10_000:
                    self._prune(now)
                if suppressed:
                    record.repeated = suppressed
                return True
            entry[1] += 1
            return False

    def _prune(self, now: float) -> None:
        for key in [k for k, v in self._seen.items() if now - v[0] >= self.window]:
            del self._seen[key]


# --- sinks ----------------------------------------------------------------------


class _OnlyLogger(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == self.prefix or record.name.startswith(self.prefix + ".")


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Queue handler that drops and counts instead of blocking when the queue is full."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0
        self.on_drop: Any = None

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The writer thread formats; only freeze the message so arguments cannot change.
        record.message = record.getMessage()
        record.msg = record.message
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()


class _FileHandler(logging.handlers.WatchedFileHandler):
    """One log file whose failed writes are counted and reported, at most once a minute.

    logging's own handleError prints a traceback to stderr for every line that cannot be
    written, so a full log disk floods the journal with one block per log line. The line
    itself still reaches stderr through the stderr handler.
    """

    REPORT_EVERY = 60.0  # seconds between two reports of one file's failures

    def __init__(self, path: Path, report: Callable[[logging.LogRecord], object]) -> None:
        super().__init__(path, encoding="utf-8")
        self.failures = 0
        self.on_failure: Callable[[str], None] | None = None
        self._report = report
        self._reported_at: float | None = None  # monotonic
        self._unreported = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Write `record`, reopening the file first if it was moved or could not be
        opened before.

        Python's WatchedFileHandler and FileHandler open the file outside the try that
        routes errors to handleError. A file that cannot be opened (a rotation that left
        a file walacord may not write, a log directory replaced by a file) would then
        raise out of emit and end the writer thread, which writes every log line,
        stderr's too. Here such errors count as failed writes, and the next line tries
        again.
        """
        try:
            if self.stream is None:
                self.stream = self._open()
                self._statstream()
            else:
                self.reopenIfNeeded()
        except Exception:
            stream, self.stream = self.stream, None
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
            self.handleError(record)
            return
        logging.StreamHandler.emit(self, record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failures += 1
        self._unreported += 1
        name = Path(self.baseFilename).name
        if self.on_failure is not None:
            self.on_failure(name)
        now = time.monotonic()
        if self._reported_at is not None and now - self._reported_at < self.REPORT_EVERY:
            return
        self._reported_at = now
        error = sys.exc_info()[1]
        report = logging.LogRecord(__name__, logging.ERROR, __file__, 0, "log.write_failed",
                                   None, None)
        report.fields = {"file": self.baseFilename, "error": str(error),
                         "lines_lost": self._unreported,
                         "action": "free space in the log directory or fix its "
                                   "permissions; lines still go to stderr"}
        self._unreported = 0
        self._report(report)


class _QueueListener(logging.handlers.QueueListener):
    """QueueListener whose writer thread survives a handler that raises.

    One bad handler must not end the thread that writes every log line. A handler
    error goes to that handler's handleError, as logging does for errors inside emit.
    """

    def handle(self, record: logging.LogRecord) -> None:
        record = self.prepare(record)
        for handler in self.handlers:
            if self.respect_handler_level and record.levelno < handler.level:
                continue
            try:
                handler.handle(record)
            except Exception:
                handler.handleError(record)


class LogSetup:
    """The installed logging pipeline: queue, writer thread and its file handlers."""

    def __init__(self, level: str, directory: str | None, queue_size: int,
                 repeat_window: float, stream: Any = None) -> None:
        self.directory = Path(directory) if directory else None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.queue_handler = _DroppingQueueHandler(self._queue)
        self.repeat_filter = RepeatFilter(repeat_window)
        self.queue_handler.addFilter(self.repeat_filter)
        self.file_handlers: list[_FileHandler] = []

        formatter = JsonFormatter()
        handlers: list[logging.Handler] = []
        self.stderr_handler = logging.StreamHandler(stream or sys.stderr)
        self.stderr_handler.setFormatter(formatter)
        handlers.append(self.stderr_handler)
        if self.directory is not None:
            handlers.extend(self._file_handlers(formatter))

        self.listener = _QueueListener(self._queue, *handlers, respect_handler_level=True)
        self.set_level(level)

    def _file_handlers(self, formatter: logging.Formatter) -> list[logging.Handler]:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        specs: list[tuple[str, int, logging.Filter | None]] = [
            (MAIN_FILE, logging.NOTSET, None),
            (ERROR_FILE, logging.ERROR, None),
            (ALERT_FILE, logging.NOTSET, _OnlyLogger(ALERT_LOGGER)),
            (PERFORMANCE_FILE, logging.NOTSET, _OnlyLogger(PERFORMANCE_LOGGER)),
        ]
        handlers: list[logging.Handler] = []
        for name, level, only in specs:
            # WatchedFileHandler reopens the file when logrotate has moved it; with
            # copytruncate the O_APPEND descriptor simply continues at the new end.
            handler = _FileHandler(self.directory / name, self.stderr_handler.handle)
            handler.setLevel(level)
            handler.setFormatter(formatter)
            if only is not None:
                handler.addFilter(only)
            handlers.append(handler)
            self.file_handlers.append(handler)
        return handlers

    def count_into(self, dropped: Callable[[], None],
                   write_failed: Callable[[str], None]) -> None:
        """Call `dropped` for each line the full queue drops, and `write_failed` with the
        file name for each line a log file could not take."""
        self.queue_handler.on_drop = dropped
        for handler in self.file_handlers:
            handler.on_failure = write_failed

    def set_level(self, level: str) -> None:
        logging.getLogger().setLevel(level.upper())
        # Alerts and timings are always written to their own files.
        logging.getLogger(ALERT_LOGGER).setLevel(logging.INFO)
        # Libraries that log every request at INFO (httpx writes a line for each probe
        # request) follow the chosen level only at DEBUG; otherwise only their warnings.
        library_level = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(library_level)

    def reopen(self) -> list[str]:
        """Reopen every log file, for logrotate's postrotate SIGUSR1; return the failures.

        A file that cannot be opened now (its directory was removed, the disk is full)
        is left closed: FileHandler opens it again on the next line it writes, so the
        daemon keeps running and logging to stderr meanwhile.
        """
        failures = []
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                failures.append(f"{self.directory}: {exc.strerror}")
        for handler in self.file_handlers:
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                # A closed stream must not stay attached: the writer thread would hit
                # "I/O operation on closed file". None makes emit() reopen lazily.
                handler.stream = None
                try:
                    handler.stream = handler._open()
                except OSError as exc:
                    failures.append(f"{handler.baseFilename}: {exc.strerror}")
            finally:
                handler.release()
        return failures

    def start(self) -> None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self.queue_handler)
        logging.captureWarnings(True)
        self.listener.start()

    def stop(self) -> None:
        """Flush what is queued and stop the writer thread; a second call does nothing."""
        logging.getLogger().removeHandler(self.queue_handler)
        if self.listener._thread is None:
            return
        self.listener.stop()
        for handler in self.listener.handlers:
            try:
                handler.flush()
                handler.close()
            except OSError:
                # A full log disk must not fail the shutdown; the lines went to stderr.
                pass


_current: LogSetup | None = None


def setup(level: str = "info", directory: str | None = None, *, queue_size: int = 10000,
          repeat_window: float = 60.0, secrets: Iterable[str] = (), stream: Any = None) -> LogSetup:
    """Install the JSON pipeline on the root logger, replacing an earlier one."""
    global _current
    if _current is not None:
        _current.stop()
    redact.set_secrets(secrets)
    _current = LogSetup(level, directory, queue_size, repeat_window, stream)
    _current.start()
    return _current


def shutdown() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def event_fields(**fields: Any) -> dict[str, Any]:
    """Shorthand for `extra=`: log.info("x.y", extra=event_fields(a=1))."""
    return {"fields": fields}

