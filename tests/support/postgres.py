"""A throwaway PostgreSQL cluster for the tests: its own data directory, port and socket.

Uses the server binaries of Debian's ``postgresql`` package (``/usr/lib/postgresql/N/bin``)
or whatever ``initdb`` is on ``PATH``. ``initdb`` and ``pg_ctl`` refuse to run as root, so
as root every server command runs as the ``postgres`` system user (``runuser``), in a
temporary directory that user owns; otherwise as the current user. The system cluster
(if any) is never touched.

A watchdog (a tiny shell loop in its own session) stops the server with
``pg_ctl stop -m immediate`` and removes the directory if the test process dies without
calling ``stop()``, so a killed pytest leaves no server behind.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


class PostgresUnavailable(RuntimeError):
    """The server binaries (or the user to run them as) are missing; the message says why."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (the newest Debian version first)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb and no initdb on PATH); "
        "install them with: apt-get install postgresql"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One temporary cluster on 127.0.0.1 (and a unix socket in its directory).

    ``fsync=False`` (the default) makes it fast but loses commits on an OS crash; a test
    that restarts the server to check durability wants ``fsync=True``. The server itself
    survives only as long as this process (see the module docstring).

    ``in_memory=True`` puts the data directory on the RAM file system ``/dev/shm`` (when
    there is one): ``CREATE DATABASE`` writes a whole copy of its template, which costs
    ~0.4 s on a disk and ~0.04 s there, and the test suite creates one database per test.
    Only with ``fsync=False``: a cluster meant to reach the disk keeps its files on one.
    """

    def __init__(self, *, fsync: bool = False, in_memory: bool = False, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.fsync = fsync
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self._as_user: list[str] = []
        self._uid: int | None = None
        if os.geteuid() == 0:
            # initdb and pg_ctl refuse to run as root.
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root, and there is no 'postgres' system user to run the server as "
                    "(apt-get install postgresql creates it)"
                ) from None
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            self._as_user = ["runuser", "-u", "postgres", "--"]
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        if in_memory and fsync:
            raise ValueError("in_memory=True would keep an fsync=True cluster's files off the disk")
        ram = Path("/dev/shm")
        # Only a roomy one: a container's default /dev/shm (64 MB) fills with a few databases.
        roomy = ram.is_dir() and os.access(ram, os.W_OK) and shutil.disk_usage(ram).free >= 2 * 1024**3
        parent = str(ram) if in_memory and roomy else None
        self.dir = Path(tempfile.mkdtemp(prefix="durably-pg-", dir=parent))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._running = False

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> PostgresCluster:
        if self._uid is not None:
            os.chown(self.dir, self._uid, self._gid)
        self._run(
            "initdb",
            "-D", str(self.data),
            "-U", self.user,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",  # a throwaway cluster: nothing to keep if the machine crashes now
        )  # fmt: skip
        self.port = _free_port()
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "on" if self.fsync else "off",
            # Speed when fsync is off; with fsync on, every commit waits for the disk as in production.
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            # Tests open many pools at once (ten stores migrating together, eight claimers).
            "max_connections": "300",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",  # expected errors (unique violations) stay out of the log
        }
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# durably-web test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log))
        self._running = True
        self._start_watchdog()
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if self._running:
            try:
                self._pg_ctl("stop", "-w", "-m", "fast")
            except subprocess.CalledProcessError:
                self._pg_ctl("stop", "-w", "-m", "immediate", check=False)
            self._running = False
        if self._watchdog is not None:
            self._watchdog.terminate()
            self._watchdog.wait(timeout=10)
            self._watchdog = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self, *, mode: str = "fast", down_for: float = 0.0) -> None:
        """Stop the server (``mode``: smart, fast or immediate), stay down ``down_for`` seconds, start it.

        Clients' connections break; the data and the port stay.
        """
        self._pg_ctl("stop", "-w", "-m", mode)
        if down_for:
            time.sleep(down_for)
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log))

    def stop_server(self, *, mode: str = "fast") -> None:
        """Stop the server only (the directory stays), for a test that needs it down for a while."""
        self._pg_ctl("stop", "-w", "-m", mode)

    def start_server(self) -> None:
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log))

    # --- databases -----------------------------------------------------------------------
    def url(self, dbname: str = "postgres", **params: Any) -> str:
        query = "&".join(f"{key}={value}" for key, value in params.items())
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}" + (f"?{query}" if query else "")

    def execute(self, statement: str, *, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode as the superuser; return its rows (if any)."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str) -> str:
        """Create an empty database (from template0) and return its URL."""
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        # FORCE: a test that failed may have left a connection open.
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # --- internals ----------------------------------------------------------------------
    def _command(self, program: str, *args: str) -> list[str]:
        return [*self._as_user, str(self.bin_dir / program), *args]

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self._command(program, *args),
            cwd=self.dir,  # the postgres user may not be able to read the caller's directory
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise subprocess.CalledProcessError(
                result.returncode, result.args, output=f"{result.stdout}\n{result.stderr}\n{log}"
            )
        return result

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.data), *args, check=check)

    def _start_watchdog(self) -> None:
        stop = shlex.join(self._command("pg_ctl", "-D", str(self.data), "stop", "-m", "immediate"))
        script = (
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.5; done; "
            f"{stop} >/dev/null 2>&1; rm -rf {shlex.quote(str(self.dir))}"
        )
        # Its own session: a Ctrl-C aimed at pytest must not kill the watchdog before it cleans up.
        self._watchdog = subprocess.Popen(
            ["sh", "-c", script],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_test_cluster(**options: Any) -> PostgresCluster:
    """Start a cluster for a test, or skip the test saying how to get PostgreSQL.

    Its files are in RAM (``in_memory``) unless it is asked for ``fsync=True``.

    With ``CI`` set, a missing PostgreSQL (or psycopg) fails instead: CI must run these tests.
    """
    import pytest

    try:
        import psycopg  # noqa: F401  (the store and these helpers need it)
    except ImportError:
        reason = "psycopg is not installed: pip install 'durably-web[postgres]' (the test extra has it)"
    else:
        try:
            options.setdefault("in_memory", not options.get("fsync", False))
            return PostgresCluster(**options).start()
        except PostgresUnavailable as exc:
            reason = str(exc)
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")
