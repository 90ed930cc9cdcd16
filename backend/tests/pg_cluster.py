"""A private, throwaway PostgreSQL server for fault-injection tests.

The system PostgreSQL (127.0.0.1:5432) is shared by the other tests and is never touched here:
each `PrivateCluster` is its own data directory, port and server process, so a test may stop,
restart or SIGKILL it at will.

    with private_cluster(tmp_path, tls=True, scram_password="s3cret") as cluster:
        psycopg.connect(cluster.url)       # app:s3cret over TLS, channel binding required
        cluster.kill()                     # an abrupt crash: connections break, start() recovers
        cluster.start()

initdb and the server refuse to run as root, so when the tests run as root every server-side
command runs as the `postgres` OS user (the child process switches user itself, like
`runuser -u postgres --`). That user must be able to reach the cluster's directory, which
pytest's own temporary directories (mode 0700, owned by root) do not allow:
`private_cluster()` therefore keeps the cluster in a short directory of its own under the
system temporary directory (short also because a Unix socket path is limited to 107 bytes),
copies the server log into the test's `tmp_path` at the end, and deletes the cluster.

Without the server binaries (or, as root, without a `postgres` OS user) the test is skipped
with the reason; under CI=true it fails instead, because CI must run these tests.
"""

import contextlib
import datetime
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

StopMode = Literal["smart", "fast", "immediate"]

SERVER_OS_USER = "postgres"
SUPERUSER = "postgres"
APP_ROLE = "app"
APP_DATABASE = "app"
# Linux: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class ClusterError(RuntimeError):
    """A private cluster (or pgbouncer) could not be set up, started or stopped."""


def in_ci() -> bool:
    """CI=true: the fault-injection tests must run, so missing tools fail instead of skipping."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the test with the reason, or fail it under CI=true."""
    if in_ci():
        pytest.fail(f"{reason}: CI must run the fault-injection tests", pytrace=False)
    pytest.skip(reason)


# --- the OS user the servers run as -----------------------------------------------------------


@dataclass(frozen=True)
class ServerUser:
    """Who runs initdb, postgres and pgbouncer: `postgres` when we are root, else ourselves."""

    name: str
    uid: int
    gid: int
    home: str
    switch: bool  # True: the child process switches to this user before exec

    def chown(self, path: Path) -> None:
        if self.switch:
            os.chown(path, self.uid, self.gid)

    @property
    def run_uid(self) -> int | None:
        """For subprocess's `user=`/`group=`: None runs the child as ourselves."""
        return self.uid if self.switch else None

    @property
    def run_gid(self) -> int | None:
        return self.gid if self.switch else None

    @property
    def run_groups(self) -> list[int] | None:
        return [] if self.switch else None

    def env(self) -> dict[str, str]:
        """Our environment without libpq's PG* variables, which would redirect the tools."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(HOME=self.home, LC_ALL="C", LANG="C")
        if self.switch:
            env.update(USER=self.name, LOGNAME=self.name)
        return env


def server_user() -> ServerUser:
    """The OS user for the servers (skips, or fails under CI, when root has none to switch to)."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, switch=False)
    try:
        entry = pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        unavailable(
            f"running as root and there is no {SERVER_OS_USER!r} OS user to run the servers as "
            "(initdb and pgbouncer refuse root)"
        )
    return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, switch=True)


