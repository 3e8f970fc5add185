"""walacorctl against a daemon process running the real supervisor and control server."""

from __future__ import annotations

import argparse
import contextlib
import io
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.control.harness import WALACORCTL, DaemonProcess, walacorctl
from walacord.control.cli import Context, build_parser
from walacord.control.client import ControlClient, ProgressCallback, _control_error
from walacord.control.commands import watch_command
from walacord.control.protocol import PROTOCOL_VERSION, ErrorCode, encode_request
from walacord.control.render import ProgressBar, first_line, format_pairs, format_table
from walacord.errors import ControlClientError, ControlError


def test_status_json_shape(daemon: DaemonProcess) -> None:
    result = walacorctl("--json", "status", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    status = orjson.loads(result.stdout)
    assert status["mode"] == "normal"
    assert status["reason"] == "every critical probe is healthy"
    assert status["since"].endswith("Z")
    assert set(status["probes"]) == {"database", "walacor"}
    for probe in status["probes"].values():
        assert set(probe) == {"healthy", "reason", "latency_seconds"}
        assert probe["healthy"] is True


def test_status_table_for_people(daemon: DaemonProcess) -> None:
    result = walacorctl("status", socket=daemon.socket)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[0].split() == ["mode:", "normal"]
    assert lines[2].startswith("reason:    every critical probe is healthy")
    header = next(line for line in lines if line.startswith("PROBE"))
    assert header.split() == ["PROBE", "STATE", "LATENCY", "SINCE", "REASON"]
    database = next(line for line in lines if line.startswith("database"))
    assert database.index("up") == header.index("STATE")
    assert "2.1 ms" in database


def test_socket_from_environment(daemon: DaemonProcess) -> None:
    result = walacorctl("--json", "mode", env={"WALACORD_CONTROL_SOCKET": str(daemon.socket)})
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["mode"] == "normal"


def test_check_exit_code_follows_mode(daemon: DaemonProcess) -> None:
    first = walacorctl("check", socket=daemon.socket)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("WALACORD OK - mode normal: every critical probe is healthy |")
    assert "probes_healthy=2;;;0;2" in first.stdout
    assert "database_latency=0.002100s;;;0" in first.stdout
    assert first.stdout.count("\n") == 1

    expected = {"degraded": (1, "WARNING"), "emergency": (2, "CRITICAL"),
                "offline": (2, "CRITICAL"), "normal": (0, "OK")}
    for mode, (code, word) in expected.items():
        forced = walacorctl("mode", "set", mode, "--ttl", "60", "--reason", f"test {mode}",
                            socket=daemon.socket)
        assert forced.returncode == 0, forced.stderr
        check = walacorctl("check", socket=daemon.socket)
        assert check.returncode == code, check.stdout
        assert check.stdout.startswith(f"WALACORD {word} - mode {mode}: manual override")
        assert f"test {mode}" in check.stdout

    cleared = walacorctl("--json", "mode", "clear", socket=daemon.socket)
    assert orjson.loads(cleared.stdout)["override"] is None


def test_check_without_daemon_exits_3(socket_dir: Path) -> None:
    result = walacorctl("check", socket=socket_dir / "missing.sock")
    assert result.returncode == 3
    assert result.stdout.startswith("WALACORD UNKNOWN - control socket ")
    assert "is walacord running?" in result.stdout


def test_status_without_daemon_exits_3(socket_dir: Path) -> None:
    missing = walacorctl("status", socket=socket_dir / "missing.sock")
    assert missing.returncode == 3
    assert f"control socket {socket_dir / 'missing.sock'} not found" in missing.stderr

    stale = socket_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    refused = walacorctl("status", socket=stale)
    assert refused.returncode == 3
    assert f"nothing is listening on {stale}" in refused.stderr


def test_json_without_daemon_prints_error_document(socket_dir: Path) -> None:
    """With --json, an unreachable daemon gives the same {"error": ...} document on
    standard output as an error the daemon returns."""
    missing = socket_dir / "missing.sock"

    result = walacorctl("--json", "status", socket=missing)

    assert result.returncode == 3
    assert result.stderr == ""
    document = orjson.loads(result.stdout)
    assert document["error"]["code"] is None
    assert document["error"]["data"] == {"reason": "unreachable"}
    assert f"control socket {missing} not found" in document["error"]["message"]


def test_status_non_socket_path(socket_dir: Path) -> None:
    regular = socket_dir / "walacord.toml"
    regular.write_text("")
    for path, kind in ((regular, "regular file"), (socket_dir, "directory")):
        result = walacorctl("status", socket=path)
        assert result.returncode == 3
        assert f"{path} is a {kind}, not a socket" in result.stderr
        assert "nothing is listening" not in result.stderr


def test_mode_override_expires_and_logs_reason(daemon: DaemonProcess) -> None:
    forced = walacorctl("--json", "mode", "set", "emergency", "--ttl", "1",
                        "--reason", "maintenance window", socket=daemon.socket)
    state = orjson.loads(forced.stdout)
    assert state["mode"] == "emergency"
    assert state["override"]["reason"] == "maintenance window"
    assert 0 < state["override"]["remaining_seconds"] <= 1

    time.sleep(1.5)
    after = orjson.loads(walacorctl("--json", "mode", socket=daemon.socket).stdout)
    assert after["mode"] == "normal"
    assert after["override"] is None
    changes = daemon.log_events("mode.changed")
    assert changes[0]["to"] == "emergency"
    assert "maintenance window" in changes[0]["reason"]
    assert changes[1]["to"] == "normal"
    audit = daemon.log_events("control.call")
    assert audit[0]["method"] == "mode.set"
    assert audit[0]["params"]["reason"] == "maintenance window"


def test_mode_set_rejects_bad_ttl(daemon: DaemonProcess) -> None:
    result = walacorctl("mode", "set", "emergency", "--ttl", "soon", "--reason", "x",
                        socket=daemon.socket)
    assert result.returncode == 2
    assert "invalid duration 'soon'" in result.stderr


def test_mode_set_ttl_no_client_limit(daemon: DaemonProcess) -> None:
    # The stand-in monitor has no TTL limit. test_mode_override tests the real one.
    long = walacorctl("mode", "set", "emergency", "--ttl", "400d", "--reason", "x",
                      socket=daemon.socket)
    zero = walacorctl("mode", "set", "emergency", "--ttl", "0", "--reason", "x",
                      socket=daemon.socket)
    infinite = walacorctl("mode", "set", "emergency", "--ttl", "inf", "--reason", "x",
                          socket=daemon.socket)

    assert long.returncode == 0, long.stderr
    assert zero.returncode == 2
    assert "invalid duration '0' (0s): it must be above 0" in zero.stderr
    assert infinite.returncode == 2
    assert "invalid duration 'inf'" in infinite.stderr


def test_log_level_changes_daemon_level(daemon: DaemonProcess) -> None:
    result = walacorctl("log-level", "debug", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("log level info -> debug")
    assert daemon.log_events("log.level_changed")[0]["to"] == "debug"
    walacorctl("status", socket=daemon.socket)
    assert daemon.log_events("control.connected")  # debug events now reach the log


def test_reload_reports_invalid_config(daemon: DaemonProcess) -> None:
    daemon.config_path.write_text(daemon.config_path.read_text() +
                                  "max_connections = 0\n")
    rejected = walacorctl("reload", socket=daemon.socket)
    assert rejected.returncode == 1
    assert "was rejected, so the daemon keeps the old one" in rejected.stderr
    assert "control.max_connections" in rejected.stderr

    # An emptied file: the reply gives the reason, every time it is tried.
    daemon.config_path.write_text("# truncated\n")
    emptied = [walacorctl("reload", socket=daemon.socket) for _ in range(2)]
    assert [result.returncode for result in emptied] == [1, 1]
    assert "the file contains no settings" in emptied[1].stderr
    assert daemon.log_text().count('"config.reload_rejected"') == 3

    daemon.write_config(idle_timeout=30)
    applied = walacorctl("--json", "reload", socket=daemon.socket)
    assert applied.returncode == 0, applied.stderr
    assert orjson.loads(applied.stdout) == {"applied": True, "config": str(daemon.config_path),
                                            "restart_required": []}

    # A restart-only setting applies after a restart, and status shows it until then.
    daemon.write_config(idle_timeout=30, group="root")
    pending = walacorctl("--json", "reload", socket=daemon.socket)
    status = walacorctl("status", socket=daemon.socket)
    assert orjson.loads(pending.stdout)["restart_required"] == ["control.group"]
    assert "restart:   needed for control.group: changed in the config file" in status.stdout
    human = walacorctl("reload", socket=daemon.socket)
    assert "restart walacord to apply them (systemctl restart walacord" in human.stdout
    assert daemon.alive()


def test_pool_recycle_human_output(daemon: DaemonProcess) -> None:
    result = walacorctl("pool", "recycle", "--reason", "test", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    assert "{" not in result.stdout
    pairs = [line.split(":", 1) for line in result.stdout.splitlines()]
    values = {key: value.strip() for key, value in pairs}
    assert values["at"] == "2026-05-28T20:26:40Z"
    assert values["pool_before.pool_size"] == "3"
    assert values["duration_seconds"] == "12.3 ms"
    assert values["healthy_after"] == "yes"
    value_columns = {len(key) + 1 + len(value) - len(value.lstrip()) for key, value in pairs}
    assert len(value_columns) == 1, "values are not aligned"


def test_pool_recycle_error_exits_1(daemon: DaemonProcess) -> None:
    for _ in range(2):
        assert walacorctl("pool", "recycle", socket=daemon.socket).returncode == 0
    failed = walacorctl("--json", "pool", "recycle", socket=daemon.socket)
    assert failed.returncode == 1
    error = orjson.loads(failed.stdout)["error"]
    assert error["code"] == ErrorCode.OPERATION_FAILED
    assert "budget" in error["message"]


def test_probes_list_and_run(daemon: DaemonProcess) -> None:
    listed = walacorctl("probes", socket=daemon.socket)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split()[0] == "PROBE"
    ran = walacorctl("--json", "probes", "run", "walacor", socket=daemon.socket)
    assert set(orjson.loads(ran.stdout)["probes"]) == {"walacor"}
    # A name the daemon does not know is a usage error, as in other commands.
    unknown = walacorctl("probes", "run", "nosuch", "walacor", "other", socket=daemon.socket)
    assert unknown.returncode == 2
    assert ("unknown probes 'nosuch', 'other'; use one of database, walacor"
            in unknown.stderr)
    unknown_json = walacorctl("--json", "probes", "run", "nosuch", socket=daemon.socket)
    assert unknown_json.returncode == 2
    error = orjson.loads(unknown_json.stdout)["error"]
    assert error["message"] == "unknown probe 'nosuch'; use one of database, walacor"
    assert error["data"] == {"known": ["database", "walacor"]}


def test_watch_redraws_until_interrupted(daemon: DaemonProcess) -> None:
    process = subprocess.Popen([WALACORCTL, "--socket", str(daemon.socket), "watch",
                                "--interval", "0.2"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    # Wait for three redraws rather than a fixed time: on a loaded machine walacorctl
    # may need more than a second just to start.
    seen = ""
    deadline = time.monotonic() + 30
    while seen.count("mode:      normal") < 3 and time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 1.0)
        if readable:
            seen += process.stdout.readline()
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=10)
    output = seen + rest
    assert process.returncode == 0
    assert output.count("walacorctl watch: every 0.2s") >= 3
    assert output.count("mode:      normal") >= 3


def test_watch_json_unreachable_error_document(socket_dir: Path) -> None:
    missing = socket_dir / "missing.sock"
    expected = orjson.loads(walacorctl("--json", "status", socket=missing).stdout)
    process = subprocess.Popen([WALACORCTL, "--json", "--socket", str(missing), "watch",
                                "--interval", "0.1"], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 30
    while len(lines) < 2 and time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 1.0)
        if readable:
            lines.append(process.stdout.readline())
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)

    assert process.returncode == 0
    assert len(lines) == 2
    for line in lines:
        document = orjson.loads(line)
        assert set(document) == {"at", "error"}
        assert document["at"].endswith("Z")
        assert document["error"] == expected["error"]
    assert expected["error"]["data"] == {"reason": "unreachable"}


class FailingClient(ControlClient):
    """A client whose calls raise the given errors in turn, then KeyboardInterrupt."""

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__("/nonexistent/walacord.sock", 1.0)
        self.failures = failures

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             on_progress: ProgressCallback | None = None) -> Any:
        if not self.failures:
            raise KeyboardInterrupt
        raise self.failures.pop(0)


def test_watch_json_daemon_error_document() -> None:
    busy = ControlError(ErrorCode.BUSY, "the daemon is busy", {"limit": 64})
    stdout = io.StringIO()
    context = Context(client=FailingClient([busy, ControlClientError("gone\x9b")]),
                      json=True, stdout=stdout)

    assert watch_command(context, argparse.Namespace(interval=0.0)) == 0

    documents = [orjson.loads(line) for line in stdout.getvalue().splitlines()]
    assert [document["error"] for document in documents] == [
        {"code": ErrorCode.BUSY, "message": "the daemon is busy", "data": {"limit": 64}},
        {"code": None, "message": "gone\x9b", "data": {"reason": "unreachable"}},
    ]
    assert "\x9b" not in stdout.getvalue()


def test_daemon_stop_removes_socket(daemon: DaemonProcess) -> None:
    assert daemon.socket.exists()
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert daemon.log_events("control.closed")


def test_version_mismatch_message(daemon: DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon.socket))
        sock.sendall(encode_request(1, "status", version=PROTOCOL_VERSION + 1))
        response = orjson.loads(sock.makefile("rb").readline())
    error = _control_error(response["error"])
    assert error.code == ErrorCode.VERSION_MISMATCH
    assert "the daemon supports [1]" in error.message
    assert "from the same release" in error.message


