"""The control server over a real Unix socket, in this process."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import anyio
import orjson
import pytest

from tests.control.harness import connect, make_config, running_server
from tests.control.standins import StandInMonitor, StandInPool
from walacord.control.protocol import ErrorCode

pytestmark = pytest.mark.anyio


async def test_status_reports_mode_and_probes(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock")
    async with running_server(config, [StandInMonitor()]), connect(socket_dir / "c.sock") as client:
        response = await client.call("status")

    result = response["result"]
    assert response["id"] == 1
    assert result["mode"] == "normal"
    assert result["reason"] == "every critical probe is healthy"
    assert result["since"].endswith("Z")
    assert result["probes"]["database"] == {"healthy": True, "reason": "ok",
                                            "latency_seconds": 0.0021}
    assert result["daemon"]["state"] == "ready"


async def test_status_without_mode_machine_is_unavailable(socket_dir: Path) -> None:
    config = make_config(socket_dir / "c.sock")
    async with running_server(config), connect(socket_dir / "c.sock") as client:
        status = await client.call("status")
        health = await client.call("health")
        recycle = await client.call("pool.recycle")

    assert status["error"]["code"] == ErrorCode.UNAVAILABLE
    assert status["error"]["message"] == "no mode machine configured"
    assert health["result"]["mode"] is None
    assert health["result"]["components"] == ["control"]
    assert recycle["error"]["message"] == "no database pool configured"


async def test_socket_file_has_mode_0660(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    async with running_server(make_config(path)):
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
    assert not path.exists()


async def test_socket_file_gets_configured_group(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    async with running_server(make_config(path, group="daemon")):
        assert os.stat(path).st_gid == 1


async def test_missing_group_logs_warning(socket_dir: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    path = socket_dir / "c.sock"
    caplog.set_level(logging.INFO, logger="walacord")
    async with running_server(make_config(path, group="no-such-group-here")):
        assert os.stat(path).st_gid == os.getegid()
    warnings = [r for r in caplog.records if r.getMessage() == "control.group_missing"]
    assert len(warnings) == 1


async def test_unknown_method_lists_known(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        response = await client.call("no.such.method")
    assert response["id"] == 1
    assert response["error"]["code"] == ErrorCode.METHOD_NOT_FOUND
    assert "mode.set" in response["error"]["message"]


@pytest.mark.parametrize(("params", "fragment"), [
    ({"mode": "emergency", "ttl_seconds": 5}, "missing param 'reason'"),
    ({"mode": "panic", "ttl_seconds": 5, "reason": "x"}, "one of 'normal'"),
    ({"mode": "emergency", "ttl_seconds": "5", "reason": "x"}, "is not a number"),
    ({"mode": "emergency", "ttl_seconds": 0, "reason": "x"}, "ttl_seconds must be above 0"),
    ({"mode": "emergency", "ttl_seconds": 5, "reason": " "}, "reason must not be empty"),
    ({"mode": "emergency", "ttl_seconds": 5, "reason": "x", "extra": 1}, "unknown param(s) extra"),
])
async def test_mode_set_rejects_bad_params(socket_dir: Path, params: dict[str, object],
                                           fragment: str) -> None:
    monitor = StandInMonitor()
    async with running_server(make_config(socket_dir / "c.sock"), [monitor]), \
            connect(socket_dir / "c.sock") as client:
        response = await client.call("mode.set", params)
    assert response["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert fragment in response["error"]["message"]
    assert monitor.override is None


async def test_mode_set_override_expires(socket_dir: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monitor = StandInMonitor()
    caplog.set_level(logging.INFO)
    async with running_server(make_config(socket_dir / "c.sock"), [monitor]), \
            connect(socket_dir / "c.sock") as client:
        response = await client.call("mode.set", {"mode": "emergency", "ttl_seconds": 0.3,
                                                  "reason": "disk swap"})
        assert response["result"]["mode"] == "emergency"
        assert response["result"]["override"]["reason"] == "disk swap"
        await anyio.sleep(0.5)
        after = await client.call("mode.get")

    assert after["result"]["mode"] == "normal"
    assert after["result"]["override"] is None
    audit = [r for r in caplog.records if r.getMessage() == "control.call"]
    assert audit[0].fields["method"] == "mode.set"  # type: ignore[attr-defined]
    assert audit[0].fields["uid"] == os.getuid()  # type: ignore[attr-defined]
    changes = [r.fields for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage() == "mode.changed"]
    assert "disk swap" in changes[0]["reason"]
    assert changes[1]["to"] == "normal"


async def test_pool_recycle_failure_is_operation_failed(socket_dir: Path) -> None:
    pool = StandInPool(budget=1)
    async with running_server(make_config(socket_dir / "c.sock"), [pool]), \
            connect(socket_dir / "c.sock") as client:
        first = await client.call("pool.recycle", {"reason": "test"})
        second = await client.call("pool.recycle")
    assert first["result"]["reason"] == "test"
    assert first["result"]["recycled"] is True
    assert second["error"]["code"] == ErrorCode.OPERATION_FAILED
    assert "budget" in second["error"]["message"]


async def test_mutating_rejected_while_stopping(socket_dir: Path) -> None:
    monitor = StandInMonitor()
    async with running_server(make_config(socket_dir / "c.sock"), [monitor]) as runtime, \
            connect(socket_dir / "c.sock") as client:
        runtime.stopping = True
        response = await client.call("mode.clear")
        status = await client.call("mode.get")
    assert response["error"]["code"] == ErrorCode.STOPPING
    assert status["result"]["mode"] == "normal"


async def test_handler_crash_is_internal_error(socket_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        crashed = await client.call("test.crash")
        echoed = await client.call("test.echo", {"value": 5})
    assert crashed["error"]["code"] == ErrorCode.INTERNAL_ERROR
    assert "handler bug" not in crashed["error"]["message"]
    assert echoed["result"]["value"] == 5
    assert any(r.getMessage() == "control.handler_crashed" for r in caplog.records)


async def test_handler_timeout_is_call_timeout(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        response = await client.call("test.sleep", {"seconds": 5})
    assert response["error"]["code"] == ErrorCode.CALL_TIMEOUT
    assert "within 1s" in response["error"]["message"]


async def test_progress_lines_precede_result(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await client.request("test.progress", {"steps": 3})
        messages = [await client.receive() for _ in range(4)]
    assert [m["progress"]["done"] for m in messages[:3]] == [1, 2, 3]
    assert messages[3]["result"] == {"steps": 3}


async def test_pipelined_concurrent_calls_overlap(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        began = anyio.current_time()
        # Sent in one write, so all four lines are buffered when the first is read.
        await client.send(b"".join(
            orjson.dumps({"id": number, "method": method, "version": 1,
                          "params": {"seconds": 0.3}}) + b"\n"
            for number, method in ((1, "test.concurrent_sleep"), (2, "test.concurrent_sleep"),
                                   (3, "test.concurrent_sleep"), (4, "test.sleep"))))
        concurrent = [await client.receive() for _ in range(3)]
        sequential = await client.receive()
        seconds = anyio.current_time() - began

    assert [message["id"] for message in concurrent] == [1, 2, 3]
    assert all(message["result"] == {"slept": 0.3} for message in concurrent)
    assert sequential["id"] == 4
    # 0.3 s for the three concurrent calls together, then 0.3 s for the plain one;
    # one at a time they would take 1.2 s.
    assert 0.6 <= seconds < 0.9


async def test_pipelined_plain_calls_run_in_order(socket_dir: Path) -> None:
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        began = anyio.current_time()
        await client.send(b"".join(
            orjson.dumps({"id": number, "method": "test.sleep", "version": 1,
                          "params": {"seconds": 0.2}}) + b"\n" for number in (1, 2, 3)))
        responses = [await client.receive() for _ in range(3)]
        seconds = anyio.current_time() - began

    assert [message["id"] for message in responses] == [1, 2, 3]
    assert seconds >= 0.6


async def test_pipelined_batch_handler_answers_each(socket_dir: Path) -> None:
    values = ["a", "bad", "b"]
    async with running_server(make_config(socket_dir / "c.sock")), \
            connect(socket_dir / "c.sock") as client:
        await client.send(b"".join(
            orjson.dumps({"id": number, "method": "test.echo_batch", "version": 1,
                          "params": {"value": value}}) + b"\n"
            for number, value in enumerate(values)))
        responses = [await client.receive() for _ in values]
        await client.send(b"".join(
            orjson.dumps({"id": number, "method": "test.echo_batch", "version": 1,
                          "params": {"value": value}}) + b"\n"
            for number, value in enumerate(["c", "crash"])))
        crashed = [await client.receive() for _ in range(2)]

    assert [message["id"] for message in responses] == [0, 1, 2]
    assert responses[0]["result"] == {"value": "a", "batch": 3}
    assert responses[1]["error"]["code"] == ErrorCode.INVALID_PARAMS
    assert responses[2]["result"] == {"value": "b", "batch": 3}
    assert [message["error"]["code"] for message in crashed] == [ErrorCode.INTERNAL_ERROR] * 2