def run_as(
    user: ServerUser, args: Sequence[str | Path], *, cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command as the server user; ClusterError (with its output) when it fails."""
    command = [str(arg) for arg in args]
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=user.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=user.run_uid,
            group=user.run_gid,
            extra_groups=user.run_groups,
        )
    except subprocess.TimeoutExpired as error:
        raise ClusterError(f"{Path(command[0]).name} timed out after {timeout:g}s") from error
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise ClusterError(
            f"{' '.join(command)} exited with {result.returncode}:\n{output or '(no output)'}"
        )
    return result


def make_server_dir(prefix: str) -> Path:
    """A new, short directory under the system temporary directory, owned by the server user."""
    user = server_user()
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o700)
        user.chown(path)
        ensure_reachable(user, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def ensure_reachable(user: ServerUser, path: Path) -> None:
    """The server user must be able to enter and write `path` (root-only parents forbid it)."""
    if not user.switch:
        return
    try:
        run_as(user, ["test", "-w", path, "-a", "-x", path], cwd=Path("/"), timeout=10)
    except ClusterError as error:
        raise ClusterError(
            f"the {user.name!r} OS user cannot reach {path} (a parent directory is closed to "
            "it, e.g. pytest's 0700 tmp_path): use private_cluster(), or a directory from "
            "make_server_dir()"
        ) from error


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_file(user: ServerUser, path: Path, text: str | bytes, mode: int = 0o600) -> None:
    """Write a file the server user owns (created with `mode` from the start: keys stay 0600)."""
    data = text.encode() if isinstance(text, str) else text
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    path.chmod(mode)
    user.chown(path)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# --- processes --------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rpartition(")")[2].split()[0]
    return state not in {"Z", "X"}


# --- the server binaries ----------------------------------------------------------------------

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_bindir() -> Path | None:
    """PG_BINDIR, else the directory of the `pg_ctl` on PATH, else the newest Debian install."""
    candidates: list[Path] = []
    if configured := os.environ.get("PG_BINDIR"):
        candidates.append(Path(configured))
    else:
        if on_path := shutil.which("pg_ctl"):
            candidates.append(Path(on_path).resolve().parent)

        def version(path: Path) -> tuple[int, ...]:
            return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
        candidates.extend(debian)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in SERVER_TOOLS):
            return bindir
    return None


def require_bindir() -> Path:
    bindir = find_bindir()
    if bindir is None:
        where = os.environ.get("PG_BINDIR") or "PATH or /usr/lib/postgresql/*/bin"
        unavailable(
            f"the PostgreSQL server binaries ({', '.join(SERVER_TOOLS)}) are not in {where}"
        )
    return bindir


# --- TLS --------------------------------------------------------------------------------------


def make_self_signed_cert(cert_file: Path, key_file: Path, user: ServerUser) -> None:
    """A self-signed P-256 certificate for 127.0.0.1 and localhost; the key 0600, server-owned."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(user, key_file, key_pem, mode=0o600)
    write_file(user, cert_file, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


# --- the cluster ------------------------------------------------------------------------------


class PrivateCluster:
    """One throwaway PostgreSQL server: its own data directory, port and process.

    Layout under `base_dir` (owned by the server user, mode 0700): `data/` (PGDATA),
    `run/` (the Unix socket), `server.log`, and `server.crt`/`server.key` with TLS.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        tls: bool = False,
        scram_password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.bindir = require_bindir()
        self.user = server_user()
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "run"
        self.log_file = base_dir / "server.log"
        self.cert_file = base_dir / "server.crt"
        self.key_file = base_dir / "server.key"
        self.tls = tls
        self.scram_password = scram_password
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.dbname = APP_DATABASE
        self.role = APP_ROLE if scram_password is not None else SUPERUSER
        self._port: int | None = None
        self._started_once = False
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses --

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("the cluster has no port yet: call init() first")
        return self._port

    @property
    def url(self) -> str:
        """The client URL over TCP (psycopg 3 / SQLAlchemy): `app` with SCRAM, else `postgres`."""
        if self.scram_password is not None:
            userinfo = f"{quote(APP_ROLE, safe='')}:{quote(self.scram_password, safe='')}"
        else:
            userinfo = SUPERUSER
        query = ""
        if self.tls and self.scram_password is not None:
            query = "?sslmode=require&channel_binding=require"
        elif self.tls:
            query = "?sslmode=require"
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{self.dbname}{query}"

    @property
    def admin_url(self) -> str:
        """The `postgres` superuser over the Unix socket (trusted), in the `app` database."""
        return self.admin_url_for(self.dbname)

    def admin_url_for(self, dbname: str) -> str:
        """The `postgres` superuser over the Unix socket, in another database."""
        socket_dir = quote(str(self.socket_dir), safe="/")
        database = quote(dbname, safe="")
        return f"postgresql://{SUPERUSER}@/{database}?host={socket_dir}&port={self.port}"

    @property
    def ca_file(self) -> Path:
        """The self-signed certificate, to verify the server with sslmode=verify-full."""
        return self.cert_file

    # -- life cycle --

    def init(self) -> None:
        """initdb, configure, create the `app` database (and role with SCRAM); left stopped."""
        if (self.data_dir / "PG_VERSION").exists():
            raise ClusterError(f"{self.data_dir} is already a cluster")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o700)
        self.user.chown(self.base_dir)
        ensure_reachable(self.user, self.base_dir)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.user.chown(self.socket_dir)
        run_as(
            self.user,
            [
                self.bindir / "initdb",
                "--pgdata",
                self.data_dir,
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=self.base_dir,
            timeout=120,
        )
        if self.tls:
            make_self_signed_cert(self.cert_file, self.key_file, self.user)
        self._configure(free_port())
        write_file(self.user, self.data_dir / "pg_hba.conf", self._hba())
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# Fault-injection harness (tests/pg_cluster.py)\ninclude 'harness.conf'\n"
            )

        self.start()
        try:
            admin_url = self.admin_url_for("postgres")
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
                if self.scram_password is not None:
                    admin.execute("SET password_encryption = 'scram-sha-256'")
                    admin.execute(
                        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                            sql.Identifier(APP_ROLE), sql.Literal(self.scram_password)
                        )
                    )
                    admin.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(APP_DATABASE), sql.Identifier(APP_ROLE)
                        )
                    )
                else:
                    admin.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(APP_DATABASE))
                    )
        finally:
            self.stop()

    def _configure(self, port: int) -> None:
        socket_path = self.socket_dir / f".s.PGSQL.{port}"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise ClusterError(
                f"the Unix socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter base_dir (make_server_dir() gives one)"
            )
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": 100,
            "shared_buffers": "16MB",
            # Speed over durability against power loss; a process crash (kill()) still loses
            # nothing committed: synchronous_commit stays on, so WAL reaches the OS at commit.
            "fsync": "off",
            "full_page_writes": "off",
            "dynamic_shared_memory_type": "posix",
            "password_encryption": "scram-sha-256",
            "logging_collector": "off",
            "ssl": "on" if self.tls else "off",
        }
        if self.tls:
            settings["ssl_cert_file"] = str(self.cert_file)
            settings["ssl_key_file"] = str(self.key_file)
        lines = []
        for key, value in settings.items():
            rendered = str(value) if isinstance(value, int) else "'" + str(value) + "'"
            lines.append(f"{key} = {rendered}")
        write_file(self.user, self.data_dir / "harness.conf", "\n".join(lines) + "\n")
        self._port = port

    def _hba(self) -> str:
        host_type = "hostssl" if self.tls else "host"
        method = "scram-sha-256" if self.scram_password is not None else "trust"
        return (
            "# TYPE  DATABASE USER ADDRESS       METHOD\n"
            "local   all      all                trust\n"
            f"{host_type:<7} all      all  127.0.0.1/32  {method}\n"
        )

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections (as `pg_ctl start -w`).

        The postmaster is this process's own child rather than pg_ctl's: an orphan is reaped
        by PID 1, which here can take seconds, and until then its zombie's PID in
        postmaster.pid makes the next start fail ("lock file already exists"). As our child it
        is reaped at once, so kill() then start() works immediately. A port taken by someone
        else before the first start is replaced by a free one.
        """
        if self.is_running():
            raise ClusterError("the cluster is already running")
        for attempt in range(3):
            try:
                self._launch()
            except ClusterError as error:
                port_taken = "could not create any TCP/IP sockets" in log_tail(self.log_file, 10)
                if port_taken and not self._started_once and attempt < 2:
                    self._configure(free_port())
                    continue
                tail = log_tail(self.log_file)
                raise ClusterError(f"{error}\n--- server log ---\n{tail}") from error
            self._started_once = True
            return

    def _launch(self) -> None:
        with self.log_file.open("ab") as log:
            self.user.chown(self.log_file)
            process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
                cwd=self.base_dir,
                env=self.user.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.user.run_uid,
                group=self.user.run_gid,
                extra_groups=self.user.run_groups,
            )
        self._process = process
        deadline = time.monotonic() + self.timeout
        # Like pg_ctl -w: ready once postmaster.pid names this process and says "ready".
        while True:
            if process.poll() is not None:
                raise ClusterError(f"postgres exited with {process.returncode} while starting")
            lines = self._pid_file_lines()
            if len(lines) >= 8 and lines[0] == str(process.pid) and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise ClusterError(f"postgres did not become ready in {self.timeout:g}s")
            time.sleep(0.01)

    def _pid_file_lines(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _reap(self, timeout: float) -> None:
        """Collect our postmaster's exit status (it is gone, or about to be)."""
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired as error:
                raise ClusterError(f"postgres did not exit within {timeout:g}s") from error
            self._process = None

    def stop(self, mode: StopMode = "fast") -> None:
        """pg_ctl stop -m MODE -w (with the timeout); nothing to do when it is not running."""
        if mode not in {"smart", "fast", "immediate"}:
            raise ValueError(f"unknown shutdown mode {mode!r}")
        if not self.is_running():
            self._reap(self.timeout)
            return
        self._pg_ctl("stop", "--mode", mode)
        self._reap(self.timeout)

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """An abrupt crash: SIGKILL the postmaster, then its backends (no shutdown at all).

        Open connections break at once, new ones are refused, and the next start() runs crash
        recovery. The backends are killed too (as in a host crash) because orphans would keep
        the shared memory busy and stop the next postmaster from starting.
        """
        pid = self.postmaster_pid()
        if pid is None or not process_alive(pid):
            raise ClusterError("the cluster is not running")
        os.kill(pid, signal.SIGKILL)
        self._reap(self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:
            stragglers = self._server_processes()
            for straggler in stragglers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(straggler, signal.SIGKILL)
            if not stragglers and not process_alive(pid):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"server processes {stragglers} outlived SIGKILL")
            time.sleep(0.02)

    def _server_processes(self) -> list[int]:
        """Live processes of this cluster: postgres processes working in its data directory."""
        data_dir = self.data_dir.resolve()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            pid = int(entry.name)
            if Path(cwd) == data_dir and b"postgres" in command and process_alive(pid):
                found.append(pid)
        return found

    def is_running(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            self._process = None
        pid = self.postmaster_pid()
        return pid is not None and process_alive(pid)

    def postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first_line) if first_line.strip().isdigit() else None

    def destroy(self, keep_log: Path | None = None) -> None:
        """Stop (fast, else kill), optionally copy the server log out, delete base_dir."""
        try:
            try:
                self.stop("fast")
            except ClusterError:
                if self.is_running():
                    self.kill()
        finally:
            if keep_log is not None and self.log_file.exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.log_file, keep_log)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _pg_ctl(self, action: str, *args: str | Path) -> None:
        run_as(
            self.user,
            [
                self.bindir / "pg_ctl",
                action,
                "--pgdata",
                self.data_dir,
                "--wait",
                "--timeout",
                str(int(self.timeout)),
                "--silent",
                *args,
            ],
            cwd=self.base_dir,
            timeout=self.timeout + 10,
        )


@contextlib.contextmanager
def private_cluster(
    tmp_path: Path,
    *,
    tls: bool = False,
    scram_password: str | None = None,
    timeout: float = 30.0,
) -> Iterator[PrivateCluster]:
    """A started private cluster; always stopped and deleted at the end, even on failure.

    The cluster lives in a short directory under the system temporary directory (see the
    module docstring); its server log is copied to `tmp_path / "postgres.log"` at the end.
    """
    require_bindir()
    server_user()
    cluster = PrivateCluster(
        make_server_dir("pgc-"), tls=tls, scram_password=scram_password, timeout=timeout
    )
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy(keep_log=tmp_path / "postgres.log" if tmp_path.is_dir() else None)