def test_client_timeout_names_deadline(daemon: DaemonProcess) -> None:
    with ControlClient(str(daemon.socket), timeout=0.3) as client, \
            pytest.raises(ControlClientError, match=r"no response to test.sleep within 0.3s"):
        client.call("test.sleep", {"seconds": 0.9})


def test_progress_bar_draws_fraction() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar({"done": 5, "total": 10, "message": "copying"})
    bar.finish()
    drawn = stream.getvalue()
    assert drawn.startswith("\r[###############...............]  50.0% 5/10 copying")
    assert drawn.endswith("\n")


def test_progress_hidden_in_json_mode(daemon: DaemonProcess) -> None:
    with ControlClient(str(daemon.socket), timeout=5) as client:
        context = Context(client, json=True, stdout=io.StringIO(), stderr=io.StringIO())
        result = context.call("test.progress", {"steps": 3}, progress=True)
    assert result == {"steps": 3}
    assert context.stderr.getvalue() == ""


def test_format_table_aligns_columns() -> None:
    table = format_table(["name", "value"], [["a", 1], ["longer", None]])
    assert table.splitlines() == ["NAME    VALUE", "a       1", "longer  -"]


def test_format_table_keeps_rows_on_one_line() -> None:
    table = format_table(["id", "last error"], [[1, 'relation "t" does not exist\nCONTEXT:\tx']])
    assert table.splitlines()[1] == '1   relation "t" does not exist CONTEXT: x'


