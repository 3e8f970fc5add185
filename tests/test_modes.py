"""The mode decision, table-driven, and the machine's side effects on a change."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import kill_leftovers, live_pids, wait_until
from walacord.config import ModesConfig
from walacord.control.render import format_mode, override_hides_worse
from walacord.metrics import Metrics
from walacord.modes import Current, Mode, ModeMachine, Override, decide, run_command
from walacord.probes.base import Health, ProbeResult, ProbeState, Status
from walacord.processes import KILL_GRACE, group_members

NOW = 1000.0


def probe(name: str, health: str = "up", reason: str = "ok", warning: bool = False,
          message: str = "") -> ProbeState:
    """Return a probe state; `health` is up, down or unknown."""
    status = Status.WARNING if warning else Status.OK
    result = ProbeResult(status, reason if warning else "ok", message or f"{name} {reason}")
    failure = ProbeResult(Status.CRITICAL, reason, message or f"{name} {reason}")
    if health == "down":
        return ProbeState(name, Health.DOWN, since=NOW - 5, last=failure, last_failure=failure)
    if health == "unknown":
        return ProbeState(name)
    return ProbeState(name, Health.UP, since=NOW - 100, last=result)


def world(**overrides: ProbeState) -> dict[str, ProbeState]:
    states = {name: probe(name) for name in ("database", "walacor", "api", "host")}
    states.update(overrides)
    return states


LONG_AGO = Current(Mode.NORMAL, NOW - 3600)

# (case, current, observations, expected mode, text the reason must contain)
RULES = [
    ("all healthy", LONG_AGO, world(), Mode.NORMAL, "Every critical probe is healthy"),
    ("database refused", LONG_AGO, world(database=probe("database", "down", "refused")),
     Mode.EMERGENCY, "PostgreSQL cannot take writes"),
    ("database read only", LONG_AGO, world(database=probe("database", "down", "read_only")),
     Mode.EMERGENCY, "cannot take writes"),
    ("walacor down", LONG_AGO, world(walacor=probe("walacor", "down", "server_error")),
     Mode.DEGRADED, "Walacor is down"),
    ("walacor slow", LONG_AGO, world(walacor=probe("walacor", reason="slow", warning=True)),
     Mode.DEGRADED, "Walacor is slow"),
    ("api down", LONG_AGO, world(api=probe("api", "down", "status_500")),
     Mode.DEGRADED, "application API is down"),
    ("api slow", LONG_AGO, world(api=probe("api", reason="slow", warning=True)),
     Mode.DEGRADED, "application API is slow"),
    ("database slow", LONG_AGO, world(database=probe("database", reason="slow", warning=True)),
     Mode.DEGRADED, "database warns"),
    ("pool saturated", LONG_AGO,
     world(database=probe("database", reason="pool_saturated", warning=True)),
     Mode.DEGRADED, "database warns"),
    ("host warning", LONG_AGO, world(host=probe("host", reason="disk_low", warning=True)),
     Mode.DEGRADED, "host warns"),
    ("host critical alone", LONG_AGO, world(host=probe("host", "down", "memory")),
     Mode.DEGRADED, "host is failing"),
    ("both unreachable", LONG_AGO,
     world(database=probe("database", "down", "refused"),
           walacor=probe("walacor", "down", "connect_timeout")),
     Mode.OFFLINE, "both unreachable"),
    ("database unreachable walacor 5xx", LONG_AGO,
     world(database=probe("database", "down", "refused"),
           walacor=probe("walacor", "down", "server_error")),
     Mode.OFFLINE, "both unreachable"),
    ("database read only walacor unreachable", LONG_AGO,
     world(database=probe("database", "down", "read_only"),
           walacor=probe("walacor", "down", "refused")),
     Mode.EMERGENCY, "cannot take writes"),
    ("database unreachable walacor rejects", LONG_AGO,
     world(database=probe("database", "down", "refused"), walacor=probe("walacor", "down", "auth")),
     Mode.EMERGENCY, "cannot take writes"),
    ("host is the cause", LONG_AGO,
     world(host=probe("host", "down", "local_cause", message="local cause: disk full at /var"),
           walacor=probe("walacor", "down", "timeout")),
     Mode.OFFLINE, "disk full at /var"),
    ("unknown probe ignored", LONG_AGO, world(walacor=probe("walacor", "unknown")),
     Mode.NORMAL, "waiting for walacor"),
]


@pytest.mark.parametrize(("case", "current", "observations", "expected", "text"), RULES,
                         ids=[row[0] for row in RULES])
def test_decide_rules(case: str, current: Current, observations: dict[str, ProbeState],
                      expected: Mode, text: str) -> None:
    decision = decide(current, observations, NOW)
    assert decision.mode is expected
    assert text in decision.reason
    assert decision.reason.endswith(".")


# (case, current, observations, now offset since current began, min_dwell, expected)
DWELL = [
    ("worse applies at once", Mode.NORMAL, world(database=probe("database", "down", "refused")),
     0.01, 5.0, Mode.EMERGENCY),
    ("better waits for dwell", Mode.EMERGENCY, world(), 1.0, 5.0, Mode.EMERGENCY),
    ("better after dwell", Mode.EMERGENCY, world(), 5.0, 5.0, Mode.NORMAL),
    ("offline to emergency waits", Mode.OFFLINE,
     world(database=probe("database", "down", "refused")), 0.5, 2.0, Mode.OFFLINE),
    ("degraded to offline at once", Mode.DEGRADED,
     world(database=probe("database", "down", "refused"),
           walacor=probe("walacor", "down", "refused")), 0.0, 60.0, Mode.OFFLINE),
]


@pytest.mark.parametrize(("case", "mode", "observations", "elapsed", "dwell", "expected"),
                         DWELL, ids=[row[0] for row in DWELL])
def test_decide_hysteresis(case: str, mode: Mode, observations: dict[str, ProbeState],
                           elapsed: float, dwell: float, expected: Mode) -> None:
    current = Current(mode, NOW - elapsed)
    decision = decide(current, observations, NOW, policy=ModesConfig(min_dwell=dwell))
    assert decision.mode is expected
    if expected is mode and mode.rank > Mode.NORMAL.rank and elapsed < dwell:
        assert "Staying" in decision.reason


def test_decide_override_until_expiry() -> None:
    override = Override(Mode.OFFLINE, "database maintenance", until=NOW + 60, set_at=NOW)
    during = decide(LONG_AGO, world(), NOW, override=override)
    after = decide(LONG_AGO, world(), NOW + 61, override=override)
    assert during.mode is Mode.OFFLINE
    assert "database maintenance" in during.reason
    assert after.mode is Mode.NORMAL


def test_decide_ignored_probe() -> None:
    observations = world(walacor=probe("walacor", "down", "server_error"))
    decision = decide(LONG_AGO, observations, NOW,
                      policy=ModesConfig(ignore_probes=["walacor"]))
    assert decision.mode is Mode.NORMAL


def test_decide_walacor_down_as_emergency() -> None:
    observations = world(walacor=probe("walacor", "down", "server_error"))
    decision = decide(LONG_AGO, observations, NOW,
                      policy=ModesConfig(walacor_down="emergency"))
    assert decision.mode is Mode.EMERGENCY


def test_decide_evidence_names_probes() -> None:
    decision = decide(LONG_AGO, world(database=probe("database", "down", "refused")), NOW)
    assert decision.evidence["database"].startswith("down:")
    assert set(decision.evidence) == {"database", "walacor", "api", "host"}


@pytest.mark.anyio
async def test_machine_transition_side_effects(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    out = tmp_path / "hook.txt"
    hook = [sys.executable, "-c",
            "import os, sys; open(sys.argv[1], 'w').write("
            "os.environ['WALACORD_MODE_FROM'] + ' ' + os.environ['WALACORD_MODE_TO'] + ' ' "
            "+ os.environ['WALACORD_MODE_REASON'])", str(out)]
    machine = ModeMachine(ModesConfig(hooks=[hook], min_dwell=0), Metrics(registry))

    async with anyio.create_task_group() as tg:
        tg.start_soon(machine.run_hooks)
        decision = machine.evaluate(world(database=probe("database", "down", "refused")))
        await wait_until(lambda: out.exists() and out.read_text(), 10)
        tg.cancel_scope.cancel()

    assert decision.mode is Mode.EMERGENCY
    assert out.read_text().startswith("normal emergency PostgreSQL cannot take writes")
    assert registry.get_sample_value(
        "walacord_mode_transitions_total", {"from": "normal", "to": "emergency"}) == 1
    assert registry.get_sample_value("walacord_mode", {"mode": "emergency"}) == 1
    assert registry.get_sample_value("walacord_mode", {"mode": "normal"}) == 0
    assert machine.status_part().startswith("mode emergency: ")


@pytest.mark.anyio
async def test_run_command_timeout_kills() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    with anyio.fail_after(5):
        code = await run_command(argv, 0.3, {}, event="mode.hook")
    assert code is None


@pytest.mark.anyio
async def test_run_command_missing_program() -> None:
    code = await run_command(["/nonexistent/walacord-hook"], 5, {}, event="mode.hook")
    assert code is None


def test_machine_override_ttl_at_limit() -> None:
    machine = ModeMachine(ModesConfig(override_max_ttl=60), None)
    override = machine.set_override(Mode.DEGRADED, "maintenance", 60, now=NOW)
    assert override.until == NOW + 60
    assert machine.evaluate(world(), now=NOW + 1).mode is Mode.DEGRADED
    assert machine.evaluate(world(), now=NOW + 61).mode is Mode.NORMAL
    assert machine.override is None


def test_machine_override_ttl_over_limit() -> None:
    machine = ModeMachine(ModesConfig(override_max_ttl=86400), None)
    with pytest.raises(ValueError) as raised:
        machine.set_override(Mode.DEGRADED, "maintenance", 2 * 86400, now=NOW)
    message = str(raised.value)

    assert "172800s (2.0 days)" in message
    assert "86400s (1.0 days)" in message
    assert "[modes] override_max_ttl" in message
    assert machine.override is None
    assert machine.evaluate(world(), now=NOW + 1).mode is Mode.NORMAL


def test_machine_lower_override_limit_shortens_override() -> None:
    machine = ModeMachine(ModesConfig(override_max_ttl=86400), None)
    machine.set_override(Mode.DEGRADED, "maintenance", 7200, now=NOW)

    machine.apply_config(ModesConfig(override_max_ttl=3600), now=NOW + 60)

    assert machine.override is not None
    assert machine.override.until == NOW + 3600
    assert machine.evaluate(world(), now=NOW + 3599).mode is Mode.DEGRADED
    assert machine.evaluate(world(), now=NOW + 3600).mode is Mode.NORMAL


def test_machine_override_past_new_limit_ends() -> None:
    machine = ModeMachine(ModesConfig(override_max_ttl=86400), None)
    machine.set_override(Mode.OFFLINE, "maintenance", 7200, now=NOW)

    machine.apply_config(ModesConfig(override_max_ttl=60), now=NOW + 600)

    assert machine.evaluate(world(), now=NOW + 600).mode is Mode.NORMAL
    assert machine.override is None


def test_machine_higher_override_limit_keeps_override() -> None:
    machine = ModeMachine(ModesConfig(override_max_ttl=3600), None)
    machine.set_override(Mode.DEGRADED, "maintenance", 3600, now=NOW)

    machine.apply_config(ModesConfig(override_max_ttl=86400), now=NOW + 60)

    assert machine.override is not None
    assert machine.override.until == NOW + 3600


def test_machine_override_keeps_probes_verdict() -> None:
    machine = ModeMachine(ModesConfig(), None)
    machine.set_override(Mode.NORMAL, "failover drill", 600, now=NOW)
    decision = machine.evaluate(world(database=probe("database", "down", "refused")),
                                now=NOW + 1)
    override = machine.snapshot(now=NOW + 1)["override"]

    assert decision.mode is Mode.NORMAL
    assert override["probes_mode"] == "emergency"
    assert "database" in override["probes_reason"].lower()
    assert override_hides_worse({"override": override})
    assert "probes say" in format_mode({"override": override})


def test_machine_time_change_at() -> None:
    machine = ModeMachine(ModesConfig(min_dwell=2.0), None)
    machine.evaluate(world(database=probe("database", "down", "refused")), now=NOW)
    assert machine.mode is Mode.EMERGENCY
    # Inside the dwell, time alone can change the decision when the dwell ends.
    assert machine.time_change_at(NOW + 0.5) == NOW + 2.0
    # After the dwell, only new observations can.
    assert machine.time_change_at(NOW + 2.5) is None
    machine.set_override(Mode.DEGRADED, "maintenance", 30, now=NOW + 3)
    assert machine.time_change_at(NOW + 3) == NOW + 33


def test_machine_override_rejects_empty_reason() -> None:
    machine = ModeMachine(ModesConfig(), None)
    with pytest.raises(ValueError, match="needs a reason"):
        machine.set_override(Mode.OFFLINE, " ", 60)


@pytest.mark.anyio
async def test_run_command_passes_no_credentials(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALACOR_PASSWORD", "hook-must-not-see")
    out = tmp_path / "env.txt"
    argv = [sys.executable, "-c",
            "import os, sys; open(sys.argv[1], 'w').write(repr(sorted(os.environ)))", str(out)]
    code = await run_command(argv, 10, {"WALACORD_MODE_TO": "offline"}, event="mode.hook")
    names = out.read_text()
    assert code == 0
    assert "WALACOR_PASSWORD" not in names
    assert "WALACORD_MODE_TO" in names


def group_hook(pid_file: Path, body: str) -> list[str]:
    """Return a shell hook that writes its pid and its background child's pid, then runs `body`."""
    script = f'echo $$ > {pid_file}; sleep 100 & echo $! >> {pid_file}; {body}'
    return ["/bin/sh", "-c", script]


