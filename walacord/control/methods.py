"""The control methods the daemon always has: status, health, probes, mode, pool, config, logs.

Status, probe, mode and pool methods delegate to the component that implements the
matching protocol in `walacord.control.interfaces`; without one they return an
UNAVAILABLE error that names what is missing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from walacord import __version__
from walacord.config import LOG_LEVELS
from walacord.control.interfaces import (
    MAX_REASON_CHARS,
    MODES,
    ModeControl,
    PoolControl,
    ProbeControl,
)
from walacord.control.protocol import ErrorCode
from walacord.control.registry import Call
from walacord.errors import ControlError, ModeOverrideError
from walacord.runtime import Runtime
from walacord.terminal import describe_character, find_nonprinting_character

log = logging.getLogger(__name__)

ModeName = Literal["normal", "degraded", "emergency", "offline"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
assert set(MODES) == set(get_args(ModeName))
assert set(LOG_LEVELS) == set(get_args(LogLevel))

T = TypeVar("T")


# --- parameters -----------------------------------------------------------------


@dataclass(frozen=True)
class ProbesRunParams:
    probes: list[str] | None = None  # None runs every probe


@dataclass(frozen=True)
class ModeSetParams:
    mode: ModeName
    ttl_seconds: float
    reason: str

    def __post_init__(self) -> None:
        # The mode machine checks the upper limit, which is [modes] override_max_ttl.
        if not 0 < self.ttl_seconds < math.inf:
            raise ValueError(f"ttl_seconds must be above 0 and finite, got "
                             f"{self.ttl_seconds:g}")
        _check_reason(self.reason)


@dataclass(frozen=True)
class PoolRecycleParams:
    reason: str = "manual"

    def __post_init__(self) -> None:
        _check_reason(self.reason)


def _check_reason(reason: str) -> None:
    """Raise ValueError unless `reason` is 1 to MAX_REASON_CHARS printable characters."""
    if not reason.strip():
        raise ValueError(f"reason must not be empty; say why, in at most {MAX_REASON_CHARS} "
                         "characters")
    if len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"reason is {len(reason)} characters, over the limit of "
                         f"{MAX_REASON_CHARS}; shorten it")
    _check_printable(reason)


def _check_printable(reason: str) -> None:
    """Raise ValueError when `reason` has a character a terminal would act on or show
    as nothing.

    The reason is shown by `walacorctl status` and written to the logs, so an escape
    sequence in it could rewrite an operator's terminal, and an invisible character
    would make the text differ from what the operator reads.
    """
    found = find_nonprinting_character(reason, prose=True)
    if found is not None:
        position, character = found
        raise ValueError(f"reason has the {describe_character(character)} at position "
                         f"{position}; write it as printable text on one line, without "
                         "invisible characters")


@dataclass(frozen=True)
class LogLevelParams:
    level: LogLevel


# --- registration ---------------------------------------------------------------


def register_core_methods(runtime: Runtime) -> None:
    """Register the methods below on `runtime.methods`."""
    methods = CoreMethods(runtime)
    register = runtime.methods.register
    register("status", methods.status, mutating=False)
    register("health", methods.health, mutating=False)
    register("probes.list", methods.probes_list, mutating=False)
    register("probes.run", methods.probes_run, ProbesRunParams, mutating=False)
    register("mode.get", methods.mode_get, mutating=False)
    register("mode.set", methods.mode_set, ModeSetParams, mutating=True)
    register("mode.clear", methods.mode_clear, mutating=True)
    register("pool.recycle", methods.pool_recycle, PoolRecycleParams, mutating=True)
    register("config.reload", methods.config_reload, mutating=True)
    register("log.set_level", methods.log_set_level, LogLevelParams, mutating=True)


def find_mode_control(runtime: Runtime) -> ModeControl | None:
    """Return the first component that implements ModeControl, or None."""
    for component in list(runtime.components.values()):
        if isinstance(component, ModeControl):
            return component
    return None


def find_probe_control(runtime: Runtime) -> ProbeControl | None:
    """Return the first component that implements ProbeControl, or None."""
    for component in list(runtime.components.values()):
        if isinstance(component, ProbeControl):
            return component
    return None


def find_pool_control(runtime: Runtime) -> PoolControl | None:
    """Return the first component that implements PoolControl, or None."""
    for component in list(runtime.components.values()):
        if isinstance(component, PoolControl):
            return component
    return None


class CoreMethods:
    """Handlers bound to one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _mode(self) -> ModeControl:
        return self._require(find_mode_control(self.runtime), "mode machine", "ModeControl")

    def _probes(self) -> ProbeControl:
        return self._require(find_probe_control(self.runtime), "probes", "ProbeControl")

    def _pool(self) -> PoolControl:
        return self._require(find_pool_control(self.runtime), "database pool", "PoolControl")

    def _require(self, component: T | None, what: str, protocol: str) -> T:
        if component is None:
            starting = "" if self.runtime.ready.is_set() else " yet (the daemon is starting)"
            raise ControlError(ErrorCode.UNAVAILABLE, f"no {what} configured{starting}",
                               {"missing": protocol})
        return component

    # --- status and health ------------------------------------------------------

    async def status(self, params: None, call: Call) -> dict[str, Any]:
        mode = self._mode().mode_state()
        probes = find_probe_control(self.runtime)
        return {
            "mode": mode["mode"],
            "reason": mode["reason"],
            "since": mode["since"],
            "override": mode["override"],
            "probes": probes.probe_states() if probes is not None else {},
            "daemon": self._daemon_facts(),
        }

    async def health(self, params: None, call: Call) -> dict[str, Any]:
        runtime = self.runtime
        mode = find_mode_control(runtime)
        probes = find_probe_control(runtime)
        stalled = runtime.progress.stalled()
        return {
            **self._daemon_facts(),
            "components": sorted(runtime.components),
            "stalled_components": {name: round(seconds, 1) for name, seconds in stalled.items()},
            "mode": mode.mode_state() if mode is not None else None,
            "probes": probes.probe_states() if probes is not None else None,
        }

    def _daemon_facts(self) -> dict[str, Any]:
        runtime = self.runtime
        if runtime.stopping:
            state = "stopping"
        elif runtime.ready.is_set():
            state = "ready"
        else:
            state = "starting"
        return {
            "state": state,
            "version": __version__,
            "environment": runtime.config.environment,
            "uptime_seconds": round(time.monotonic() - runtime.started_at, 3),
            # Settings changed in the file that take effect only after a restart.
            "restart_required": list(runtime.restart_required),
        }

    # --- probes ----------------------------------------------------------------

    async def probes_list(self, params: None, call: Call) -> dict[str, Any]:
        return {"probes": self._probes().probe_states()}

    async def probes_run(self, params: ProbesRunParams, call: Call) -> dict[str, Any]:
        probes = self._probes()
        known = sorted(probes.probe_states())
        names = known if params.probes is None else params.probes
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ControlError(ErrorCode.INVALID_PARAMS,
                               f"unknown probe{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))}; use one of "
                               f"{', '.join(known)}",
                               {"known": known})
        if not names:
            raise ControlError(ErrorCode.INVALID_PARAMS, "no probes to run: the list is empty")
        return {"probes": await probes.run_probes(names)}

    # --- mode ------------------------------------------------------------------

    async def mode_get(self, params: None, call: Call) -> dict[str, Any]:
        return dict(self._mode().mode_state())

    async def mode_set(self, params: ModeSetParams, call: Call) -> dict[str, Any]:
        machine = self._mode()
        try:
            state = await machine.set_override(params.mode, params.ttl_seconds,
                                               params.reason, _actor(call))
        except ModeOverrideError as exc:
            raise ControlError(ErrorCode.INVALID_PARAMS, str(exc), exc.data) from None
        return dict(state)

    async def mode_clear(self, params: None, call: Call) -> dict[str, Any]:
        machine = self._mode()
        return dict(await machine.clear_override(_actor(call)))

    # --- pool ------------------------------------------------------------------

    async def pool_recycle(self, params: PoolRecycleParams, call: Call) -> dict[str, Any]:
        pool = self._pool()
        return await pool.recycle_pool(params.reason)

    # --- configuration and logging ------------------------------------------------

    async def config_reload(self, params: None, call: Call) -> dict[str, Any]:
        runtime = self.runtime
        if runtime.reload_config is None:
            raise ControlError(ErrorCode.UNAVAILABLE,
                               "no supervisor configured to reload the configuration")
        if await runtime.reload_config():
            return {"applied": True, "config": runtime.config.source,
                    "restart_required": list(runtime.restart_required)}
        raise ControlError(
            ErrorCode.OPERATION_FAILED,
            f"configuration {runtime.config_path} was rejected, so the daemon keeps the old "
            f"one; fix the problems below (walacord check-config {runtime.config_path} checks "
            "the file) and reload again",
            {"applied": False, "problems": list(runtime.reload_problems)})

    async def log_set_level(self, params: LogLevelParams, call: Call) -> dict[str, Any]:
        setup = self.runtime.logs
        if setup is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "no log pipeline installed in this process")
        root = logging.getLogger()
        previous = logging.getLevelName(root.level).lower()
        fields = {"from": previous, "to": params.level,
                  "uid": call.peer.uid if call.peer else None}
        # Log under whichever of the two levels lets an info line through.
        if logging.getLevelName(params.level.upper()) <= root.level:
            setup.set_level(params.level)
            log.info("log.level_changed", extra={"fields": fields})
        else:
            log.info("log.level_changed", extra={"fields": fields})
            setup.set_level(params.level)
        return {"level": params.level, "previous": previous,
                "note": "lasts until the next reload or restart, which apply [logging] level"}


def _actor(call: Call) -> str:
    return call.peer.describe() if call.peer is not None else "unknown"

