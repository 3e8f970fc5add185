"""The table of control methods: each capability registers its own at construction.

    runtime.methods.register("outbox.stats", handler, mutating=False)
    runtime.methods.register("mode.set", set_mode, params=ModeSetParams, mutating=True)

A handler is `async def handler(params, call) -> result`: `params` is the validated
parameters (an instance of the `params` dataclass, or None when the method takes none)
and `call` is a `Call` with the peer's identity and a `progress()` function. The result
must be encodable by orjson. A handler raises `ControlError` for an error the client
should see verbatim, and `WalacordError` for a failed operation. Any other exception
becomes an internal error for the client and is logged with its traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from walacord.control.protocol import ErrorCode, RequestId
from walacord.errors import ControlError

ProgressSender = Callable[[float, float | None, str], Awaitable[None]]


@dataclass(frozen=True)
class Peer:
    """The process on the other end of a control connection, from SO_PEERCRED."""

    pid: int
    uid: int
    gid: int

    def describe(self) -> str:
        return f"uid={self.uid} pid={self.pid}"


@dataclass
class Call:
    """The request a handler serves: method, id, peer and a progress sender."""

    method: str
    request_id: RequestId
    peer: Peer | None
    send_progress: ProgressSender | None = None

    async def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Send a progress line to the client; walacorctl draws it as a bar on a TTY."""
        if self.send_progress is not None:
            await self.send_progress(done, total, message)


Handler = Callable[[Any, Call], Awaitable[Any]]
# A batch handler serves several pipelined calls of one method at once. It takes their
# validated params and calls and returns one result or exception per call, in order.
BatchHandler = Callable[[list[Any], list[Call]], Awaitable[Sequence[Any]]]
# A submit handler starts a call without a task: (params, timeout seconds, on_done).
# It calls on_done on the event loop with the result or the call's exception, at the
# latest shortly after the timeout. Later calls of on_done are ignored, and the
# connection reports a TimeoutError as the call's CALL_TIMEOUT error.
SubmitHandler = Callable[[Any, float, Callable[[Any], None]], None]
PlainHandler = Callable[[Mapping[str, Any]], Awaitable[Any]]


ProgressHandler = Callable[..., Awaitable[Any]]
PROGRESS_INTERVAL = 0.25
# A long step, such as pg_dump waiting for a table lock, reports no progress for a
# while. The latest line is sent again this often, so walacorctl, whose every read
# has a deadline, can tell a busy daemon from a stuck one.
PROGRESS_HEARTBEAT = 2.0


def _adapt_progress(handler: ProgressHandler) -> Handler:
    """Wrap `handler(params, progress=callback)`; send the latest progress every 0.25 s.

    Unchanged progress is sent again every PROGRESS_HEARTBEAT seconds.
    """

    async def call_with_progress(params: Any, call: Call) -> Any:
        latest: list[tuple[float, float | None, str]] = []

        def progress(done: float, total: float | None = None, message: str = "") -> None:
            latest[:] = [(done, total, message)]

        async def pump() -> None:
            sent = None
            sent_at = anyio.current_time()
            while True:
                await anyio.sleep(PROGRESS_INTERVAL)
                current = latest[0] if latest else (0, None, "in progress")
                if current != sent or anyio.current_time() - sent_at >= PROGRESS_HEARTBEAT:
                    sent, sent_at = current, anyio.current_time()
                    await call.progress(*sent)

        outcome: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                outcome.append(await handler(params or {}, progress=progress))
            except Exception as exc:
                # Raised outside the task group, so the caller sees the handler's own
                # exception and not an ExceptionGroup around it.
                outcome.append(exc)
            finally:
                tg.cancel_scope.cancel()
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    return call_with_progress


def _adapt(handler: PlainHandler) -> Handler:
    async def call_plain(params: Any, call: Call) -> Any:
        return await handler(params or {})

    return call_plain


@dataclass(frozen=True)
class Method:
    """One registered method and how to call it."""

    name: str
    handler: Handler
    params: type[Any] | None
    mutating: bool
    audit: bool
    timeout: float | None
    concurrent: bool = False
    batch_handler: BatchHandler | None = None
    submit: SubmitHandler | None = None


