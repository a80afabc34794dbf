"""The agent and relay packages: built by packaging/build, inspected, and the agent's .deb
installed, upgraded over an edited config, removed and purged with dpkg on this machine."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "storage_events/__init__.py").read_text()
).group(1)
TOOLS = ("dpkg", "dpkg-deb", "rpm", "systemd-analyze", "unshare")
missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"{', '.join(missing)} not installed (tests/run installs them as root)"
)
PACKAGES = ("storage-events-agent", "storage-events-relay")


def run(*args: str | Path, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
    """Non-interactive, as an unattended install is: a prompt would fail it."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        **kw,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def installed(package: str) -> str:
    r = run("dpkg-query", "-W", "-f", "${Status} ${Version}", package, check=False)
    return r.stdout if r.returncode == 0 else ""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory):
    for package in PACKAGES:
        if installed(package).startswith("install ok"):
            pytest.fail(f"{package} is installed on this machine; the test would replace it")
    had_user = run("getent", "passwd", "storage-events", check=False).returncode == 0
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    run(ROOT / "packaging/build", "--dist", out / "now")
    print(f"packaging/build: all four packages in {time.monotonic() - started:.1f} s")
    run(
        ROOT / "packaging/build", "--only", "agent", "--version", "0.0.9", "--dist", out / "earlier"
    )
    yield out
    for package in PACKAGES:
        run("dpkg", "--purge", package, check=False)
    if not had_user:  # undo what the packages did to the machine
        run("userdel", "storage-events", check=False)
        run("groupdel", "storage-events", check=False)


def deb(dist: Path, svc: str, version: str = VERSION, where: str = "now") -> Path:
    return dist / where / f"storage-events-{svc}_{version}-1_amd64.deb"


def rpm(dist: Path, svc: str) -> Path:
    return dist / "now" / f"storage-events-{svc}-{VERSION}-1.x86_64.rpm"


@pytest.mark.parametrize("svc", ["agent", "relay"])
def test_packages_carry_the_venv_unit_config_and_scripts(dist, svc):
    info = run("dpkg-deb", "-I", deb(dist, svc)).stdout
    files = run("dpkg-deb", "-c", deb(dist, svc)).stdout
    # The interpreter the venv was built with is the one the package depends on.
    python = re.search(
        rf"\./opt/storage-events/{svc}/bin/(python3\.\d+) -> /usr/bin/\1", files
    ).group(1)
    depends = re.search(r"Depends: (.*)", info).group(1).split(", ")
    assert python in depends and "passwd" in depends, depends
    assert run("dpkg-deb", "-I", deb(dist, svc), "conffiles").stdout.split() == [
        f"/etc/storage-events/{svc}.toml"
    ]
    for script in ("preinst", "postinst", "prerm", "postrm"):
        assert re.search(rf"\b{script}\b", info), script
    expected = [
        f"./usr/lib/systemd/system/storage-events-{svc}.service",
        f"./usr/bin/storage-events-{svc} -> /opt/storage-events/{svc}/bin/",
        f"-rw-r----- root/storage-events {{}} ./etc/storage-events/{svc}.toml",
        f"./opt/storage-events/{svc}/bin/storage-events-{svc}",
    ]
    if svc == "agent":
        expected.append("./usr/lib/sysctl.d/60-storage-events-agent.conf")
    for want in expected:
        pattern = re.escape(want).replace(r"\{\}", r"\s*\d+ \S+ \S+")
        assert re.search(pattern, files), want
    assert "site-packages/uvicorn" in files if svc == "relay" else "uvicorn" not in files

    r = rpm(dist, svc)
    assert run("rpm", "-qp", "--configfiles", r).stdout.split() == [
        f"/etc/storage-events/{svc}.toml"
    ]
    flags = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", r).stdout
    assert f"/etc/storage-events/{svc}.toml cn" in flags  # config, noreplace
    requires = run("rpm", "-qp", "--requires", r).stdout.split()
    assert python in requires and "shadow-utils" in requires, requires
    scripts = run("rpm", "-qp", "--scripts", r).stdout
    for scriptlet in ("preinstall", "postinstall", "preuninstall", "postuninstall"):
        assert f"{scriptlet} scriptlet" in scripts, scriptlet
    assert f"systemctl disable --now storage-events-{svc}.service" in scripts
    listing = run("rpm", "-qpl", r).stdout.split()
    assert f"/opt/storage-events/{svc}/bin/storage-events-{svc}" in listing
    assert "/opt/storage-events" in listing  # owned, so removal takes it away


