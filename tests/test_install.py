"""`pip install .` gives the agent and the client without the relay's server stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_plain_install_is_agent_and_client_only(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [
            venv / "bin" / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = {p.name for p in site.iterdir()}
    assert "storage_events" in installed
    assert not {"agent", "relay", "starlette", "uvicorn"} & installed
    assert {p.name for p in (site / "storage_events").iterdir()} >= {"agent", "relay", "wire.py"}

    for cmd in ("storage-events", "storage-events-agent"):
        r = subprocess.run([venv / "bin" / cmd, "--version"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [venv / "bin" / "storage-events-relay", "serve"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode != 0
    assert "pip install 'storage-events[relay]'" in r.stderr
