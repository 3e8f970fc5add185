"""Run external commands so that a timed-out or cancelled one leaves no descendants behind.

Each command starts in a new session, so it leads its own process group. When the
time limit passes or the caller is cancelled, the whole group gets SIGTERM, then
SIGKILL after `KILL_GRACE`, so a hook that started children of its own (`sh -c 'a & b'`)
leaves nothing running.

None of that runs when walacord itself is killed with SIGKILL. Under systemd the unit's
cgroup is killed then, but elsewhere (`walacord dev`, a container without systemd) a
pg_restore or a hook would keep running. So each command also starts through
util-linux's `setpriv --pdeathsig KILL`, which makes the kernel send it SIGKILL when
walacord's thread that started it ends (see `with_parent_death_signal`).
NOTE: only the command itself gets that signal. Processes it started (a hook's
`sh -c 'a & b'`) keep running after a SIGKILL of walacord outside systemd.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterable, Mapping, Sequence
from io import BytesIO

import anyio
from anyio.abc import Process

log = logging.getLogger(__name__)

# Seconds between SIGTERM and SIGKILL to a command's process group.
KILL_GRACE = 1.0
# Seconds to wait for the group to disappear after SIGKILL.
KILL_WAIT = 2.0
# Seconds between checks whether a signalled group is empty.
POLL_INTERVAL = 0.02
# Seconds the one-off check that setpriv supports --pdeathsig may take.
SETPRIV_CHECK_TIMEOUT = 5.0


class _ParentDeathPrefix:
    """The argv prefix that sets the parent-death signal, found once per process."""

    prefix: tuple[str, ...] | None = None  # None until checked; () when unavailable


async def with_parent_death_signal(argv: Sequence[str],
                                   env: Mapping[str, str] | None = None) -> list[str]:
    """Return `argv` prefixed with `setpriv --pdeathsig KILL --` when setpriv supports it
    (util-linux 2.33 and later), else `argv` unchanged.

    The child gets SIGKILL when the thread that started it ends, so call this only for
    commands that the event loop's thread starts. A program that `env`'s PATH (or the
    daemon's) cannot find is returned unchanged, so that starting it still raises
    FileNotFoundError instead of setpriv exiting with an error of its own.
    """
    if _ParentDeathPrefix.prefix is None:
        _ParentDeathPrefix.prefix = await _find_parent_death_prefix()
    prefix = _ParentDeathPrefix.prefix
    search_path = None if env is None else env.get("PATH", os.defpath)
    if not prefix or shutil.which(argv[0], path=search_path) is None:
        return list(argv)
    return [*prefix, *argv]


async def _find_parent_death_prefix() -> tuple[str, ...]:
    """Return the setpriv prefix when a trial run of it works, else () after a warning."""
    setpriv = shutil.which("setpriv")
    prefix: tuple[str, ...] = ()
    if setpriv is None:
        reason = "setpriv (util-linux) is not installed"
    else:
        prefix = (setpriv, "--pdeathsig", "KILL", "--")
        try:
            with anyio.fail_after(SETPRIV_CHECK_TIMEOUT):
                result = await anyio.run_process([*prefix, setpriv, "--version"],
                                                 check=False)
        except (OSError, TimeoutError) as exc:
            reason = f"{setpriv} --pdeathsig did not run: {str(exc) or 'timed out'}"
        else:
            if result.returncode == 0:
                return prefix
            reason = (f"{setpriv} --pdeathsig exited with {result.returncode}: "
                      f"{result.stderr.decode(errors='replace').strip()}")
    log.warning("process.no_parent_death_signal", extra={"fields": {
        "reason": reason,
        "effect": "commands walacord runs keep running if walacord is killed with SIGKILL "
                  "outside systemd"}})
    return ()


async def run_in_group(argv: Sequence[str], time_limit: float, env: Mapping[str, str], *,
                       input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` in a new session and return its exit code, stdout and stderr.

    Raises TimeoutError after `time_limit` seconds and OSError when the command cannot
    start. On a timeout, on cancellation and on any other error, the process group is
    killed and the command reaped before the exception propagates.
    """
    # NOTE: after a normal exit the group is left alone, so a background process that
    # closed its stdout and stderr keeps running. One that keeps them open makes the
    # command run until the time limit, and is killed then.
    process = await anyio.open_process(
        await with_parent_death_signal(argv, env), env=dict(env), start_new_session=True,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
    output: list[bytes] = [b"", b""]
    try:
        with anyio.fail_after(time_limit):
            async with anyio.create_task_group() as tg:
                if process.stdout is not None:
                    tg.start_soon(_drain, process.stdout, output, 0)
                if process.stderr is not None:
                    tg.start_soon(_drain, process.stderr, output, 1)
                if process.stdin is not None and input is not None:
                    await process.stdin.send(input)
                    await process.stdin.aclose()
                returncode = await process.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await kill_group(process)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return subprocess.CompletedProcess(list(argv), returncode, output[0], output[1])


async def kill_group(process: Process) -> None:
    """Kill the process group that `process` leads, and reap `process`.

    Sends SIGTERM to the group, waits up to `KILL_GRACE` seconds for it to empty, then
    sends SIGKILL. Descendants that left the group with setsid() or setpgid() escape.
    """
    # The leader's pid is the group id, and the kernel does not reuse it while any
    # member of the group, the unreaped leader included, still exists.
    group = process.pid
    if _signal_group(group, signal.SIGTERM) and not await _wait_empty(group, KILL_GRACE):
        log.warning("process.sigterm_ignored", extra={"fields": {
            "pgid": group, "grace_seconds": KILL_GRACE}})
        _signal_group(group, signal.SIGKILL)
        await _wait_empty(group, KILL_WAIT)
    with anyio.move_on_after(KILL_WAIT):
        await process.wait()


def group_members(group: int) -> list[int]:
    """Return the pids of the live (not zombie) processes in process group `group`.

    Reads /proc, so it works only on Linux.
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == group and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def _signal_group(group: int, signum: int) -> bool:
    """Send `signum` to process group `group`, and return False when the group is gone."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


async def _wait_empty(group: int, seconds: float) -> bool:
    """Wait up to `seconds` for group `group` to have no live member; return whether it has none."""
    deadline = time.monotonic() + seconds
    while group_members(group):
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(POLL_INTERVAL)
    return True


async def _drain(stream: AsyncIterable[bytes], output: list[bytes], index: int) -> None:
    buffer = BytesIO()
    async for chunk in stream:
        buffer.write(chunk)
    output[index] = buffer.getvalue()
