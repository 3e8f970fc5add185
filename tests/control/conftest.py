"""Fixtures for the control channel tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control.harness import DaemonProcess


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory that other users may traverse, as /run/walacord is."""
    path = Path(tempfile.mkdtemp(prefix="wctl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(socket_dir: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(socket_dir)
    process.start()
    try:
        yield process
    finally:
        process.stop()
