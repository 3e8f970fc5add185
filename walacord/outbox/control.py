"""Control-channel methods of the outbox, as plain async functions.

Each handler takes the running `Outbox` and the request's `params` object and returns
a JSON-ready result, or raises ControlError with a code and a message naming the bad
field. `HANDLERS` maps method names to handlers for the control server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio

from walacord.control.registry import Call, MethodRegistry
from walacord.errors import (
    ControlError,
    OutboxConflict,
    OutboxDiskFull,
    OutboxError,
    OutboxFull,
    OutboxInvalidOperation,
    OutboxNotFound,
    OutboxRequestTooLarge,
    OutboxStarting,
    OutboxStateDirUnusable,
)
from walacord.outbox.model import MAX_PAGE, NewOperation, State, parse_operation
from walacord.outbox.service import Outbox
from walacord.outbox.store import EnqueueResult, Outcomes
from walacord.outbox.sync import PassReport

log = logging.getLogger(__name__)

# The control protocol's error codes (walacord.control.protocol.ErrorCode): JSON-RPC's
# invalid params, and its "operation failed" for outbox errors, whose `data.reason`
# distinguishes them.
INVALID_PARAMS = -32602
OPERATION_FAILED = -32009
MAX_BATCH = 10_000

PROGRESS_INTERVAL = 0.5
# Dead operations that a sync.run reply names when they hold back pending ones.
BLOCKER_IDS = 5
# Deadline of a sync.run call; its own `timeout` parameter, default 3600 s, is checked
# inside it.
SYNC_RUN_TIMEOUT = 3700.0

Handler = Callable[[Outbox, dict[str, Any]], Awaitable[Any]]
# (done, total, message), as the control server's progress lines carry them. The
# callback only records the latest figures, and the control server sends them.
Progress = Callable[[float, float | None, str], None]
MUTATING = frozenset({"outbox.enqueue", "outbox.retry", "outbox.drop", "sync.run"})


def _control_error(exc: OutboxError) -> ControlError:
    if isinstance(exc, OutboxInvalidOperation):
        return ControlError(INVALID_PARAMS, str(exc), {"field": exc.field})
    reason = {OutboxFull: "outbox_full", OutboxRequestTooLarge: "request_too_large",
              OutboxDiskFull: "disk_full",
              OutboxNotFound: "not_found", OutboxConflict: "conflict",
              OutboxStateDirUnusable: "state_dir_unusable", OutboxStarting: "starting",
              }.get(type(exc), "outbox_error")
    return ControlError(OPERATION_FAILED, str(exc), {"reason": reason})


def _int_param(params: dict[str, Any], name: str, default: int | None = None, *,
               minimum: int = 0, maximum: int | None = None) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(INVALID_PARAMS, f"{name}: expected an integer, got {value!r}",
                           {"field": name})
    if value < minimum or (maximum is not None and value > maximum):
        raise ControlError(INVALID_PARAMS, f"{name}: {value} is outside {minimum}.."
                           f"{maximum if maximum is not None else ''}", {"field": name})
    return value


def _states(params: dict[str, Any]) -> list[State]:
    raw = params.get("state")
    names = [raw] if isinstance(raw, str) else (raw or [])
    try:
        return [State(name) for name in names]
    except ValueError:
        raise ControlError(INVALID_PARAMS, f"state: unknown state in {raw!r}; use "
                           f"{', '.join(s.value for s in State)}", {"field": "state"}) from None


# --- handlers -------------------------------------------------------------------


def _parse_enqueue(outbox: Outbox, params: dict[str, Any]) -> list[NewOperation]:
    """Validate the operations of one outbox.enqueue request; raise ControlError."""
    batch = "operations" in params
    raw = params["operations"] if batch else [params]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_BATCH:
        raise ControlError(INVALID_PARAMS, f"operations: expected a list of 1 to {MAX_BATCH} "
                           "operations", {"field": "operations"})

    parsed: list[NewOperation] = []
    statements = outbox.config.statements
    for index, item in enumerate(raw):
        try:
            parsed.append(parse_operation(item, statements=statements,
                                          max_bytes=outbox.config.max_operation_bytes,
                                          key_field=outbox.walacor_key_field))
        except OutboxInvalidOperation as exc:
            field = f"operations[{index}].{exc.field}" if batch else exc.field
            raise ControlError(INVALID_PARAMS, f"{field}: {exc.detail}",
                               {"field": field}) from None
    return parsed


def _enqueue_reply(params: dict[str, Any], results: list[EnqueueResult]) -> dict[str, Any]:
    replies = [{"id": r.operation.id, "key": r.operation.key,
                "state": r.operation.state.value, "created": r.created} for r in results]
    return {"results": replies} if "operations" in params else replies[0]


async def outbox_enqueue(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    """Enqueue one operation (params are the operation) or a batch (`operations`)."""
    parsed = _parse_enqueue(outbox, params)
    try:
        results = await outbox.store.enqueue(parsed)
    except OutboxError as exc:
        raise _control_error(exc) from None
    outbox.engine.operations_added(r.operation.sink for r in results if r.created)
    return _enqueue_reply(params, results)


def submit_enqueue(outbox: Outbox, params: Any, timeout: float,
                   on_done: Callable[[Any], None]) -> None:
    """Start one outbox.enqueue request as `outbox_enqueue` serves it; `on_done` gets
    the reply, or the ControlError or TimeoutError that ended the call."""
    try:
        _require_open(outbox)
        if not isinstance(params, dict):
            params = dict(params or {})
        parsed = _parse_enqueue(outbox, params)
    except ControlError as exc:
        on_done(exc)
        return

    def stored(outcome: Outcomes | OutboxError | TimeoutError) -> None:
        # This runs in the store's writer, which must not see an exception.
        try:
            if isinstance(outcome, TimeoutError):
                on_done(outcome)
                return
            result = outcome if isinstance(outcome, OutboxError) else outcome[0]
            if isinstance(result, OutboxError):
                on_done(_control_error(result))
                return
            outbox.engine.operations_added(r.operation.sink for r in result if r.created)
            reply = _enqueue_reply(params, result)
        except Exception as exc:
            on_done(exc)
            return
        on_done(reply)

    outbox.store.submit_each([parsed], stored, timeout=timeout)


async def outbox_enqueue_each(outbox: Outbox, params_list: list[dict[str, Any]]
                              ) -> list[dict[str, Any] | ControlError]:
    """Serve pipelined outbox.enqueue requests at once; one reply or error per request.

    Each request is validated, accepted and rejected on its own, as `outbox_enqueue`
    does, but all of them reach the store together and usually share one commit.
    """
    outcomes: list[dict[str, Any] | ControlError] = []
    valid: list[tuple[int, list[NewOperation]]] = []
    for index, params in enumerate(params_list):
        try:
            valid.append((index, _parse_enqueue(outbox, params)))
        except ControlError as exc:
            outcomes.append(exc)
            continue
        outcomes.append({})

    stored = await outbox.store.enqueue_each([parsed for _, parsed in valid])
    added: set[str] = set()
    for (index, _), result in zip(valid, stored, strict=True):
        if isinstance(result, OutboxError):
            outcomes[index] = _control_error(result)
        else:
            outcomes[index] = _enqueue_reply(params_list[index], result)
            added.update(r.operation.sink for r in result if r.created)
    outbox.engine.operations_added(added)
    return outcomes


async def outbox_stats(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    stats = await outbox.store.check_conservation()
    result = stats.to_json(time.time())
    result["full"] = outbox.store.full
    result["disk_full"] = outbox.store.disk_full
    return result


async def outbox_list(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    """List operations without payloads, `limit` at a time after `after_id`."""
    limit = _int_param(params, "limit", 100, minimum=1, maximum=MAX_PAGE)
    after_id = _int_param(params, "after_id", 0)
    operations = await outbox.store.list(states=_states(params), after_id=after_id,
                                         limit=limit)
    waiting = await outbox.store.waits_behind(operations)
    rows = []
    for operation in operations:
        row = operation.to_json(with_payload=False)
        row["blocked_by"] = waiting.get(operation.id)
        rows.append(row)
    return {"operations": rows,
            "next_after_id": operations[-1].id if len(operations) == limit else None}


async def outbox_show(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    """Return one operation with its payload, by `id` or by idempotency `key`."""
    key = params.get("key")
    if key is not None and "id" in params:
        raise ControlError(INVALID_PARAMS, "pass id or key, not both", {"field": "key"})
    if key is not None and (not isinstance(key, str) or not key):
        raise ControlError(INVALID_PARAMS, f"key: expected a non-empty string, got {key!r}",
                           {"field": "key"})
    try:
        operation = await (outbox.store.get_by_key(key) if key is not None
                           else outbox.store.get(_int_param(params, "id")))
    except OutboxError as exc:
        raise _control_error(exc) from None
    reply = operation.to_json()
    # The id of the dead operation with the same ordering key that this pending one
    # waits behind, or None.
    reply["blocked_by"] = (await outbox.store.waits_behind([operation])).get(operation.id)
    return reply


async def outbox_retry(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    """Return one operation (`id`) or every dead one (`all_dead`) to pending."""
    if params.get("all_dead") is True:
        count = await outbox.store.retry(all_dead=True)
    elif "id" in params:
        op_id = _int_param(params, "id")
        count = await outbox.store.retry([op_id])
        if count == 0:
            raise await _not_retried(outbox, op_id)
    else:
        raise ControlError(INVALID_PARAMS, "pass id or all_dead=true", {"field": "id"})
    log.info("outbox.retried", extra={"fields": {"count": count}})
    outbox.engine.wake()
    return {"retried": count}


async def _not_retried(outbox: Outbox, op_id: int) -> ControlError:
    """Return the error for a retry of `op_id` that changed nothing, naming its state."""
    try:
        operation = await outbox.store.get(op_id)
    except OutboxNotFound:
        return ControlError(OPERATION_FAILED, f"no outbox operation has id {op_id}",
                            {"reason": "not_found"})
    state = operation.state.value
    advice = {"in_flight": "it is being applied now; its outcome decides what comes next",
              "done": "it was applied, so there is nothing to retry"}
    return ControlError(OPERATION_FAILED, f"operation {op_id} is {state}: "
                        f"{advice.get(state, 'only dead or pending operations can be retried')}",
                        {"reason": state})


async def outbox_drop(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    """Delete a pending or dead operation; needs `confirm: true` (walacorctl --yes)."""
    op_id = _int_param(params, "id")
    if params.get("confirm") is not True:
        raise ControlError(INVALID_PARAMS, "dropping an operation loses it for good; pass "
                           "confirm=true (walacorctl: --yes)", {"field": "confirm"})
    reason = str(params.get("reason") or "dropped by an operator")
    try:
        operation = await outbox.store.drop(op_id, reason=reason)
    except OutboxError as exc:
        raise _control_error(exc) from None
    return {"dropped": operation.to_json(with_payload=False)}


async def outbox_export(outbox: Outbox, params: dict[str, Any]) -> dict[str, Any]:
    """Return operations with payloads, `limit` at a time; callers page on next_after_id."""
    limit = _int_param(params, "limit", 1000, minimum=1, maximum=MAX_PAGE)
    after_id = _int_param(params, "after_id", 0)
    operations = await outbox.store.list(states=_states(params), after_id=after_id,
                                         limit=limit)
    return {"operations": [op.to_json() for op in operations],
            "next_after_id": operations[-1].id if len(operations) == limit else None}


async def _sync_with_progress(outbox: Outbox, progress: Progress | None) -> PassReport:
    """Run `sync_now()`, sending (done, total, message) twice a second while it runs."""
    if progress is None:
        return await outbox.engine.sync_now()

    # Operations blocked behind a dead one cannot be applied by this pass, so they are
    # left out of the total.
    start = await outbox.store.stats()
    total = start.pending + start.in_flight - start.blocked
    result: list[PassReport] = []

    async def run_pass() -> None:
        result.append(await outbox.engine.sync_now())
        tasks.cancel_scope.cancel()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run_pass)
        while True:
            now = await outbox.store.stats()
            left = now.pending + now.in_flight - now.blocked
            progress(max(0, total - left), total, f"{left} operations left")
            await anyio.sleep(PROGRESS_INTERVAL)
    return result[0]


async def sync_run(outbox: Outbox, params: dict[str, Any], *,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Run a sync pass over every sink now; with `wait` (default) return its report.

    With `all`, pending operations waiting out a retry backoff are made due first.
    """
    _require_open(outbox)
    make_all_due = params.get("all", False)
    if not isinstance(make_all_due, bool):
        raise ControlError(INVALID_PARAMS, "all: expected true or false", {"field": "all"})
    made_due = await outbox.store.make_due() if make_all_due else None
    if params.get("wait", True) is False:
        outbox.engine.wake()
        return {"started": True} if made_due is None else {"started": True,
                                                           "made_due": made_due}
    timeout = params.get("timeout", 3600)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ControlError(INVALID_PARAMS, "timeout: expected a positive number of seconds",
                           {"field": "timeout"})
    try:
        with anyio.fail_after(timeout):
            report = await _sync_with_progress(outbox, progress)
    except TimeoutError:
        raise ControlError(OPERATION_FAILED, f"sync pass still running after {timeout}s; it "
                           "goes on in the background", {"reason": "timeout"}) from None
    result = report.to_json()
    if made_due is not None:
        result["made_due"] = made_due
    result["stats"] = await outbox_stats(outbox, {})
    # Pending operations behind a dead one with their ordering key are never due, and
    # `all` does not change that, so the reply names the dead operations to act on.
    result["blockers"] = (await outbox.store.blockers(BLOCKER_IDS)).to_json()
    return result


