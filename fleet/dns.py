"""A real DNS server for the headless Service: Debian's dnsmasq on a loopback port.

dnsmasq answers ``<name>`` with one A record per address in a hosts file, and nothing else
(``no-resolv``, ``local=/<domain>/``: a name it does not hold is NXDOMAIN, never forwarded). The fleet
rewrites the file (atomically) and sends SIGHUP, which makes dnsmasq re-read it and drop its cache: the
same effect as the endpoints controller updating a headless Service. TTLs are 0 (``local-ttl``), as
CoreDNS serves headless records with a short TTL; gRPC's own re-resolution rules then decide when a
caller sees the change.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from fleet.ports import free_port


class Dns:
    def __init__(self, binary: str, work_dir: Path, name: str) -> None:
        self._binary = binary
        self._dir = work_dir
        self.name = name
        self.port = 0
        self._hosts = work_dir / "headless.hosts"
        self._process: asyncio.subprocess.Process | None = None
        self.addresses: tuple[str, ...] = ()

    def target(self, grpc_port: int) -> str:
        """The gRPC target a caller in the cluster would use for the headless Service."""
        return f"dns://127.0.0.1:{self.port}/{self.name}:{grpc_port}"

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._hosts.write_text("")
        self.port = free_port(socket.SOCK_DGRAM)
        domain = self.name.split(".", 1)[1] if "." in self.name else self.name
        self._process = await asyncio.create_subprocess_exec(
            self._binary,
            "--keep-in-foreground",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--local=/{domain}/",
            f"--addn-hosts={self._hosts}",
            "--local-ttl=0",
            "--cache-size=0",
            "--user=root",
            "--pid-file=",
            f"--log-facility={self._dir / 'dnsmasq.log'}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self._wait_answering()

    async def _wait_answering(self) -> None:
        for _ in range(200):
            if self._process is not None and self._process.returncode is not None:
                raise RuntimeError(f"dnsmasq exited with {self._process.returncode}; see {self._dir}")
            if await asyncio.to_thread(_answers, self.port):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("dnsmasq did not answer on its port")

    def set_addresses(self, addresses: list[str]) -> None:
        """The ready pods' addresses: what the headless Service's A records become."""
        self.addresses = tuple(sorted(addresses))
        tmp = self._hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} {self.name}\n" for a in self.addresses))
        os.replace(tmp, self._hosts)
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()


def _answers(port: int) -> bool:
    """One DNS query for the root's SOA: any answer means dnsmasq is up."""
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x06\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(query, ("127.0.0.1", port))
            return bool(s.recv(512))
        except OSError:
            return False