class MethodRegistry:
    """Method name -> Method. Registration happens before the control server starts."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, name: str, handler: Handler, params: type[Any] | None = None, *,
                 mutating: bool, audit: bool | None = None,
                 timeout: float | None = None, concurrent: bool = False,
                 batch_handler: BatchHandler | None = None,
                 submit: SubmitHandler | None = None) -> None:
        """Add a method; raise ValueError when the name is taken.

        `params` is a dataclass whose fields are the accepted parameters. `mutating`
        methods change the daemon's behaviour: each call is logged with the peer
        (unless `audit=False`, for high-rate methods that log on their own) and they
        are rejected once shutdown has begun. `timeout` overrides `[control] call_timeout`.
        A `concurrent` method runs at the same time as the concurrent requests that a
        client pipelined behind it, so its handler must allow that and must not send
        progress. A `batch_handler` makes the method concurrent and serves such a run of
        its own requests in one call. With `submit`, a connection serves a request
        that arrives alone through that callback instead of `handler`, which spares
        the task switches of a call.
        """
        if name in self._methods:
            raise ValueError(f"control method {name!r} is already registered")
        if params is not None and params is not dict and not dataclasses.is_dataclass(params):
            raise ValueError(f"params of {name!r} must be a dataclass, got {params!r}")
        if params is not None and params is not dict:
            _type_hints(params)  # resolve the annotations now, so a typo fails at start-up
        self._methods[name] = Method(name, handler, params, mutating,
                                     mutating if audit is None else audit, timeout,
                                     concurrent or batch_handler is not None, batch_handler,
                                     submit)

    def register_plain(self, handlers: Mapping[str, PlainHandler], *, mutating: Set[str],
                       timeouts: Mapping[str, float] | None = None) -> None:
        """Register handlers that take the params dict alone and validate it themselves."""
        for name, handler in handlers.items():
            self.register(name, _adapt(handler), dict, mutating=name in mutating,
                          timeout=(timeouts or {}).get(name))

    def register_with_progress(self, name: str, handler: ProgressHandler, *, mutating: bool,
                               timeout: float | None = None) -> None:
        """Register a plain handler that reports progress through a sync callback."""
        self.register(name, _adapt_progress(handler), dict, mutating=mutating, timeout=timeout)

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods


# --- parameter validation -------------------------------------------------------


def parse_params(method: str, model: type[Any] | None, params: dict[str, Any]) -> Any:
    """Build the `model` dataclass from request params; raise ControlError INVALID_PARAMS.

    `model` dict passes the params through unchanged, for handlers that validate them
    field by field themselves.
    """
    if model is dict:
        return params
    if model is None:
        if params:
            raise _invalid(method, f"{method} takes no params, got {_names(params)}")
        return None

    fields = {f.name: f for f in dataclasses.fields(model) if f.init}
    reject_unknown_params(method, params, fields.keys())

    hints = _type_hints(model)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in params:
            if (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING):
                raise _invalid(method, f"missing param {name!r} for {method}")
            continue
        values[name] = _check_type(method, name, params[name], hints[name])

    try:
        instance = model(**values)
    except (TypeError, ValueError) as exc:
        # A model's __post_init__ raises ValueError with the rule it checks.
        raise _invalid(method, f"invalid params for {method}: {exc}") from None
    return instance


def reject_unknown_params(method: str, params: Mapping[str, Any], accepted: Set[str]) -> None:
    """Raise ControlError INVALID_PARAMS naming the params of `method` not in `accepted`.

    Handlers that take the params dict and validate it themselves call this too, so
    their message is the one that methods with a params dataclass send.
    """
    unknown = params.keys() - accepted
    if unknown:
        raise _invalid(method, f"unknown param(s) {_names(unknown)} for {method}; "
                       f"accepted: {_names(accepted)}")


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _type_hints(model: type[Any]) -> dict[str, Any]:
    """Return the resolved annotations of `model`, cached because requests use them often."""
    hints = _HINTS.get(model)
    if hints is None:
        hints = _HINTS[model] = typing.get_type_hints(model)
    return hints


def _check_type(method: str, name: str, value: Any, expected: Any) -> Any:
    if _matches(value, expected):
        return float(value) if expected is float else value
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise _invalid(method, f"invalid param {name!r} for {method}: {shown} is not "
                   f"{_describe(expected)}")


def _matches(value: Any, expected: Any) -> bool:
    """Return whether a decoded JSON value fits the annotation `expected`."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if origin is Literal:
        return value in typing.get_args(expected) and not isinstance(value, bool)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    raise TypeError(f"unsupported param annotation {expected!r}")


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(expected))
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return f"a list of {_describe(item)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null", dict: "an object"}.get(expected, str(expected))


def _names(keys: Any) -> str:
    listed = sorted(str(k)[:40] for k in keys)
    if len(listed) > 10:
        listed = [*listed[:10], "..."]
    return ", ".join(listed) or "(none)"


def _invalid(method: str, message: str) -> ControlError:
    return ControlError(ErrorCode.INVALID_PARAMS, message, {"method": method})
