"""A throwaway PostgreSQL server for tests: initdb on a temporary directory, pg_ctl on a free
loopback port, password authentication over TCP, no Unix socket, no fsync.

PostgreSQL refuses to run as root; under root (as in CI) the server runs as the ``postgres``
user when it exists, else as ``nobody``, from a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pg8000.native

START_TIMEOUT = 60
# "LOG:  statement: ..." (simple protocol) or "LOG:  execute <name>: ..." (extended)
_STATEMENT_RE = re.compile(r"LOG:\s+(statement|execute [^:]*): (.*)")


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in the newest /usr/lib/postgresql/<version>/bin (Debian's layout)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no postgres or nobody user to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster; ``database()`` makes a fresh database for a test."""

    user = "llmproxy_test"

    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.initdb = initdb
        self.pg_ctl = pg_ctl
        self.password = "pw-" + secrets.token_urlsafe(12)
        self.port = _free_port()
        self.owner = _run_as()
        # Not under pytest's tmp dir: under root that is private to root, and the server
        # runs as another user.
        self.dir = Path(tempfile.mkdtemp(prefix="llmproxy-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    def _run(self, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if self.owner is not None:
            kwargs.update(user=self.owner.pw_uid, group=self.owner.pw_gid, extra_groups=[])
        proc = subprocess.run(args, capture_output=True, text=True, timeout=START_TIMEOUT,
                              cwd=self.dir, **kwargs)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}\n{log}")

    def start(self) -> PostgresServer:
        if not self.data.exists():
            pwfile = self.dir / "pw"
            pwfile.write_text(self.password + "\n")
            if self.owner is not None:
                os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
                os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
            self._run(self.initdb, "-D", str(self.data), "-U", self.user, "-E", "UTF8",
                      "--no-sync", "--auth-local=scram-sha-256",
                      "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
            pwfile.unlink()
        # fsync off, synchronous_commit on: a committed row survives stop("immediate"),
        # which tests use to simulate a crash.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   "-c unix_socket_directories='' -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200 -c log_statement=all")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(START_TIMEOUT), "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        if (self.data / "postmaster.pid").exists():
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def statements_since(self, offset: int) -> list[str]:
        """Statements the server ran (log_statement=all) since the log had ``offset`` bytes."""
        with self.log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        return [m.group(2) for m in _STATEMENT_RE.finditer(text)]

    def alive(self) -> bool:
        try:
            self.admin().close()
        except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError):
            return False
        return True

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases -------------------------------------------------------------------------

    def admin(self, database: str = "postgres") -> pg8000.native.Connection:
        return pg8000.native.Connection(self.user, host="127.0.0.1", port=self.port,
                                        password=self.password, database=database, timeout=10)

    def url(self, database: str) -> str:
        return (f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}")

    def create_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        conn = self.admin()
        try:
            conn.run(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return name

    def drop_database(self, name: str) -> None:
        conn = self.admin()
        try:
            conn.run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            conn.close()
