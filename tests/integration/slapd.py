"""Start a throw-away, real OpenLDAP ``slapd`` for integration tests.

Everything (config, database, pid/args files, log) lives in a fresh
temporary folder.  Nothing under ``/etc/ldap`` is written, the system's
``slapd.d`` config is never read and a system slapd (if any) is left alone;
the only system files used are the shipped, read-only schema files
(``/etc/ldap/schema/*.schema`` on Debian) and the loadable modules
(``/usr/lib/ldap/*.so`` on Debian).

Typical use::

    with SlapdServer() as server:
        server.add_ldif_file("data/directory.ldif")
        entries = server.search(server.base_dn, "(uid=alice)", ["memberOf"])

Client tools (``ldapsearch``, ``ldapadd``, ``ldapwhoami``) run with
``LDAPNOINIT=1`` so ``/etc/ldap/ldap.conf`` and ``~/.ldaprc`` cannot change
their behaviour.

Environment knobs (all optional):

``SFTPAUTH_SLAPD``
    path of the slapd binary to use instead of searching for it.
``SFTPAUTH_SLAPD_DEBUG``
    slapd ``-d`` level (default ``none``: errors only), e.g. ``stats`` to log
    every operation into ``slapd.log`` in the temporary folder.
``SFTPAUTH_KEEP_SLAPD_DIR=1``
    do not delete the temporary folder on stop (its path is printed).
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "SlapdError",
    "SlapdNotFound",
    "SlapdServer",
    "BlackHole",
    "CaseInsensitiveDict",
    "find_slapd",
    "find_ldap_tool",
]

INSTALL_HINT = (
    "Install OpenLDAP server and client tools, e.g. on Debian/Ubuntu "
    "'apt-get install slapd ldap-utils' (on Fedora/RHEL 'dnf install "
    "openldap-servers openldap-clients'), or point SFTPAUTH_SLAPD at a "
    "slapd binary."
)

_SLAPD_CANDIDATES = (
    "/usr/sbin/slapd",
    "/usr/libexec/slapd",
    "/usr/local/sbin/slapd",
    "/usr/local/libexec/slapd",
    "/opt/homebrew/opt/openldap/libexec/slapd",
    "/usr/local/opt/openldap/libexec/slapd",
)
_TOOL_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/opt/openldap/bin",
              "/usr/local/opt/openldap/bin")
_SCHEMA_DIRS = (
    "/etc/ldap/schema",                 # Debian / Ubuntu
    "/etc/openldap/schema",             # Fedora / RHEL / Alpine
    "/usr/local/etc/openldap/schema",   # BSD / Homebrew
    "/opt/homebrew/etc/openldap/schema",
)
_MODULE_DIRS = (
    "/usr/lib/ldap",                    # Debian / Ubuntu
    "/usr/lib64/openldap",              # Fedora / RHEL
    "/usr/lib/openldap",                # Arch / Alpine
    "/usr/libexec/openldap",
    "/usr/local/libexec/openldap",
)
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")

DATA_DIR = Path(__file__).resolve().parent / "data"
CUSTOM_SCHEMA = DATA_DIR / "sftpauth-test.schema"


class SlapdNotFound(RuntimeError):
    """slapd, the OpenLDAP client tools, schema files or modules are missing."""


class SlapdError(RuntimeError):
    """slapd failed to start, or an LDAP tool returned an unexpected error."""


# --------------------------------------------------------------------------
# locating the pieces
# --------------------------------------------------------------------------

def find_slapd() -> str:
    """Return the absolute path of the slapd binary or raise SlapdNotFound."""
    env = os.environ.get("SFTPAUTH_SLAPD")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise SlapdNotFound(
            f"SFTPAUTH_SLAPD={env!r} is not an executable file. {INSTALL_HINT}")
    # slapd lives in sbin, which is often missing from a non-root PATH.
    found = shutil.which("slapd")
    if found:
        return found
    for candidate in _SLAPD_CANDIDATES:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise SlapdNotFound(
        "OpenLDAP slapd not found (looked on PATH and in "
        f"{', '.join(_SLAPD_CANDIDATES)}). {INSTALL_HINT}")


def find_ldap_tool(name: str) -> str:
    """Return the path of an OpenLDAP client tool (ldapsearch, ...)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _TOOL_DIRS:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise SlapdNotFound(f"OpenLDAP client tool {name!r} not found. {INSTALL_HINT}")


