"""Authorisation: the socket's mode and group, then SO_PEERCRED, with real other users.

The clients run as `nobody` through setpriv, so these tests need root.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import anyio
import pytest

from tests.control.harness import make_config, running_server, walacorctl
from tests.control.standins import StandInMonitor
from walacord.control.auth import AccessPolicy, peer_credentials, supplementary_groups
from walacord.control.registry import Peer

NOBODY = 65534
DAEMON_GROUP = ("daemon", 1)  # present on Debian and Ubuntu base images
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
AS_NOBODY_IN_GROUP = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                      f"--groups={DAEMON_GROUP[1]}")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def test_policy_allows_root_and_own_uid() -> None:
    policy = AccessPolicy(daemon_uid=1234, group_name="ops", group_gid=500)
    assert policy.fast_decision(Peer(pid=1, uid=0, gid=0)) is True
    assert policy.fast_decision(Peer(pid=1, uid=1234, gid=1234)) is True
    assert policy.fast_decision(Peer(pid=1, uid=2000, gid=500)) is True
    assert policy.fast_decision(Peer(pid=1, uid=2000, gid=2000)) is None


def test_policy_without_group_allows_no_one_else() -> None:
    policy = AccessPolicy(daemon_uid=1234, group_name="missing", group_gid=None)
    assert policy.allows(Peer(pid=os.getpid(), uid=2000, gid=2000)) is False


def test_supplementary_groups_read_from_proc() -> None:
    expected = set(os.getgroups())
    assert supplementary_groups(Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())) \
        == expected


def test_peer_credentials_of_socketpair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        peer = peer_credentials(left)
    assert peer == Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


@needs_root
@pytest.mark.anyio
async def test_outsider_refused_by_peer_credentials(socket_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = socket_dir / "c.sock"
    caplog.set_level(logging.INFO, logger="walacord")
    async with running_server(make_config(path, group=DAEMON_GROUP[0]), [StandInMonitor()]):
        # Loosen the file mode by hand, so only the SO_PEERCRED check can reject the client.
        path.chmod(0o666)
        result = await anyio.to_thread.run_sync(
            lambda: walacorctl("status", socket=path, user=AS_NOBODY))

    assert result.returncode == 3
    assert f"permission denied: uid {NOBODY}" in result.stderr
    assert "join group 'daemon'" in result.stderr
    refusals = [r for r in caplog.records if r.getMessage() == "control.permission_denied"]
    assert len(refusals) == 1
    assert refusals[0].fields["uid"] == NOBODY  # type: ignore[attr-defined]
    assert refusals[0].levelno == logging.WARNING


@needs_root
@pytest.mark.anyio
async def test_outsider_stopped_by_socket_mode(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    async with running_server(make_config(path, group=DAEMON_GROUP[0])):
        result = await anyio.to_thread.run_sync(
            lambda: walacorctl("status", socket=path, user=AS_NOBODY))
    assert result.returncode == 3
    assert f"permission denied on {path}" in result.stderr
    assert "join group 'daemon'" in result.stderr


@needs_root
@pytest.mark.anyio
async def test_group_member_allowed(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    async with running_server(make_config(path, group=DAEMON_GROUP[0]), [StandInMonitor()]):
        result = await anyio.to_thread.run_sync(
            lambda: walacorctl("--json", "status", socket=path, user=AS_NOBODY_IN_GROUP))
    assert result.returncode == 0, result.stderr
    assert '"mode": "normal"' in result.stdout