HANDLERS: dict[str, Handler] = {
    "outbox.enqueue": outbox_enqueue,
    "outbox.stats": outbox_stats,
    "outbox.list": outbox_list,
    "outbox.show": outbox_show,
    "outbox.retry": outbox_retry,
    "outbox.drop": outbox_drop,
    "outbox.export": outbox_export,
    "sync.run": sync_run,
}


def _require_open(outbox: Outbox) -> None:
    try:
        outbox.store.require_open()
    except OutboxError as exc:
        raise _control_error(exc) from None


async def _enqueue_each_handler(outbox: Outbox, params: list[Any], calls: list[Call]
                               ) -> list[dict[str, Any] | ControlError]:
    try:
        _require_open(outbox)
    except ControlError as exc:
        return [exc] * len(params)
    return await outbox_enqueue_each(outbox, [dict(each or {}) for each in params])


def _bound(handler: Handler, outbox: Outbox) -> Callable[[Any, Call], Awaitable[Any]]:
    async def call_handler(params: Any, call: Call) -> Any:
        _require_open(outbox)
        return await handler(outbox, dict(params or {}))

    return call_handler


def register_methods(methods: MethodRegistry, outbox: Outbox) -> None:
    """Register the outbox methods on the control server's method table."""
    # Enqueue is high-rate, so the server does not log each call; drop and retry log
    # their own event with the ids. Pipelined enqueues are served together by one
    # batch handler call, so they share the store's group commit.
    for name, handler in HANDLERS.items():
        if name != "sync.run":
            enqueue = name == "outbox.enqueue"
            methods.register(name, _bound(handler, outbox), dict, mutating=name in MUTATING,
                             audit=False if enqueue else None,
                             batch_handler=partial(_enqueue_each_handler, outbox) if enqueue
                             else None,
                             submit=partial(submit_enqueue, outbox) if enqueue else None)
    methods.register_with_progress("sync.run", partial(sync_run, outbox), mutating=True,
                                   timeout=SYNC_RUN_TIMEOUT)
