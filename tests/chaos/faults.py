"""Fault sources for chaos tests besides the proxy: signals, a tiny filesystem, a replica.

- Signals: find PostgreSQL backends by application_name in pg_stat_activity and stop,
  continue or kill them, or the postmaster, with SIGSTOP, SIGCONT and SIGKILL.
- `SmallFilesystem`: a tmpfs of a few MiB mounted on a directory, or a loop-mounted
  ext2 file where tmpfs is not allowed, so a test can fill a disk in milliseconds.
  Both need root; without either the test is skipped with the reason.
- `make_replica`: a streaming standby of a `PgCluster` made with pg_basebackup -R on
  another port, which `promote` turns into the new primary for failover tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from walacord.pgcluster import PgCluster

# --- signals --------------------------------------------------------------------------


def backend_pids(cluster: PgCluster, application_name: str) -> list[int]:
    """Return the pids of client backends whose application_name matches."""
    output = cluster.psql(
        "SELECT pid FROM pg_stat_activity "
        f"WHERE backend_type = 'client backend' AND application_name = '{application_name}' "
        "AND pid <> pg_backend_pid() ORDER BY pid"
    )
    return [int(line) for line in output.splitlines() if line.strip()]


def wait_for_backends(cluster: PgCluster, application_name: str, count: int = 1,
                      timeout: float = 10.0) -> list[int]:
    """Wait until at least `count` backends with the application_name exist."""
    deadline = time.monotonic() + timeout
    while True:
        pids = backend_pids(cluster, application_name)
        if len(pids) >= count:
            return pids
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"expected {count} backends of {application_name!r} within {timeout}s, "
                f"found {pids}")
        time.sleep(0.05)


def send_signal(pids: Iterable[int], signum: int) -> None:
    """Send `signum` to each pid; a process that is already gone is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.contextmanager
def frozen(pids: Iterable[int]) -> Iterator[list[int]]:
    """SIGSTOP the processes for the body of a `with` block and SIGCONT them after."""
    stopped = list(pids)
    send_signal(stopped, signal.SIGSTOP)
    try:
        yield stopped
    finally:
        send_signal(stopped, signal.SIGCONT)


@contextlib.contextmanager
def postmaster_frozen(cluster: PgCluster) -> Iterator[int]:
    """SIGSTOP the postmaster only; running backends keep serving their sessions."""
    pid = cluster.postmaster_pid()
    with frozen([pid]):
        yield pid


def kill_postmaster(cluster: PgCluster) -> int:
    """SIGKILL the postmaster and return its pid; its backends exit on their own."""
    pid = cluster.postmaster_pid()
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_until_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still exists after {timeout}s")


# --- a small filesystem for disk-full -------------------------------------------------