def _find_schema_dir(slapd: str) -> Path:
    candidates = list(_SCHEMA_DIRS)
    # A self-built slapd in PREFIX/libexec or PREFIX/sbin has PREFIX/etc/openldap.
    prefix = Path(slapd).resolve().parent.parent
    candidates.insert(0, str(prefix / "etc" / "openldap" / "schema"))
    for folder in candidates:
        if all((Path(folder) / f"{name}.schema").is_file() for name in SCHEMAS):
            return Path(folder)
    raise SlapdNotFound(
        "OpenLDAP schema files (core/cosine/inetorgperson/nis .schema) not "
        f"found in {', '.join(candidates)}. {INSTALL_HINT}")


def _static_components(slapd: str) -> set[str]:
    """Backends/overlays compiled into slapd (parsed from ``slapd -VVV``)."""
    try:
        out = subprocess.run([slapd, "-VVV"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return set()
    text = out.stdout + out.stderr
    names: set[str] = set()
    in_list = False
    for line in text.splitlines():
        if line.startswith("Included static"):
            in_list = True
            continue
        if in_list and line.startswith((" ", "\t")) and line.strip():
            names.add(line.strip())
        else:
            in_list = False
    return names


def _module_lines(slapd: str, overlays: Sequence[str] = ("memberof",)) -> list[str]:
    """slapd.conf lines loading back_mdb and the overlays unless compiled in."""
    static = _static_components(slapd)
    wanted = [mod for mod, static_name in (("back_mdb", "mdb"),
                                           *((name, name) for name in overlays))
              if static_name not in static]
    if not wanted:
        return []
    for folder in _MODULE_DIRS:
        if all(any(Path(folder).glob(f"{mod}.*")) for mod in wanted):
            return [f"modulepath {folder}"] + [f"moduleload {mod}" for mod in wanted]
    raise SlapdNotFound(
        f"slapd modules {', '.join(wanted)} not found in "
        f"{', '.join(_MODULE_DIRS)}. {INSTALL_HINT}")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _conf_value(value: str) -> str:
    """Quote a value for slapd.conf."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------
# LDIF output parsing (for search results)
# --------------------------------------------------------------------------

class CaseInsensitiveDict(dict):
    """dict with lower-cased keys and case-insensitive lookups (LDAP attrs)."""

    def __setitem__(self, key, value):
        super().__setitem__(key.lower(), value)

    def __getitem__(self, key):
        return super().__getitem__(key.lower())

    def __contains__(self, key):
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key, default=None):
        return super().get(key.lower(), default)

    def setdefault(self, key, default=None):
        return super().setdefault(key.lower(), default)


def _decode(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def parse_ldif(text: bytes) -> list[tuple[str, CaseInsensitiveDict]]:
    """Parse ldapsearch ``-LLL`` output into ``[(dn, {attr: [values]})]``.

    Values are ``str`` (UTF-8 decoded) or ``bytes`` when not valid UTF-8.
    """
    # unfold continuation lines first
    lines: list[bytes] = []
    for line in text.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b" ") and lines:
            lines[-1] += line[1:]
        else:
            lines.append(line)
    entries: list[tuple[str, CaseInsensitiveDict]] = []
    dn = None
    attrs = CaseInsensitiveDict()
    for line in lines + [b""]:
        if not line:
            if dn is not None:
                entries.append((dn, attrs))
            dn, attrs = None, CaseInsensitiveDict()
            continue
        if line.startswith(b"#"):
            continue
        name, _, rest = line.partition(b":")
        if rest.startswith(b":"):
            value = base64.b64decode(rest[1:].strip())
        else:
            value = rest[1:] if rest.startswith(b" ") else rest
        key = name.decode("ascii")
        if key.lower() == "dn":
            dn = value.decode("utf-8")
        else:
            attrs.setdefault(key, []).append(_decode(value))
    return entries


# --------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------

class SlapdServer:
    """A private slapd listening on ``ldap://127.0.0.1:<free port>``.

    Attributes: ``host``, ``port``, ``url`` (``None`` until started),
    ``base_dn``, ``admin_dn``, ``admin_password``, ``tmpdir`` (temporary
    folder), ``data_dir`` (mdb database folder), ``conf_path``, ``log_path``.
    """

    host = "127.0.0.1"
    base_dn = "dc=example,dc=com"
    admin_dn = "cn=admin,dc=example,dc=com"

    def __init__(self, admin_password: str = "admin-secret",
                 extra_schemas: Iterable[os.PathLike | str] = (CUSTOM_SCHEMA,),
                 start_timeout: float = 15.0,
                 debug_level: str | None = None,
                 port: int | None = None,
                 tls_certificate: os.PathLike | str | None = None,
                 tls_key: os.PathLike | str | None = None,
                 overlays: Sequence[str] = ("memberof",),
                 acl: str = ""):
        """``port`` fixes the ldap:// port (default: a free one, e.g. to
        restart a server where a test expects it).  With ``tls_certificate``
        and ``tls_key`` (PEM files) slapd also serves StartTLS on ldap:// and
        LDAPS on ``ldaps_url`` (``ldaps://127.0.0.1:<ldaps_port>``).  ``acl``
        (slapd.conf ``access to`` rules) comes before the default rules, so
        it wins where it applies."""
        self.admin_password = admin_password
        self.acl = acl
        # overlays=() gives a directory without memberOf (groups by search only)
        self.overlays = tuple(overlays)
        self.fixed_port = port
        self.tls_certificate = Path(tls_certificate) if tls_certificate else None
        self.tls_key = Path(tls_key) if tls_key else None
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise SlapdError("tls_certificate and tls_key go together")
        self.ldaps_port: int | None = None
        self.ldaps_url: str | None = None
        self.extra_schemas = [Path(p) for p in extra_schemas]
        self.start_timeout = start_timeout
        self.debug_level = debug_level or os.environ.get(
            "SFTPAUTH_SLAPD_DEBUG", "none")
        self.port: int | None = None
        self.url: str | None = None
        self.tmpdir: Path | None = None
        self.data_dir: Path | None = None
        self.conf_path: Path | None = None
        self.log_path: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> "SlapdServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SlapdServer url={self.url!r} tmpdir={str(self.tmpdir)!r}>"

    # -- lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "SlapdServer":
        """Write the config, start slapd and wait until it answers."""
        if self.process is not None:
            raise SlapdError("SlapdServer already started")
        self.slapd = find_slapd()
        self.ldapsearch = find_ldap_tool("ldapsearch")
        self.ldapadd = find_ldap_tool("ldapadd")
        self.ldapwhoami_tool = find_ldap_tool("ldapwhoami")
        schema_dir = _find_schema_dir(self.slapd)
        modules = _module_lines(self.slapd, self.overlays)
        for extra in self.extra_schemas:
            if not extra.is_file():
                raise SlapdError(f"schema file {extra} does not exist")

        self.tmpdir = Path(tempfile.mkdtemp(prefix="sftpauth-slapd-"))
        atexit.register(self.stop)
        try:
            self.data_dir = self.tmpdir / "data"
            self.data_dir.mkdir(mode=0o700)
            self.conf_path = self.tmpdir / "slapd.conf"
            self.log_path = self.tmpdir / "slapd.log"
            self.conf_path.write_text(
                self._config(schema_dir, modules), encoding="utf-8")
            self._check_config()
            # Choosing a port by binding to port 0 is racy (someone may take
            # it before slapd binds); retry with a fresh port in that case.
            for attempt in range(5):
                self.port = self.fixed_port or _free_port(self.host)
                self.url = f"ldap://{self.host}:{self.port}"
                if self.tls_certificate is not None:
                    self.ldaps_port = _free_port(self.host)
                    self.ldaps_url = f"ldaps://{self.host}:{self.ldaps_port}"
                if self._spawn_and_wait():
                    return self
                if not self._log_says_address_in_use() or attempt == 4:
                    break
            raise SlapdError(
                f"slapd did not start on {self.url} (exit code "
                f"{self.process.returncode if self.process else None}); "
                f"log tail ({self.log_path}):\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _config(self, schema_dir: Path, modules: Sequence[str]) -> str:
        assert self.tmpdir is not None and self.data_dir is not None
        lines = [f"# generated by {__name__} for an sftpauth integration test"]
        lines += [f"include {_conf_value(str(schema_dir / (n + '.schema')))}"
                  for n in SCHEMAS]
        lines += [f"include {_conf_value(str(p.resolve()))}"
                  for p in self.extra_schemas]
        lines += [
            f"pidfile {_conf_value(str(self.tmpdir / 'slapd.pid'))}",
            f"argsfile {_conf_value(str(self.tmpdir / 'slapd.args'))}",
            *modules,
            *self._tls_lines(),
            "",
            "database mdb",
            f"suffix {_conf_value(self.base_dn)}",
            f"rootdn {_conf_value(self.admin_dn)}",
            f"rootpw {_conf_value(self.admin_password)}",
            f"directory {_conf_value(str(self.data_dir))}",
            "maxsize 67108864",
            # tests never need durability; makes writes much faster
            "dbnosync",
            "index objectClass eq",
            "index uid,cn,mail,memberUid,member eq",
            "",
            *([
                "overlay memberof",
                "memberof-group-oc groupOfNames",
                "memberof-member-ad member",
                "memberof-memberof-ad memberOf",
                "memberof-refint TRUE",
            ] if "memberof" in self.overlays else []),
            "",
            # rootdn bypasses these; "users" = any authenticated (bound) DN
            *([self.acl] if self.acl else []),
            "access to attrs=userPassword",
            "    by self write",
            "    by anonymous auth",
            "    by * none",
            "access to *",
            "    by users read",
            "    by anonymous read",
            "",
        ]
        return "\n".join(lines)

    def _tls_lines(self) -> list[str]:
        if self.tls_certificate is None:
            return []
        return [
            f"TLSCertificateFile {_conf_value(str(self.tls_certificate.resolve()))}",
            f"TLSCertificateKeyFile {_conf_value(str(self.tls_key.resolve()))}",
        ]

    def _check_config(self) -> None:
        """Run ``slapd -Tt`` (slaptest) for a clear error on a bad config."""
        result = subprocess.run(
            [self.slapd, "-Ttest", "-u", "-f", str(self.conf_path)],
            capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise SlapdError(
                f"slapd config {self.conf_path} is invalid:\n"
                f"{result.stdout}{result.stderr}")

    def _spawn_and_wait(self) -> bool:
        """Start slapd on self.url; True once it answers, False if it died."""
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.log_path, "ab")
        # -d keeps slapd in the foreground; its output goes to the log file
        # (never a pipe, which could fill up and block slapd).  We are
        # allowed to run as root, so no -u/-g.
        self.process = subprocess.Popen(
            [self.slapd, "-f", str(self.conf_path), "-h", self._listeners(),
             "-d", self.debug_level],
            stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, env=self._env(), close_fds=True)
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            probe = subprocess.run(
                [self.ldapsearch, "-x", "-LLL", "-H", self.url, "-b", "",
                 "-s", "base", "-o", "nettimeout=2", "(objectClass=*)",
                 "namingContexts"],
                capture_output=True, env=self._env(), timeout=10)
            if probe.returncode == 0:
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        self._terminate()
        raise SlapdError(
            f"slapd did not answer on {self.url} within {self.start_timeout} s;"
            f" log tail ({self.log_path}):\n{self.log_tail()}")

    def _listeners(self) -> str:
        """slapd -h: the ldap:// URL, and the ldaps:// one when TLS is on."""
        urls = [f"{self.url}/"]
        if self.ldaps_url is not None:
            urls.append(f"{self.ldaps_url}/")
        return " ".join(urls)

    def _log_says_address_in_use(self) -> bool:
        return "Address already in use" in self.log_tail(200)

    def _terminate(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # keep the last process around for error messages
        self._last_returncode = proc.returncode

    def kill(self) -> None:
        """SIGKILL slapd (a crash: no clean close of its connections); stop() still cleans up."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM slapd, wait for it, then delete the temporary folder."""
        self._terminate()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.tmpdir is not None:
            if os.environ.get("SFTPAUTH_KEEP_SLAPD_DIR") == "1":
                print(f"keeping slapd folder {self.tmpdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of slapd's log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        if self._log_file is not None:
            self._log_file.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- client helpers --------------------------------------------------------

    @staticmethod
    def _env() -> dict:
        env = dict(os.environ)
        env["LDAPNOINIT"] = "1"  # ignore /etc/ldap/ldap.conf and ~/.ldaprc
        return env

    def _require_running(self) -> None:
        if not self.running:
            raise SlapdError(f"slapd is not running; log tail:\n{self.log_tail()}")

    def _bind_args(self, bind_dn: str | None, password: str | bytes | None) -> list:
        if bind_dn is None:  # default: the rootdn
            bind_dn, password = self.admin_dn, self.admin_password
        if bind_dn == "":  # anonymous
            return ["-x"]
        if isinstance(password, str):
            password = password.encode("utf-8")
        return ["-x", "-D", bind_dn.encode("utf-8"), "-w", password or b""]

    def ldap_tool(self, tool: str, *args, bind_dn: str | None = None,
                  password: str | bytes | None = None,
                  input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run an OpenLDAP client tool against this server (bytes in/out).

        ``bind_dn=None`` binds as the admin (rootdn), ``bind_dn=""`` binds
        anonymously.  The result is returned whatever the exit code.
        """
        self._require_running()
        cmd = [find_ldap_tool(tool), "-H", self.url,
               *self._bind_args(bind_dn, password),
               *[a.encode("utf-8") if isinstance(a, str) else a for a in args]]
        return subprocess.run(cmd, input=input, capture_output=True,
                              env=self._env(), timeout=30)

    def ldapwhoami(self, bind_dn: str, password: str | bytes) -> subprocess.CompletedProcess:
        """Simple-bind as ``bind_dn`` with ``ldapwhoami``; exit 0 = success,
        49 = invalid credentials.  ``stdout`` is e.g. ``b'dn:uid=...'``."""
        return self.ldap_tool("ldapwhoami", bind_dn=bind_dn, password=password)

    def add_ldif(self, text: str | bytes, bind_dn: str | None = None,
                 password: str | bytes | None = None) -> None:
        """Add the entries in LDIF ``text`` over LDAP (``ldapadd``), so the
        overlays (memberof) run; raise SlapdError on any failure."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        result = self.ldap_tool("ldapadd", bind_dn=bind_dn, password=password,
                                input=data)
        if result.returncode != 0:
            raise SlapdError(
                f"ldapadd failed (exit {result.returncode}):\n"
                f"{result.stdout.decode('utf-8', 'replace')}"
                f"{result.stderr.decode('utf-8', 'replace')}")

    def add_ldif_file(self, path: os.PathLike | str) -> None:
        """Add all entries of an LDIF file (see add_ldif)."""
        self.add_ldif(Path(path).read_bytes())

    def search(self, base: str, filter: str = "(objectClass=*)",
               attrs: Sequence[str] | None = ("*", "+"), scope: str = "sub",
               bind_dn: str | None = None,
               password: str | bytes | None = None,
               ) -> list[tuple[str, CaseInsensitiveDict]]:
        """``ldapsearch`` and return ``[(dn, {attr: [values]})]``.

        Binds as the admin by default (``bind_dn=""`` = anonymous).  The
        default ``attrs`` ask for user *and* operational attributes, so
        ``memberOf`` is included.  Attribute lookups are case-insensitive;
        values are ``str`` (UTF-8).  A missing base returns ``[]``.
        """
        args = ["-LLL", "-o", "ldif-wrap=no", "-s", scope, "-b", base, filter]
        args += list(attrs or ())
        result = self.ldap_tool("ldapsearch", *args, bind_dn=bind_dn,
                                password=password)
        if result.returncode == 32:  # noSuchObject
            return []
        if result.returncode != 0:
            raise SlapdError(
                f"ldapsearch -b {base!r} {filter!r} failed (exit "
                f"{result.returncode}): "
                f"{result.stderr.decode('utf-8', 'replace')}")
        return parse_ldif(result.stdout)


# --------------------------------------------------------------------------
# a dead server
# --------------------------------------------------------------------------

class BlackHole:
    """A loopback TCP port that plays a dead LDAP server.

    ``accept=True``: connections are accepted (and counted in ``accepted``)
    but nothing is ever answered, like a hung slapd.  ``accept=False``: the
    listen queue is kept full, so connection attempts are never accepted
    and time out, like a host that drops packets.  ``close()`` frees the
    port (e.g. to start a real slapd there).
    """

    def __init__(self, accept: bool = True):
        import threading

        self.host = SlapdServer.host
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = None
        if accept:
            self._listener.listen(64)
            self._listener.settimeout(0.05)
            self._thread = threading.Thread(target=self._accept, daemon=True,
                                            name=f"black-hole-{self.port}")
            self._thread.start()
        else:
            self._listener.listen(0)
            for _ in range(4):  # fill the accept queue: later SYNs are dropped
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                filler.setblocking(False)
                try:
                    filler.connect((self.host, self.port))
                except BlockingIOError:
                    pass
                self._held.append(filler)
            time.sleep(0.05)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(connection)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for held in self._held:
            held.close()
        self._held.clear()
        self._listener.close()

    def __enter__(self) -> "BlackHole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
