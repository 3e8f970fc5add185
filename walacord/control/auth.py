"""Who may use the control socket: root, the daemon's own user and the configured group.

The socket file's mode 0660 and group are the first check, made by the kernel on
connect. The second check reads the peer's credentials with SO_PEERCRED, so a socket
whose mode was loosened by hand still serves only allowed users.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from walacord.control.registry import Peer

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> Peer:
    """Return the pid, uid and gid of the process that connected `sock` (Linux only)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid)


@dataclass(frozen=True)
class AccessPolicy:
    """The allowed users: root, `daemon_uid`, and members of group `group_gid`."""

    daemon_uid: int
    group_name: str
    group_gid: int | None

    def fast_decision(self, peer: Peer) -> bool | None:
        """Return True or False when the credentials alone decide, None when groups must be read."""
        if peer.uid in (0, self.daemon_uid):
            return True
        if self.group_gid is None:
            return False
        if peer.gid == self.group_gid:
            return True
        return None

    def allows(self, peer: Peer) -> bool:
        """Decide, reading the peer's supplementary groups when needed (blocking)."""
        decision = self.fast_decision(peer)
        if decision is not None:
            return decision
        assert self.group_gid is not None
        return self.group_gid in supplementary_groups(peer)


def resolve_policy(group_name: str) -> AccessPolicy:
    """Look the group up (blocking, may query NSS); a missing group allows no one extra."""
    try:
        gid: int | None = grp.getgrnam(group_name).gr_gid if group_name else None
    except KeyError:
        gid = None
    return AccessPolicy(daemon_uid=os.geteuid(), group_name=group_name, group_gid=gid)


def supplementary_groups(peer: Peer) -> set[int]:
    """Return the peer's supplementary group ids.

    The `Groups:` line of /proc/PID/status shows the groups the process really holds,
    including changes made by setgroups() after login. When the process is gone or /proc
    is not readable, fall back to the user's groups in the group database.
    """
    # NOTE: the pid may be reused between connect and this read, so a process that exits
    # at once could be judged by a newcomer's groups. The kernel's socket-file check
    # (mode 0660) still applies to the connecting process itself.
    try:
        with open(f"/proc/{peer.pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(part) for part in line.split()[1:]}
    except OSError:
        pass
    return _database_groups(peer.uid)


def _database_groups(uid: int) -> set[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
