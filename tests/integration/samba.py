"""A throw-away Samba Active Directory domain controller for integration tests.

OpenLDAP only binds by DN; Active Directory also takes ``john@ad.example.com``
and ``AD\\john``, answers error 49 with sub-codes and resolves nested groups
with its in-chain matching rule. Debian's Samba AD DC does all of that for
real, so the AD tests run against it.

* :func:`provisioned_template` runs ``samba-tool domain provision`` once
  (about 10 s) and adds ``data/active-directory.ldif`` with ``ldbadd``
  straight into the new ``sam.ldb``. The result is cached (by default under
  ``~/.cache/sftpauth-tests``, keyed by Samba's version, the LDIF and the
  provisioning options, and made again after a week so no password nears
  its maximum age; templates unused for a day are deleted); every start
  copies it.
* :class:`SambaDC` copies the template, writes its own ``smb.conf``
  (LDAP only, simple binds over plain LDAP allowed, a TLS certificate from
  :class:`.tls_certs.TestPKI` for LDAPS; every folder, the pid file
  included, in its own temporary folder, so several test runs can each
  have a DC at once) and starts ``samba -F``.
  Samba's LDAP server always listens on 389 and 636, so it runs inside a
  network namespace of its own (:class:`NetworkNamespace`), reached from
  the host over a veth pair with link-local addresses; nothing else ever
  runs in that namespace and it is removed on stop, also after a failure.

Needs root (network namespaces) and Debian's packages ``samba samba-ad-dc
samba-dsdb-modules samba-ad-provision winbind ldb-tools`` plus ``iproute2``
and ``ldap-utils``. Samba's tools are Python programs that need Debian's
``/usr/bin/python3`` and its ``samba`` module, so they run with a system
PATH and without this virtualenv's variables.

Environment knobs: ``SFTPAUTH_SAMBA_CACHE`` (folder of cached templates),
``SFTPAUTH_KEEP_SAMBA_DIR=1`` (keep the DC's folder on stop).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .slapd import DATA_DIR, CaseInsensitiveDict, find_ldap_tool, parse_ldif
from .tls_certs import TestPKI

__all__ = ["SambaDC", "SambaError", "SambaNotFound", "NetworkNamespace", "provisioned_template"]

PACKAGES = "samba samba-ad-dc samba-dsdb-modules samba-ad-provision winbind ldb-tools iproute2 ldap-utils"
INSTALL_HINT = f"On Debian 12: apt-get install {PACKAGES} (scripts/test does), and run the tests as root."

REALM = "AD.EXAMPLE.COM"
DOMAIN = "AD"
DNS_DOMAIN = "ad.example.com"
BASE_DN = "DC=ad,DC=example,DC=com"
HOST_NAME = "dc1"
ADMIN_PASSWORD = "Admin-Secret-1"
LDIF = DATA_DIR / "active-directory.ldif"
PROVISION_OPTIONS = (
    f"--realm={REALM}",
    f"--domain={DOMAIN}",
    f"--host-name={HOST_NAME}",
    "--server-role=dc",
    "--dns-backend=NONE",
    "--use-rfc2307",
    "--host-ip=127.0.0.1",
    f"--adminpass={ADMIN_PASSWORD}",
    f"--option=netbios name = {HOST_NAME.upper()}",
    "--option=interfaces = lo",
    "--option=bind interfaces only = yes",
)
TEMPLATE_MAX_AGE = 7 * 24 * 3600
UNUSED_TEMPLATE_AGE = 24 * 3600  # other templates (older test data, older Samba) unused this long are deleted
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_READY = "READY"
_USED = "USED"
_QUOTED_PASSWORD = re.compile(r'^unicodePwd: "(.*)"$', re.MULTILINE)


class SambaNotFound(RuntimeError):
    """Samba's AD DC, its tools, iproute2 or root rights are missing."""


class SambaError(RuntimeError):
    """Provisioning or starting the domain controller failed."""


# -- tools --------------------------------------------------------------------------------


