"""Creating the control socket file: stale sockets, live sockets and files that are not sockets."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from walacord.control.socketfile import bind_control_socket
from walacord.errors import ControlSocketError


def test_bind_replaces_stale_socket(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    # A socket file whose process died: a child binds it and exits without unlinking.
    subprocess.run([sys.executable, "-c",
                    "import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])",
                    str(path)], check=True)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    bound = bind_control_socket(str(path), None, 8)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        bound.remove()
    assert not path.exists()


def test_bind_refuses_live_socket(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    other.listen(1)
    try:
        with pytest.raises(ControlSocketError, match="a process is listening"):
            bind_control_socket(str(path), None, 8)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


def test_bind_refuses_regular_file(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        bind_control_socket(str(path), None, 8)
    assert path.read_text() == "precious"


def test_bind_refuses_second_daemon(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    first = bind_control_socket(str(path), None, 8)
    try:
        with pytest.raises(ControlSocketError, match="another walacord has locked"):
            bind_control_socket(str(path), None, 8)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # the first daemon's socket is untouched
        client.close()
    finally:
        first.remove()


def path_of_length(directory: Path, length: int) -> str:
    path = f"{directory}/" + "x" * (length - len(str(directory)) - 1)
    assert len(path) == length
    return path


def test_bind_rejects_long_path(socket_dir: Path) -> None:
    path = socket_dir / ("x" * 120)
    with pytest.raises(ControlSocketError, match="longer than the 94 bytes"):
        bind_control_socket(str(path), None, 8)


def test_bind_rejects_path_without_room_for_temporary(socket_dir: Path) -> None:
    """A 100-byte path fits sun_path, but the temporary name it is bound under does not,
    so the error names the limit instead of "AF_UNIX path too long"."""
    with pytest.raises(ControlSocketError) as caught:
        bind_control_socket(path_of_length(socket_dir, 100), None, 8)

    assert "is 100 bytes, longer than the 94 bytes" in str(caught.value)
    assert "set [control] socket to a shorter path" in str(caught.value)


def test_bind_accepts_longest_path(socket_dir: Path) -> None:
    path = path_of_length(socket_dir, 94)
    bound = bind_control_socket(path, None, 8)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()
    finally:
        bound.remove()


def test_remove_leaves_replaced_socket(socket_dir: Path) -> None:
    path = socket_dir / "c.sock"
    bound = bind_control_socket(str(path), None, 8)
    path.unlink()
    stranger = socket.socket(socket.AF_UNIX)
    stranger.bind(str(path))
    try:
        bound.remove()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        stranger.close()