def test_format_table_escapes_control_characters() -> None:
    table = format_table(["reason"], [["a\x1b[2Jb\x07c\x9bd\u202ee\x7f"]])
    assert table.splitlines()[1] == "a\\x1b[2Jb\\x07c\\x9bd\\u202ee\\x7f"


def test_format_pairs_escapes_control_characters() -> None:
    text = format_pairs([("reason", "a\x1b[2Jb"), ("ttl", None)])
    assert text.splitlines() == ["reason:  a\\x1b[2Jb", "ttl:     -"]


def test_first_line_cuts_to_limit() -> None:
    error = ('sqlstate 42601: syntax error at or near "VALUS"\n'
             "LINE 1: INSERT INTO ledger VALUS ($1)\n"
             "                           ^")
    assert first_line(error) == 'sqlstate 42601: syntax error at or near "VALUS"'
    assert first_line("x" * 100, limit=20) == "x" * 17 + "..."
    assert first_line("\n  \n") == ""
    assert first_line("") == ""


def test_health_lists_components(daemon: DaemonProcess) -> None:
    result = walacorctl("--json", "health", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    health = orjson.loads(result.stdout)
    assert health["state"] == "ready"
    assert health["components"] == ["control", "monitor", "pool"]
    assert health["stalled_components"] == {}
    assert health["mode"]["mode"] == "normal"
    table = walacorctl("health", socket=daemon.socket)
    lines = [line.split(None, 1) for line in table.stdout.splitlines() if line]
    assert ["components:", "control, monitor, pool"] in lines


def test_log_level_change_to_quieter_is_logged(daemon: DaemonProcess) -> None:
    result = walacorctl("log-level", "error", socket=daemon.socket)
    assert result.returncode == 0, result.stderr
    assert daemon.log_events("log.level_changed")[0]["to"] == "error"


@pytest.mark.parametrize(("timeout", "message"), [
    ("nan", "invalid duration 'nan': a duration is a number of seconds"),
    ("inf", "invalid duration 'inf': a duration is a number of seconds"),
    ("1e300", "invalid duration '1e300': it must be above 0 and at most 1d"),
    ("0", "invalid duration '0' (0s): it must be above 0 and at most 1d"),
    ("-1", "invalid duration '-1' (-1s): it must be above 0 and at most 1d"),
])
def test_timeout_out_of_range_is_usage_error(timeout: str, message: str,
                                             tmp_path: Path) -> None:
    result = subprocess.run([str(WALACORCTL), "--socket", str(tmp_path / "none.sock"),
                             f"--timeout={timeout}", "status"],
                            capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert f"argument --timeout: {message}" in result.stderr
    assert "Traceback" not in result.stderr


# Each duration option of walacorctl: a command line in which VALUE marks the value,
# and the attribute that argparse stores the value in.
DURATION_OPTIONS = {
    "--timeout": (["--timeout=VALUE", "status"], "timeout"),
    "check --timeout": (["check", "--timeout=VALUE"], "timeout"),
    "mode set --ttl": (["mode", "set", "degraded", "--ttl=VALUE", "--reason", "r"], "ttl"),
    "watch --interval": (["watch", "--interval=VALUE"], "interval"),
    "alerts silence --for": (["alerts", "silence", 'alertname="X"', "--for=VALUE",
                              "--reason", "r"], "duration"),
}


def parse_duration_option(option: str, value: str) -> float:
    words, attribute = DURATION_OPTIONS[option]
    args = build_parser().parse_args([word.replace("VALUE", value) for word in words])
    seconds: float = getattr(args, attribute)
    return seconds


@pytest.mark.parametrize("option", DURATION_OPTIONS)
@pytest.mark.parametrize(("value", "seconds"), [
    ("90", 90.0), ("1e3", 1000.0), ("1.5e1m", 900.0), (".5m", 30.0), ("500ms", 0.5),
    ("2h", 7200.0), ("1d", 86400.0),
])
def test_duration_options_accept_same_forms(option: str, value: str, seconds: float) -> None:
    assert parse_duration_option(option, value) == seconds


@pytest.mark.parametrize("option", DURATION_OPTIONS)
@pytest.mark.parametrize(("value", "message"), [
    ("soon", "invalid duration 'soon': a duration is a number of seconds, such as 90 or "
             "1.5e3, or a number with a unit ms, s, m, h or d"),
    ("inf", "invalid duration 'inf': a duration is a number of seconds"),
    ("nan", "invalid duration 'nan': a duration is a number of seconds"),
    ("1_000", "invalid duration '1_000': a duration is a number of seconds"),
    ("1e400", "invalid duration '1e400': a duration must be a finite number of seconds"),
    ("0", "invalid duration '0' (0s): it must be "),
    ("-1h", "invalid duration '-1h' (-3600s): it must be "),
])
def test_duration_options_reject_alike(option: str, value: str, message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_duration_option(option, value)

    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--timeout", "2d", "invalid duration '2d' (172800s): it must be above 0 and at most 1d"),
    ("watch --interval", "50ms",
     "invalid duration '50ms' (0.05s): it must be at least 0.1s and at most 365d"),
    ("alerts silence --for", "367d",
     "invalid duration '367d' (31708800s): it must be above 0 and at most 366d"),
    ("mode set --ttl", "0", "invalid duration '0' (0s): it must be above 0\n"),
])
def test_duration_options_name_range(option: str, value: str, message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_duration_option(option, value)

    assert message in capsys.readouterr().err


def test_dash_value_error_names_equals_form(tmp_path: Path) -> None:
    result = subprocess.run([str(WALACORCTL), "--socket", str(tmp_path / "none.sock"),
                             "alerts", "silence", 'alertname="X"', "--for", "-1h",
                             "--reason", "test"],
                            capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert "argument --for: expected one argument" in result.stderr
    assert "as in --for=VALUE" in result.stderr


def test_non_utf8_argument_is_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([WALACORCTL.encode(), b"--socket", str(tmp_path / "none.sock")
                             .encode(), b"mode", b"set", b"degraded", b"--ttl=1h",
                             b"--reason", b"maint\xff"],
                            capture_output=True, timeout=30)
    stderr = result.stderr.decode()

    assert result.returncode == 2
    assert "argument 'maint\\xff' contains bytes that are not valid UTF-8" in stderr
    assert "Traceback" not in stderr


def test_check_usage_error_is_nagios_unknown(tmp_path: Path) -> None:
    result = subprocess.run([str(WALACORCTL), "check", "--warning", "5"],
                            capture_output=True, text=True, timeout=30)

    assert result.returncode == 3
    assert result.stdout.startswith("WALACORD UNKNOWN - invalid arguments")


def test_check_takes_options_after_command(daemon: DaemonProcess) -> None:
    result = subprocess.run([str(WALACORCTL), "check", "--socket", str(daemon.socket),
                             "--timeout", "5"], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("WALACORD OK")


@pytest.mark.parametrize(("argv", "message"), [
    (["enqueue", "--sink", "walacor", "--etid", "-5", "--key", "k", "--data", "{}"],
     "use a whole number from 1 to"),
    (["outbox", "list", "--limit", "0"], "use a whole number from 1 to 10000"),
    (["outbox", "list", "--limit", "20000"], "use a whole number from 1 to 10000"),
    (["watch", "--interval", "0.0001"], "it must be at least 0.1s and at most 365d"),
])
def test_cli_ranges_match_daemon(argv: list[str], message: str) -> None:
    result = walacorctl(*argv, socket=Path("/nonexistent/walacord.sock"))
    assert result.returncode == 2
    assert message in result.stderr


def test_json_output_escapes_terminal_controls() -> None:
    document = {"reason": "a\x7fb\x9b2Jc\u202ed", "count": 1}
    stdout = io.StringIO()
    context = Context(client=ControlClient("/nonexistent/walacord.sock", 1.0), json=True,
                      stdout=stdout)

    context.print_json(document)

    text = stdout.getvalue()
    assert "\\u007f" in text
    assert "\\u009b" in text
    assert "\\u202e" in text
    assert not any(character in text for character in "\x7f\x9b\u202e")
    assert orjson.loads(text) == document


@contextlib.contextmanager
def replying_server(path: Path, reply: bytes) -> Iterator[None]:
    """Serve a Unix socket at `path` that responds to every request line with the line
    `reply`, as a daemon of another release or a broken one might."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection, connection.makefile("rb") as requests:
                connection.settimeout(10)
                for _ in requests:
                    connection.sendall(reply + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()
        thread.join(timeout=10)
        listener.close()


UNEXPECTED_STATUS = [
    b'{"id":1,"result":null}',
    b'{"id":1,"result":[]}',
    b'{"id":1,"result":"normal"}',
]


@pytest.mark.parametrize("reply", UNEXPECTED_STATUS)
def test_check_unexpected_response_is_unknown(socket_dir: Path, reply: bytes) -> None:
    path = socket_dir / "odd.sock"
    with replying_server(path, reply):
        result = walacorctl("check", socket=path)

    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("WALACORD UNKNOWN - the daemon sent an unexpected "
                                    "response to status: expected a JSON object, got ")
    assert result.stdout.count("\n") == 1
    assert result.stderr == ""


def test_check_unexpected_fields_no_traceback(socket_dir: Path) -> None:
    path = socket_dir / "odd.sock"
    reply = b'{"id":1,"result":{"mode":["normal"],"probes":[1],"reason":{"a":1}}}'
    with replying_server(path, reply):
        result = walacorctl("check", socket=path)

    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("WALACORD UNKNOWN - mode ['normal']")
    assert result.stdout.count("\n") == 1
    assert result.stderr == ""


@pytest.mark.parametrize("reply", UNEXPECTED_STATUS)
def test_status_unexpected_response_exits_3(socket_dir: Path, reply: bytes) -> None:
    path = socket_dir / "odd.sock"
    with replying_server(path, reply):
        table = walacorctl("status", socket=path)
        document = walacorctl("--json", "status", socket=path)

    assert table.returncode == 3
    assert table.stderr.startswith("walacorctl: the daemon sent an unexpected response to "
                                   "status: expected a JSON object")
    assert table.stderr.count("\n") == 1
    assert document.returncode == 3
    assert "expected a JSON object" in orjson.loads(document.stdout)["error"]["message"]


def test_status_unexpected_fields_no_traceback(socket_dir: Path) -> None:
    path = socket_dir / "odd.sock"
    reply = (b'{"id":1,"result":{"mode":"normal","daemon":5,"override":"x","probes":[1],'
             b'"reason":null}}')
    with replying_server(path, reply):
        result = walacorctl("status", socket=path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mode:")
    assert "no probes configured" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--socket", "", "status"], "argument --socket: empty path; give the control socket's "
                                 "path, such as /run/walacord/control.sock"),
    (["--socket=", "mode"], "argument --socket: empty path"),
    (["backup", "restore", "20240101T000000Z", "--target-db", ""],
     "argument --target-db: empty name; give the name of the database to restore into"),
])
def test_empty_option_is_usage_error(tmp_path: Path, argv: list[str], message: str) -> None:
    result = walacorctl(*argv)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Invalid argument" not in result.stderr


def test_check_empty_socket_is_nagios_unknown() -> None:
    result = walacorctl("check", "--socket", "")

    assert result.returncode == 3
    assert result.stdout.startswith("WALACORD UNKNOWN - invalid arguments")
    assert "argument --socket: empty path" in result.stderr


def test_alerts_unsilence_has_help() -> None:
    own = walacorctl("alerts", "unsilence", "--help")
    family = walacorctl("alerts", "--help")
    top = walacorctl("--help")

    assert own.returncode == 0
    assert "End a silence now" in own.stdout
    assert "silence id, as `walacorctl alerts` lists it" in own.stdout
    assert "unsilence" in family.stdout
    assert "`alerts unsilence` ends a silence" in " ".join(top.stdout.split())