def system_environment() -> dict:
    """Samba's Python tools with Debian's python3: no virtualenv on PATH or PYTHONPATH."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    environment["PATH"] = SYSTEM_PATH
    environment["LDAPNOINIT"] = "1"  # ldapsearch: ignore /etc/ldap/ldap.conf and ~/.ldaprc
    return environment


def _tool(name: str) -> str:
    for folder in SYSTEM_PATH.split(":"):
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise SambaNotFound(f"{name!r} not found in {SYSTEM_PATH}. {INSTALL_HINT}")


def find_tools() -> dict[str, str]:
    """Paths of samba, samba-tool, ldbadd and ip; SambaNotFound when one is missing or we are not root."""
    tools = {name: _tool(name) for name in ("samba", "samba-tool", "ldbadd", "ip")}
    if not Path("/usr/share/samba/setup").is_dir():
        raise SambaNotFound(f"Samba's provisioning files (samba-ad-provision) are missing. {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SambaNotFound("the Samba DC runs in a network namespace of its own, which needs root")
    find_ldap_tool("ldapsearch")
    return tools


def _run(command: Sequence[str], what: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(command), capture_output=True, text=True, env=system_environment(), timeout=timeout, **kwargs
    )
    if result.returncode != 0:
        raise SambaError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}")
    return result


def ad_ldif(text: str) -> str:
    """``unicodePwd: "secret"`` lines in AD's form: the quoted password in UTF-16LE, base64."""

    def encode(match: re.Match) -> str:
        quoted = f'"{match.group(1)}"'.encode("utf-16-le")
        return "unicodePwd:: " + base64.b64encode(quoted).decode("ascii")

    return _QUOTED_PASSWORD.sub(encode, text)


# -- the provisioned template --------------------------------------------------------------


def default_cache() -> Path:
    configured = os.environ.get("SFTPAUTH_SAMBA_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sftpauth-tests"


def template_key(tools: dict[str, str]) -> str:
    version = _run([tools["samba"], "--version"], "samba --version").stdout.strip()
    digest = hashlib.sha256()
    for part in (version, "\n".join(PROVISION_OPTIONS), LDIF.read_text(encoding="utf-8")):
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def provisioned_template(cache: Optional[Path] = None) -> Path:
    """A provisioned DC folder with the test accounts, made once and cached."""
    tools = find_tools()
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"samba-ad-{template_key(tools)}"
    _remove_unused_templates(cache, keep=target)
    ready = target / _READY
    if ready.exists() and time.time() - ready.stat().st_mtime < TEMPLATE_MAX_AGE:
        (target / _USED).touch()
        return target
    work = Path(tempfile.mkdtemp(prefix=".provisioning-", dir=cache))
    try:
        folder = work / "dc"
        _run([tools["samba-tool"], "domain", "provision", f"--targetdir={folder}", *PROVISION_OPTIONS], "samba-tool domain provision")
        ldif = work / "accounts.ldif"
        ldif.write_text(ad_ldif(LDIF.read_text(encoding="utf-8")), encoding="utf-8")
        _run([tools["ldbadd"], "-H", str(folder / "private" / "sam.ldb"), str(ldif)], f"ldbadd {LDIF.name}")
        (folder / _READY).touch()
        (folder / _USED).touch()
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)  # outdated
        try:
            folder.rename(target)
        except OSError:
            if not (target / _READY).exists():  # not another run that got there first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _remove_unused_templates(cache: Path, keep: Path) -> None:
    for folder in cache.glob("samba-ad-*"):
        marker = folder / _USED if (folder / _USED).exists() else folder / _READY
        if folder != keep and marker.exists() and time.time() - marker.stat().st_mtime > UNUSED_TEMPLATE_AGE:
            shutil.rmtree(folder, ignore_errors=True)


# -- the network namespace -----------------------------------------------------------------


