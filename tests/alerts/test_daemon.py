"""The real daemon starts the alerts component and exports its metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from walacord.pgcluster import free_port


def test_daemon_runs_alerts_component(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "walacord.toml"
    config.write_text(f"""
[http]
listen = "127.0.0.1:{port}"
[state]
dir = "{tmp_path / 'state'}"
[logging]
dir = "{tmp_path / 'logs'}"
[alerts]
alertmanager_url = "http://127.0.0.1:{free_port()}"
evaluation_interval = "200ms"
""")
    daemon = subprocess.Popen([sys.executable, "-m", "walacord", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and daemon.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        components = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json()
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)

    assert "alerts" in components["components"], stderr.decode()
    assert 'walacord_alerts{state="firing"} 0.0' in body
    assert (tmp_path / "state" / "alerts.db").exists()
    assert daemon.returncode == 0, stderr.decode()[-2000:]
