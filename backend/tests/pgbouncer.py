"""A private PgBouncer (transaction pooling, like Neon's pooler) in front of a PostgreSQL server.

    with private_cluster(tmp_path) as cluster:
        with pgbouncer(cluster.host, cluster.port, cluster.dbname, tmp_path) as url:
            await psycopg.AsyncConnection.connect(url, prepare_threshold=None)

PgBouncer refuses to run as root, so (as for the cluster) it runs as the `postgres` OS user, in
the foreground as our child process, from a short directory of its own; its log is copied to
`tmp_path / "pgbouncer.log"` at the end. Without the `pgbouncer` binary the test is skipped
(CI=true: failed); `.ci/install-test-deps` installs Debian's.

What a psycopg 3 client needs from PgBouncer 1.18 in transaction mode (checked against it):
- `prepare_threshold=None` on a plain psycopg client: 1.18 does not track server-side prepared
  statements, and psycopg prepares a query after its fifth run by default; with many clients
  sharing server connections that fails with DuplicatePreparedStatement ("prepared statement
  "_pg3_0" already exists"), or runs another client's statement of that name. The app names
  its statements apart and turns preparing off by itself (database.py, tests/test_prepared.py).
- nothing in `ignore_startup_parameters` for psycopg itself: libpq sends only user, database
  and, when asked, application_name and client_encoding, which PgBouncer tracks.
  `extra_float_digits` is listed for other drivers (pgjdbc, asyncpg). `options` is NOT
  ignored: a client sending `options=-c ...` is refused ("unsupported startup parameter:
  options") rather than silently losing its settings.
- no `channel_binding=require`: 1.18 offers clients SCRAM without channel binding only, so
  libpq refuses ("server did not offer an authentication method that supports channel
  binding"). Client TLS itself works (`client_tls=True`, the URL gets `sslmode=require`).
- the admin console (`admin_url`, `SHOW POOLS`) answers psycopg's extended protocol with
  autocommit on.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from tests.pg_cluster import (
    ClusterError,
    free_port,
    log_tail,
    make_self_signed_cert,
    make_server_dir,
    server_user,
    unavailable,
    write_file,
)

IGNORED_STARTUP_PARAMETERS = ("extra_float_digits",)


def find_pgbouncer() -> Path | None:
    """PGBOUNCER, else `pgbouncer` on PATH, else Debian's /usr/sbin/pgbouncer."""
    if configured := os.environ.get("PGBOUNCER"):
        return Path(configured) if os.access(configured, os.X_OK) else None
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    return Path(found) if found else None


def require_pgbouncer() -> Path:
    binary = find_pgbouncer()
    if binary is None:
        unavailable("the pgbouncer binary is not installed (.ci/install-test-deps installs it)")
    return binary