def _run_quiet(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


class SmallFilesystem:
    """A filesystem of `size_bytes` mounted on `mountpoint` for disk-full scenarios."""

    def __init__(self, mountpoint: Path, size_bytes: int = 2 * 1024 * 1024,
                 owner: str | None = None) -> None:
        self.mountpoint = Path(mountpoint)
        self.size_bytes = size_bytes
        self.owner = owner
        self.kind = ""
        self._image: Path | None = None

    def mount(self) -> SmallFilesystem:
        """Mount tmpfs, else a loop-mounted ext2 image; skip the test if neither works."""
        if os.geteuid() != 0:
            pytest.skip("disk-full scenarios mount a filesystem and need root")
        self.mountpoint.mkdir(parents=True, exist_ok=True)

        tmpfs = _run_quiet(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}",
                            "tmpfs", str(self.mountpoint)])
        if tmpfs.returncode == 0:
            self.kind = "tmpfs"
        else:
            loop_error = self._mount_loop()
            if loop_error:
                pytest.skip(f"cannot mount a small filesystem: tmpfs failed "
                            f"({tmpfs.stderr.strip()}) and loop failed ({loop_error})")
            self.kind = "loop"

        if self.owner:
            entry = pwd.getpwnam(self.owner)
            os.chown(self.mountpoint, entry.pw_uid, entry.pw_gid)
        return self

    def _mount_loop(self) -> str:
        """Mount an ext2 image through a loop device; return the error text or ''."""
        if not shutil.which("mkfs.ext2"):
            return "mkfs.ext2 not found"
        image = self.mountpoint.with_name(self.mountpoint.name + ".img")
        with open(image, "wb") as handle:
            handle.truncate(self.size_bytes)
        made = _run_quiet(["mkfs.ext2", "-q", "-F", "-m", "0", str(image)])
        if made.returncode != 0:
            image.unlink()
            return made.stderr.strip()
        mounted = _run_quiet(["mount", "-o", "loop", str(image), str(self.mountpoint)])
        if mounted.returncode != 0:
            image.unlink()
            return mounted.stderr.strip()
        self._image = image
        return ""

    def fill(self, leave_bytes: int = 0) -> Path:
        """Write a filler file until the filesystem is full (or `leave_bytes` remain)."""
        filler = self.mountpoint / "filler"
        block = b"\0" * 4096
        with open(filler, "ab") as handle:
            while shutil.disk_usage(self.mountpoint).free > leave_bytes:
                try:
                    handle.write(block)
                    handle.flush()
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return filler

    def free_space(self) -> None:
        """Remove the filler so the filesystem has room again."""
        with contextlib.suppress(FileNotFoundError):
            (self.mountpoint / "filler").unlink()

    def unmount(self) -> None:
        if not self.kind:
            return
        result = _run_quiet(["umount", str(self.mountpoint)])
        if result.returncode != 0:
            # A process still holding a file open keeps the mount busy: detach it lazily.
            _run_quiet(["umount", "-l", str(self.mountpoint)])
        if self._image is not None:
            with contextlib.suppress(FileNotFoundError):
                self._image.unlink()
        self.kind = ""

    def __enter__(self) -> SmallFilesystem:
        return self.mount()

    def __exit__(self, *exc_info: object) -> None:
        self.unmount()


# --- a replica for failover -----------------------------------------------------------


def make_replica(primary: PgCluster, base: Path) -> PgCluster:
    """Create and start a streaming standby of `primary` in `base` on a free port."""
    replica = PgCluster(base, password=primary.password, superuser=primary.superuser,
                        run_as=primary.run_as, bindir=primary.bindir)
    replica.base.mkdir(parents=True, exist_ok=True)
    replica.socketdir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(replica.run_as)
        for path in (replica.base, replica.socketdir):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    source = (f"host=127.0.0.1 port={primary.port} user={primary.superuser} "
              f"password={primary.password} application_name=replica")
    # -R writes standby.signal and primary_conninfo, so the copy starts as a standby.
    replica._run("pg_basebackup", "-d", source, "-D", str(replica.datadir),
                 "-R", "-X", "stream", "--checkpoint=fast", "--no-sync")
    with open(replica.datadir / "postgresql.conf", "a") as handle:
        # Later lines win: move the copy off the primary's port and socket directory.
        handle.write(f"port = {replica.port}\n")
        handle.write(f"unix_socket_directories = '{replica.socketdir}'\n")
    replica.start()
    return replica


def promote(replica: PgCluster, timeout: float = 30.0) -> None:
    """Promote a standby to primary and wait until it accepts writes."""
    replica._run("pg_ctl", "-D", str(replica.datadir), "-w", "-t", str(int(timeout)),
                 "promote", timeout=timeout + 10)


def multi_host_url(clusters: Iterable[PgCluster], dbname: str = "postgres",
                   target_session_attrs: str = "read-write") -> str:
    """Return a libpq multi-host URL over the clusters, in order, for the superuser."""
    members = list(clusters)
    first = members[0]
    hosts = ",".join(f"127.0.0.1:{cluster.port}" for cluster in members)
    return (f"postgresql://{first.superuser}:{first.password}@{hosts}/{dbname}"
            f"?target_session_attrs={target_session_attrs}")