def read_pids(pid_file: Path) -> list[int]:
    """Return the shell's pid and its background child's pid that `group_hook` wrote."""
    pids = [int(word) for word in pid_file.read_text().split()]
    assert len(pids) == 2, f"{pid_file} holds {pids}, expected two pids"
    return pids


@pytest.mark.anyio
async def test_run_command_timeout_kills_grandchild(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    pids: list[int] = []
    try:
        with anyio.fail_after(10):
            code = await run_command(group_hook(pid_file, "exec sleep 100"), 0.5, {},
                                     event="mode.hook")
        pids = read_pids(pid_file)
        shell, grandchild = pids

        assert code is None
        assert live_pids([shell]) == []
        assert live_pids([grandchild]) == []
        assert group_members(shell) == []
    finally:
        kill_leftovers(pids)


@pytest.mark.anyio
async def test_run_command_timeout_kills_term_ignorers(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    # A signal ignored before exec stays ignored, so both sleeps survive SIGTERM.
    argv = ["/bin/sh", "-c", f"trap '' TERM; {group_hook(pid_file, 'exec sleep 100')[2]}"]
    pids: list[int] = []
    try:
        began = time.monotonic()
        with anyio.fail_after(10):
            code = await run_command(argv, 0.5, {}, event="mode.hook")
        took = time.monotonic() - began
        pids = read_pids(pid_file)

        assert code is None
        assert took >= 0.5 + KILL_GRACE
        assert live_pids(pids) == []
        assert group_members(pids[0]) == []
    finally:
        kill_leftovers(pids)


@pytest.mark.anyio
async def test_run_command_cancel_kills_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    pids: list[int] = []
    try:
        with anyio.move_on_after(0.5) as scope:
            await run_command(group_hook(pid_file, "exec sleep 100"), 30, {}, event="mode.hook")
        pids = read_pids(pid_file)

        assert scope.cancelled_caught
        assert live_pids(pids) == []
        assert group_members(pids[0]) == []
    finally:
        kill_leftovers(pids)


@pytest.mark.anyio
async def test_machine_hung_hook_delays_no_other(tmp_path: Path) -> None:
    out = tmp_path / "second.txt"
    hung = ["/bin/sh", "-c", "exec sleep 100"]
    second = ["/bin/sh", "-c", f'echo "$WALACORD_MODE_TO" > {out}']
    machine = ModeMachine(ModesConfig(hooks=[hung, second], hook_timeout=30, min_dwell=0),
                          None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(machine.run_hooks)
        machine.evaluate(world(database=probe("database", "down", "refused")))
        took = await wait_until(lambda: out.exists() and out.read_text(), 10)
        tg.cancel_scope.cancel()

    assert took < 5
    assert out.read_text() == "emergency\n"


@pytest.mark.anyio
async def test_machine_hook_sees_changes_in_order(tmp_path: Path) -> None:
    out = tmp_path / "modes.txt"
    # The sleep makes a later run overtake this one if runs of one hook overlapped.
    slow = ["/bin/sh", "-c", f'[ "$WALACORD_MODE_TO" = emergency ] && sleep 0.5; '
                             f'echo "$WALACORD_MODE_TO" >> {out}']
    machine = ModeMachine(ModesConfig(hooks=[slow], hook_timeout=10, min_dwell=0), None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(machine.run_hooks)
        machine.evaluate(world(database=probe("database", "down", "refused")))
        machine.evaluate(world())
        await wait_until(lambda: out.exists() and len(out.read_text().split()) == 2, 10)
        tg.cancel_scope.cancel()

    assert out.read_text().split() == ["emergency", "normal"]