def test_agent_deb_install_check_upgrade_remove_purge(dist, tmp_path):
    run("dpkg", "-i", deb(dist, "agent", "0.0.9", "earlier"))
    assert installed("storage-events-agent") == "install ok installed 0.0.9-1"
    assert run("getent", "passwd", "storage-events").stdout.startswith("storage-events:")
    config = Path("/etc/storage-events/agent.toml")
    st = config.stat()
    assert (oct(st.st_mode & 0o777), st.st_uid) == ("0o640", 0)
    assert run("storage-events-agent", "--version").stdout.strip().endswith(VERSION)
    unit = "/usr/lib/systemd/system/storage-events-agent.service"
    verify = run("systemd-analyze", "verify", unit, check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # `check` against a config, as the post-install message tells operators to run it.
    tree = tmp_path / "data"
    (tree / "a" / "b").mkdir(parents=True)
    mine = tmp_path / "agent.toml"
    mine.write_text(f'relay = "http://127.0.0.1:9"\n[[root]]\npath = "{tree}"\n')
    checked = run("storage-events-agent", "check", "--config", mine, check=False)
    assert f"root {tree}: 3 directories to watch" in checked.stdout, checked.stdout
    assert "relay http://127.0.0.1:9: NOT reachable" in checked.stdout
    assert checked.returncode == 0 and checked.stdout.rstrip().endswith("ok")

    # An upgrade keeps the operator's edit, with no prompt (stdin is closed).
    edited = config.read_text().replace('site = "local"', 'site = "desy"')
    config.write_text(edited)
    run("dpkg", "-i", deb(dist, "agent"))
    assert installed("storage-events-agent") == f"install ok installed {VERSION}-1"
    assert config.read_text() == edited
    assert not Path("/etc/storage-events/agent.toml.dpkg-dist").exists()

    run("dpkg", "--remove", "storage-events-agent")
    assert installed("storage-events-agent").startswith("deinstall ok config-files")
    assert config.read_text() == edited  # a remove keeps the configuration
    assert not Path("/opt/storage-events/agent").exists()
    assert shutil.which("storage-events-agent") is None
    run("dpkg", "--purge", "storage-events-agent")
    assert installed("storage-events-agent") == ""
    assert not config.exists() and not Path("/etc/storage-events").exists()


def test_relay_deb_installs_and_runs(dist):
    run("dpkg", "-i", deb(dist, "relay"))
    assert run("storage-events-relay", "--version").stdout.strip().endswith(VERSION)
    verify = run(
        "systemd-analyze",
        "verify",
        "/usr/lib/systemd/system/storage-events-relay.service",
        check=False,
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    made = run("storage-events-relay", "token", "--name", "x", "--role", "reader").stdout
    assert made.startswith("token: ") and "[[token]]" in made
    run("dpkg", "--purge", "storage-events-relay")
    assert installed("storage-events-relay") == ""


SCRIPT_CASES = [  # (package, script, args, calls expected)
    (
        "agent",
        "postinst",
        ["configure", ""],  # a first install: not enabled, not started
        [
            "daemon-reload",
            "restart systemd-sysctl.service",
            "deb-systemd-helper unmask storage-events-agent.service",
            "deb-systemd-helper update-state storage-events-agent.service",
        ],
    ),
    (
        "agent",
        "postinst",
        ["configure", "0.0.9-1"],
        [
            "restart systemd-sysctl.service",
            "daemon-reload",
            "try-restart storage-events-agent.service",
            "deb-systemd-helper unmask storage-events-agent.service",
            "deb-systemd-helper --quiet was-enabled storage-events-agent.service",
            "deb-systemd-helper enable storage-events-agent.service",
        ],
    ),
    (
        "relay",
        "postinst",
        ["configure", ""],
        [
            "daemon-reload",
            "start storage-events-relay.service",
            "deb-systemd-helper unmask storage-events-relay.service",
            "deb-systemd-helper --quiet was-enabled storage-events-relay.service",
            "deb-systemd-helper enable storage-events-relay.service",
        ],
    ),
    ("relay", "prerm", ["upgrade", "0.1.0-1"], []),
    ("relay", "prerm", ["remove"], ["stop storage-events-relay.service"]),
    (
        "relay",
        "postrm",
        ["remove"],
        ["daemon-reload", "deb-systemd-helper mask storage-events-relay.service"],
    ),
    (
        "relay",
        "postrm",
        ["purge"],
        [
            "daemon-reload",
            "deb-systemd-helper purge storage-events-relay.service",
            "deb-systemd-helper unmask storage-events-relay.service",
        ],
    ),
]


@pytest.mark.parametrize("svc, script, args, expected", SCRIPT_CASES)
def test_deb_scripts_handle_the_service(dist, tmp_path, svc, script, args, expected):
    run("dpkg-deb", "-e", deb(dist, svc), tmp_path / "control")
    assert sorted(under_systemd(tmp_path, tmp_path / "control" / script, args)) == sorted(expected)


RPM_CASES = [
    (
        "POSTIN",
        "1",
        ["daemon-reload", "preset storage-events-agent.service", "restart systemd-sysctl.service"],
    ),
    ("POSTIN", "2", ["daemon-reload", "restart systemd-sysctl.service"]),
    ("PREUN", "1", []),  # an upgrade: keep it running
    ("PREUN", "0", ["disable --now storage-events-agent.service"]),
    ("POSTUN", "1", ["daemon-reload", "try-restart storage-events-agent.service"]),
    ("POSTUN", "0", ["daemon-reload"]),
]


@pytest.mark.parametrize("tag, arg, expected", RPM_CASES)
def test_rpm_scriptlets_handle_the_service(dist, tmp_path, tag, arg, expected):
    script = tmp_path / tag
    script.write_text(run("rpm", "-qp", "--qf", f"%{{{tag}}}", rpm(dist, "agent")).stdout)
    assert sorted(under_systemd(tmp_path, script, [arg])) == sorted(expected)


def under_systemd(tmp: Path, script: Path, args: list[str]) -> list[str]:
    """The calls a maintainer script makes when systemd runs: in a private mount namespace with
    /run/systemd/system present, systemctl and deb-systemd-helper record them instead of acting
    (systemctl's without its name)."""
    stubs, log = tmp / "stubs", tmp / "calls"
    stubs.mkdir()
    for tool in ("systemctl", "deb-systemd-helper"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (stubs / tool).chmod(0o755)
    quoted = " ".join(f"'{a}'" for a in args)
    run(
        "unshare",
        "-m",
        "sh",
        "-ec",
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && "
        f"PATH={stubs}:$PATH sh {script} {quoted}",
    )
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.removeprefix("systemctl ") for line in lines]
