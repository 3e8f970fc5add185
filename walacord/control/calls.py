"""Method calls of a control connection: admission, deadline and the response line.

`run_call` serves one request. `submit_call` starts one through the method's submit
handler and passes the response line to a callback, with no task involved.
`run_batch` serves several pipelined requests of one method through its batch handler
in a single call, under one deadline, and returns one response line per request, in
request order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from walacord.control.protocol import ErrorCode, Request, encode_error, encode_result
from walacord.control.registry import Call, Method, Peer, ProgressSender, parse_params
from walacord.errors import ControlError, WalacordError

if TYPE_CHECKING:
    from walacord.control.server import ControlServer

log = logging.getLogger(__name__)


def admit(server: ControlServer, peer: Peer, method: Method, request: Request) -> Any:
    """Return the request's validated params; raise ControlError when it may not run."""
    if method.mutating and server.runtime.stopping:
        raise ControlError(ErrorCode.STOPPING,
                           f"the daemon is shutting down; {method.name} was not run")
    params = parse_params(method.name, method.params, request.params)
    if method.audit:
        log.info("control.call", extra={"fields": {
            "method": method.name, "params": request.params, "uid": peer.uid,
            "pid": peer.pid}})
    return params


def call_timeout(server: ControlServer, method: Method) -> float:
    return method.timeout or server.runtime.config.control.call_timeout


def timed_out(method: Method, timeout: float) -> ControlError:
    return ControlError(ErrorCode.CALL_TIMEOUT, f"{method.name} did not finish within "
                        f"{timeout:g}s", {"timeout_seconds": timeout})


def respond(server: ControlServer, peer: Peer, method: Method, request: Request,
            outcome: Any) -> bytes:
    """Encode a handler's result, or the exception it ended with, as the response line.

    Count the outcome, and log failures that the client cannot explain by itself.
    """
    counters = server.request_metrics(method.name)
    if not isinstance(outcome, Exception):
        counters.ok.inc()
        return encode_result(request.id, outcome)

    counters.error.inc()
    if isinstance(outcome, ControlError):
        return encode_error(request.id, outcome.code, outcome.message, outcome.data)
    if isinstance(outcome, WalacordError):
        log.warning("control.call_failed", extra={"fields": {
            "method": method.name, "error": str(outcome), "uid": peer.uid}})
        return encode_error(request.id, ErrorCode.OPERATION_FAILED,
                            f"{method.name} failed: {outcome}")
    log.error("control.handler_crashed", exc_info=outcome,
              extra={"fields": {"method": method.name}})
    return encode_error(request.id, ErrorCode.INTERNAL_ERROR,
                        f"internal error in {method.name}; the daemon log has the traceback "
                        "(event control.handler_crashed)")


async def run_call(server: ControlServer, peer: Peer, method: Method, request: Request,
                   send_progress: ProgressSender) -> bytes:
    """Run the handler under its deadline and return the encoded response line."""
    began = time.monotonic()
    outcome: Any
    try:
        params = admit(server, peer, method, request)
        call = Call(method.name, request.id, peer, send_progress)
        timeout = call_timeout(server, method)
        # A bare CancelScope, because fail_after's context manager adds a few
        # microseconds to every request. A handler's own TimeoutError counts too.
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
                outcome = await method.handler(params, call)
        except TimeoutError:
            raise timed_out(method, timeout) from None
        if scope.cancelled_caught:
            raise timed_out(method, timeout)
    except Exception as exc:
        outcome = exc
    response = respond(server, peer, method, request, outcome)
    server.request_metrics(method.name).duration.observe(time.monotonic() - began)
    return response


def submit_call(server: ControlServer, peer: Peer, method: Method, request: Request,
                on_response: Callable[[bytes], None]) -> None:
    """Start the request through `method.submit`; pass its response line to `on_response`.

    `on_response` runs once, possibly before this returns. The submit handler keeps
    the deadline, and its TimeoutError becomes CALL_TIMEOUT as in `run_call`.
    """
    assert method.submit is not None
    began = time.monotonic()
    timeout = call_timeout(server, method)
    answered = False

    def finish(outcome: Any) -> None:
        nonlocal answered
        if answered:
            return
        answered = True
        if isinstance(outcome, TimeoutError):
            outcome = timed_out(method, timeout)
        response = respond(server, peer, method, request, outcome)
        server.request_metrics(method.name).duration.observe(time.monotonic() - began)
        on_response(response)

    try:
        params = admit(server, peer, method, request)
        method.submit(params, timeout, finish)
    except Exception as exc:
        finish(exc)


async def run_batch(server: ControlServer, peer: Peer, method: Method,
                    requests: Sequence[Request]) -> list[bytes]:
    """Run the batch handler once for `requests`; return their response lines in order.

    A request that is not admitted gets its error and stays out of the batch. When
    the deadline passes or the handler raises, every request in the batch gets that
    error.
    """
    assert method.batch_handler is not None
    began = time.monotonic()
    outcomes: list[Any] = [None] * len(requests)
    admitted: list[int] = []
    params: list[Any] = []
    for index, request in enumerate(requests):
        try:
            params.append(admit(server, peer, method, request))
        except ControlError as exc:
            outcomes[index] = exc
            continue
        admitted.append(index)

    if admitted:
        calls = [Call(method.name, requests[index].id, peer) for index in admitted]
        timeout = call_timeout(server, method)
        results: Sequence[Any]
        try:
            with anyio.fail_after(timeout):
                results = await method.batch_handler(params, calls)
        except TimeoutError:
            results = [timed_out(method, timeout)] * len(admitted)
        except Exception as exc:
            results = [exc] * len(admitted)
        for index, result in zip(admitted, results, strict=True):
            outcomes[index] = result

    responses = [respond(server, peer, method, request, outcome)
                 for request, outcome in zip(requests, outcomes, strict=True)]
    duration = server.request_metrics(method.name).duration
    seconds = time.monotonic() - began
    for _ in requests:
        duration.observe(seconds)
    return responses
