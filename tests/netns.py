"""Several hosts on one machine: a network namespace per host, each with a veth pair into one
bridge in the root namespace (where the tests run). Everything made is removed again."""

from __future__ import annotations

import os
import subprocess


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """``prefix`` keeps names of concurrent users apart (interface names ≤ 15 characters);
    ``subnets`` is the range of the second octet of their 10.x.0.0/24."""

    def __init__(
        self, names: list[str], prefix: str = "se", subnets: range = range(100, 200)
    ) -> None:
        tag = f"{prefix}{os.getpid() % 100000}"  # unique per process
        subnet = subnets[os.getpid() % len(subnets)]
        self.bridge = f"{tag}br"
        self._made: list[tuple[str, ...]] = []
        self.addr: dict[str, str] = {}
        self.ns: dict[str, str] = {}
        self._link: dict[str, str] = {}
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", "del", self.bridge))
            ip("addr", "add", f"10.{subnet}.0.254/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i, name in enumerate(names, 1):
                ns, outer, inner = f"{tag}{name}", f"{tag}h{i}", f"{tag}n{i}"
                ip("netns", "add", ns)
                self._made.append(("netns", "del", ns))
                ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                ip("link", "set", inner, "netns", ns)
                ip("-n", ns, "addr", "add", f"10.{subnet}.0.{i}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")
                ip("-n", ns, "link", "set", "lo", "up")
                ip("link", "set", outer, "master", self.bridge, "up")
                self.addr[name], self.ns[name], self._link[name] = f"10.{subnet}.0.{i}", ns, outer
        except BaseException:
            self.close()
            raise

    def exec(self, name: str) -> list[str]:
        """The command prefix that runs a program on host ``name``."""
        return ["ip", "netns", "exec", self.ns[name]]

    def cut(self, name: str) -> None:
        ip("link", "set", self._link[name], "down")

    def heal(self, name: str) -> None:
        ip("link", "set", self._link[name], "up")

    def close(self) -> None:
        # Deleting a namespace deletes the veth pair in it; then the bridge goes.
        for args in reversed(self._made):
            subprocess.run(["ip", *args], capture_output=True)
        self._made.clear()
