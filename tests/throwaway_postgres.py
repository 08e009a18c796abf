"""A PostgreSQL cluster of this test's own (initdb on a free port), for tests that stop a
server: the machine's shared server on 5432 is never stopped or restarted by a test."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path


def _bin_dir() -> Path | None:
    """The newest installed server's bin directory (Debian layout), or the PATH's."""
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if (p / "bin" / "initdb").exists()), key=_ver)
        if versions:
            return versions[-1] / "bin"
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _ver(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in path.name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def throwaway_unavailable_reason() -> str | None:
    """Why a throwaway cluster cannot be made here, or None when it can."""
    if _bin_dir() is None:
        return "no initdb (PostgreSQL server binaries) on this machine"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to own the cluster"
    return None


@dataclass
class ThrowawayCluster:
    """A running cluster; ``stop()``/``start()`` it freely, it is this test's alone."""

    data_dir: Path
    port: int
    bin_dir: Path
    owner: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.owner is not None:  # the server refuses to run as root
            command = ["runuser", "-u", self.owner, "--", *command]
        subprocess.run(command, check=True, timeout=120, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.data_dir.parent / "server.log")  # not our pipes: the server outlives pg_ctl
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")


@contextmanager
def throwaway_cluster() -> Iterator[ThrowawayCluster]:
    """initdb into a temporary directory, start on a free port, remove everything after."""
    bin_dir = _bin_dir()
    assert bin_dir is not None, throwaway_unavailable_reason()
    owner = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="usage-cb-pg-"))
    data_dir = base / "data"
    data_dir.mkdir()
    if owner is not None:
        entry = pwd.getpwnam(owner)
        for path in (base, data_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    cluster = ThrowawayCluster(data_dir, _free_port(), bin_dir, owner)
    cluster._run("initdb", "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    cluster.start()
    try:
        yield cluster
    finally:
        with suppress(subprocess.CalledProcessError):  # already stopped by the test
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