class NetworkNamespace:
    """A namespace of our own joined to the host by a veth pair: host 169.254.X.1, inside .2 (a /30).

    Names carry this process's id, so :meth:`remove_stale` can delete what a
    killed earlier run left behind without touching anyone else's.
    """

    PREFIX = "sftpauth-samba-"

    def __init__(self, ip: str = "ip"):
        self.ip = ip
        token = secrets.token_hex(3)
        self.name = f"{self.PREFIX}{os.getpid()}-{token}"
        self.host_link = f"sfa{token}h"  # at most 15 characters
        self.inner_link = f"sfa{token}n"
        self.host_address = ""
        self.address = ""
        self.created = False

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.ip, *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise SambaError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def _free_subnet(self) -> int:
        used = self._ip("-4", "-o", "addr", "show").stdout + self._ip("-4", "route", "show").stdout
        choices = [third for third in range(1, 255) if third != 169 and f"169.254.{third}." not in used]
        if not choices:
            raise SambaError("no free 169.254.X.0/30 subnet for the Samba namespace")
        return random.choice(choices)

    def create(self) -> "NetworkNamespace":
        self.remove_stale(self.ip)
        third = self._free_subnet()
        self.host_address, self.address = f"169.254.{third}.1", f"169.254.{third}.2"
        self._ip("netns", "add", self.name)
        self.created = True
        try:
            self._ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.inner_link)
            self._ip("link", "set", self.inner_link, "netns", self.name)
            self._ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            self._ip("link", "set", self.host_link, "up")
            inside = ("netns", "exec", self.name, self.ip)
            self._ip(*inside, "addr", "add", f"{self.address}/30", "dev", self.inner_link)
            self._ip(*inside, "link", "set", self.inner_link, "up")
            self._ip(*inside, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return [self.ip, "netns", "exec", self.name, *argv]

    def remove(self) -> None:
        """Delete the veth pair and the namespace; safe to call twice."""
        if not self.created:
            return
        self._ip("link", "del", self.host_link, check=False)
        self._ip("netns", "del", self.name, check=False)
        self.created = False

    @classmethod
    def remove_stale(cls, ip: str = "ip") -> None:
        """Namespaces of ours whose test process is gone (a run that was killed)."""
        listing = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            match = re.fullmatch(re.escape(cls.PREFIX) + r"(\d+)-[0-9a-f]+", name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=30)


# -- the domain controller -------------------------------------------------------------------


class SambaDC:
    """A running Samba AD DC with the accounts of ``data/active-directory.ldif``.

    ``host`` is its address (inside its namespace), ``port`` 389 and
    ``ldaps_port`` 636; ``ca_certificate`` is the PEM file of the CA that
    signed its LDAPS certificate (for ``host`` and ``dc1.ad.example.com``).
    """

    realm = REALM
    domain = DOMAIN
    dns_domain = DNS_DOMAIN
    base_dn = BASE_DN
    admin = f"Administrator@{DNS_DOMAIN}"
    admin_dn = f"CN=Administrator,CN=Users,{BASE_DN}"
    admin_password = ADMIN_PASSWORD
    port = 389
    ldaps_port = 636

    def __init__(self, template: Path, start_timeout: float = 30.0, options: Sequence[str] = ()):
        """``options``: more ``smb.conf`` lines for ``[global]``; they win over the defaults above them."""
        self.template = Path(template)
        self.start_timeout = start_timeout
        self.options = tuple(options)
        self.tools = find_tools()
        self.namespace: Optional[NetworkNamespace] = None
        self.folder: Optional[Path] = None
        self.process: Optional[subprocess.Popen] = None
        self.host = ""
        self.ca_certificate: Optional[Path] = None
        self._log = None

    def __enter__(self) -> "SambaDC":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SambaDC {self.url} folder={str(self.folder)!r}>"

    @property
    def url(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def log_path(self) -> Optional[Path]:
        return self.folder / "samba.log" if self.folder else None

    def start(self) -> "SambaDC":
        if self.process is not None:
            raise SambaError("SambaDC already started")
        atexit.register(self.stop)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="sftpauth-samba-"))
            shutil.copytree(self.template, self.folder / "dc", symlinks=True)
            self.namespace = NetworkNamespace(self.tools["ip"]).create()
            self.host = self.namespace.address
            pki = TestPKI(self.folder / "pki")
            pair = pki.issue("dc", f"{HOST_NAME}.{DNS_DOMAIN}", (f"{HOST_NAME}.{DNS_DOMAIN}", self.host))
            self.ca_certificate = pki.ca_bundle
            config = self.folder / "smb.conf"
            config.write_text(self._config(pair), encoding="utf-8")
            self._log = open(self.folder / "samba-stdout.log", "ab")
            self.process = subprocess.Popen(
                self.namespace.command(self.tools["samba"], "-s", str(config), "-F", "--no-process-group"),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=system_environment(),
                start_new_session=True,  # its own process group: stop() ends samba and its children only
            )
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self, pair) -> str:
        dc = self.folder / "dc"
        return f"""\
[global]
\tnetbios name = {HOST_NAME.upper()}
\trealm = {REALM}
\tworkgroup = {DOMAIN}
\tserver role = active directory domain controller
\tserver services = ldap
\tidmap_ldb:use rfc2307 = yes
\tinterfaces = {self.host}
\tbind interfaces only = yes
\tldap server require strong auth = no
\tprivate dir = {dc}/private
\tstate directory = {dc}/state
\tcache directory = {dc}/cache
\tlock directory = {dc}
\tbinddns dir = {dc}/bind-dns
\tpid directory = {self.folder}/run
\tncalrpc dir = {self.folder}/run/ncalrpc
\twinbindd socket directory = {self.folder}/run/winbindd
\tntp signd socket directory = {self.folder}/run/ntp_signd
\tlog file = {self.folder}/samba.log
\tlogging = file
\ttls enabled = yes
\ttls keyfile = {pair.key}
\ttls certfile = {pair.certificate}
\ttls cafile = {self.ca_certificate}
""" + "".join(f"\t{line}\n" for line in self.options)

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise SambaError(f"samba exited with {self.process.returncode}:\n{self.log_tail()}")
            probe = subprocess.run(
                [find_ldap_tool("ldapsearch"), "-x", "-LLL", "-H", self.url, "-o", "nettimeout=2",
                 "-b", "", "-s", "base", "(objectClass=*)", "dnsHostName"],
                capture_output=True, env=system_environment(), timeout=10,
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise SambaError(f"samba did not answer on {self.url} within {self.start_timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """End samba (its process group), remove the namespace and the folder; safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sent in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sent)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process is not None and process.poll() is None:
            process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.namespace is not None:
            self.namespace.remove()
            self.namespace = None
        if self.folder is not None:
            if os.environ.get("SFTPAUTH_KEEP_SAMBA_DIR") == "1":
                print(f"keeping the Samba DC folder {self.folder}", file=sys.stderr)
            else:
                shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    def log_tail(self, lines: int = 40) -> str:
        texts = []
        for name in ("samba-stdout.log", "samba.log"):
            path = self.folder / name if self.folder else None
            if path is not None and path.exists():
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts) or "(no log)"

    # -- LDAP client tools, as the Administrator by default ------------------------------------

    def ldap_tool(self, tool: str, *args: str, bind: Optional[tuple[str, str]] = None,
                  input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run an OpenLDAP client tool against the DC (text in and out; any exit code)."""
        name, password = bind or (self.admin, self.admin_password)
        command = [find_ldap_tool(tool), "-x", "-H", self.url, "-D", name, "-w", password, *args]
        return subprocess.run(command, input=input, capture_output=True, text=True, env=system_environment(), timeout=30)

    def search(self, base: str, filter: str = "(objectClass=*)", attributes: Sequence[str] = (),
               scope: str = "sub") -> list[tuple[str, CaseInsensitiveDict]]:
        """ldapsearch as the Administrator: ``[(dn, {attribute: [values]})]`` (referrals left out)."""
        result = self.ldap_tool("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-s", scope, "-b", base, filter, *attributes)
        if result.returncode != 0:
            raise SambaError(f"ldapsearch -b {base!r} {filter!r} failed (exit {result.returncode}): {result.stderr}")
        return parse_ldif(result.stdout.encode("utf-8"))

    def modify(self, ldif: str) -> None:
        """ldapmodify as the Administrator; SambaError on any failure."""
        result = self.ldap_tool("ldapmodify", input=ldif)
        if result.returncode != 0:
            raise SambaError(f"ldapmodify failed (exit {result.returncode}): {result.stdout}{result.stderr}")
