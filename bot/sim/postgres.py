"""A throwaway PostgreSQL server on 127.0.0.1, for the tests and benchmarks of the shared outbox.

Not a stand-in: the real server, from the system's binaries (Debian's `postgresql` package puts
them in /usr/lib/postgresql/<version>/bin; elsewhere they are looked up on PATH), initialized in
a temporary folder, listening on a free loopback port, trusting local connections, and removed
on `remove()`. initdb refuses to run as root, so as root the server runs as the `postgres`
system user (which that package creates).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from glob import glob
from pathlib import Path

INSTALL_HINT = "install Debian's postgresql (apt-get install postgresql)"
START_TIMEOUT_S = 30
SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries here, or the server would not start (the message says why)."""


def find_bin_dir() -> Path | None:
    """The newest installed server's bin folder, or None."""
    versions = glob("/usr/lib/postgresql/*/bin/initdb")
    if versions:
        newest = max(versions, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
        return Path(newest).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPostgres:
    """`start()`, then `url()` or `create_database()`; `stop()` and `start()` again keep the data.

    `durable=False` turns off fsync and synchronous commit: fast, and fine for tests that never
    pull the power. Benchmarks keep the defaults so figures mean what they would in production.
    """

    def __init__(self, *, durable: bool = False) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(f"no PostgreSQL server binaries found: {INSTALL_HINT}")
        self.bin_dir = bin_dir
        self.durable = durable
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="voicebot-pg-"))
        self.data_dir = self.folder / "data"
        self.log_path = self.folder / "server.log"
        self._as_server_user: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd  # POSIX only, like running as root

            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                hint = f"running as root needs a '{SERVER_USER}' user: {INSTALL_HINT}"
                raise PostgresUnavailable(hint) from None
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as_server_user = ["runuser", "-u", SERVER_USER, "--"]
        self._databases = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        if not self.data_dir.exists():
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", SERVER_USER, "-A", "trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            )  # fmt: skip
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.folder}",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data_dir),
            "-l", str(self.log_path), "-o", " ".join(options),
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects clients and shuts down cleanly; `immediate` is a crash."""
        self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data_dir))

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        self._databases += 1
        name = f"voicebot_{self._databases}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SERVER_USER, name)
        return self.url(name)

    def remove(self) -> None:
        """Stop the server if it runs, and delete its folder."""
        if (self.data_dir / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_server_user, str(self.bin_dir / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder, check=False)
        if done.returncode != 0:
            log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise PostgresUnavailable(f"{program} failed: {done.stderr.strip()}\n{log}".strip())