def _quote_auth(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One PgBouncer process: `start()`, `stop()`, `url` (clients), `admin_url` (console)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        dbname: str,
        work_dir: Path,
        *,
        user: str = "postgres",
        password: str | None = None,
        pool_mode: str = "transaction",
        default_pool_size: int = 10,
        max_client_conn: int = 500,
        server_tls_sslmode: str = "prefer",
        client_tls: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.binary = require_pgbouncer()
        self.user = server_user()
        self.work_dir = work_dir
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.dbname = dbname
        self.client_user = user
        self.password = password
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.server_tls_sslmode = server_tls_sslmode
        self.client_tls = client_tls
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port = free_port()
        self.ini_file = work_dir / "pgbouncer.ini"
        self.auth_file = work_dir / "userlist.txt"
        self.log_file = work_dir / "pgbouncer.log"
        self.cert_file = work_dir / "client-tls.crt"
        self.key_file = work_dir / "client-tls.key"
        self._process: subprocess.Popen[bytes] | None = None

    def _userinfo(self) -> str:
        userinfo = quote(self.client_user, safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        return userinfo

    @property
    def url(self) -> str:
        """The client side: `postgresql://user[:password]@127.0.0.1:PORT/DBNAME[?sslmode=require]`."""
        return self._url(quote(self.dbname, safe=""))

    @property
    def admin_url(self) -> str:
        """The admin console: the `pgbouncer` database (SHOW POOLS, SHOW STATS, ...)."""
        return self._url("pgbouncer")

    def _url(self, database: str) -> str:
        query = "?sslmode=require" if self.client_tls else ""
        return f"postgresql://{self._userinfo()}@{self.host}:{self.port}/{database}{query}"

    def write_config(self) -> None:
        upstream = (
            f"host={self.upstream_host} port={self.upstream_port} dbname={self.dbname} "
            f"user={self.client_user}"
        )
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "pool_mode": self.pool_mode,
            # trust still needs the user in auth_file; scram-sha-256 with a plain-text password
            # there lets PgBouncer both check clients and log in to the server with SCRAM.
            "auth_type": "trust" if self.password is None else "scram-sha-256",
            "auth_file": str(self.auth_file),
            "admin_users": self.client_user,
            "stats_users": self.client_user,
            "max_client_conn": str(self.max_client_conn),
            "default_pool_size": str(self.default_pool_size),
            "ignore_startup_parameters": ",".join(IGNORED_STARTUP_PARAMETERS),
            "server_tls_sslmode": self.server_tls_sslmode,
            # Fault tests restart the server: retry a failed server login after 1 s, not 15 s.
            "server_login_retry": "1",
            "server_connect_timeout": "5",
            "query_wait_timeout": "30",
            "log_connections": "0",
            "log_disconnections": "0",
        }
        if self.client_tls:
            make_self_signed_cert(self.cert_file, self.key_file, self.user)
            settings["client_tls_sslmode"] = "require"
            settings["client_tls_cert_file"] = str(self.cert_file)
            settings["client_tls_key_file"] = str(self.key_file)
        lines = [f"[databases]\n{self.dbname} = {upstream}\n", "[pgbouncer]"]
        lines.extend(f"{key} = {value}" for key, value in settings.items())
        write_file(self.user, self.ini_file, "\n".join(lines) + "\n")
        auth = f"{_quote_auth(self.client_user)} {_quote_auth(self.password or '')}\n"
        write_file(self.user, self.auth_file, auth)

    def start(self) -> None:
        """Start pgbouncer in the foreground and wait until it accepts TCP connections."""
        if self._process is not None and self._process.poll() is None:
            raise ClusterError("pgbouncer is already running")
        self.write_config()
        with self.log_file.open("ab") as log:
            self.user.chown(self.log_file)
            self._process = subprocess.Popen(
                [str(self.binary), str(self.ini_file)],
                cwd=self.work_dir,
                env=self.user.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.user.run_uid,
                group=self.user.run_gid,
                extra_groups=self.user.run_groups,
            )
        deadline = time.monotonic() + self.timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise ClusterError(
                    f"pgbouncer exited with {code} while starting:\n{log_tail(self.log_file)}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ClusterError(
                    f"pgbouncer did not listen within {self.timeout:g}s:\n{log_tail(self.log_file)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (immediate shutdown in 1.18), SIGKILL if it lingers; always reaped."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: the pooler vanishes, its client connections break."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None


@contextlib.contextmanager
def pgbouncer(
    upstream_host: str,
    upstream_port: int,
    dbname: str,
    tmp_path: Path,
    *,
    user: str = "postgres",
    password: str | None = None,
    client_tls: bool = False,
    default_pool_size: int = 10,
) -> Iterator[str]:
    """A started PgBouncer in front of the server; yields its client URL; always stopped."""
    require_pgbouncer()
    server_user()
    work_dir = make_server_dir("pgb-")
    try:
        bouncer = PgBouncer(
            upstream_host,
            upstream_port,
            dbname,
            work_dir,
            user=user,
            password=password,
            client_tls=client_tls,
            default_pool_size=default_pool_size,
        )
        bouncer.start()
        try:
            yield bouncer.url
        finally:
            bouncer.stop()
    finally:
        if tmp_path.is_dir():
            with contextlib.suppress(OSError):
                shutil.copyfile(work_dir / "pgbouncer.log", tmp_path / "pgbouncer.log")
        shutil.rmtree(work_dir, ignore_errors=True)
