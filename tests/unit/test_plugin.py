"""The ``twistd sftpauth`` plugin: discoverable where sftpauth is installed, and shipped in the wheel."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

DISCOVER = textwrap.dedent(
    """
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    print(sorted(plugin.tapname for plugin in getPlugins(IServiceMaker)))
    """
)


def _sftpauth_plugin():
    plugins = [plugin for plugin in getPlugins(IServiceMaker) if plugin.tapname == "sftpauth"]
    assert len(plugins) == 1, "exactly one sftpauth twistd plugin must be found"
    return plugins[0]


def test_plugin_is_discoverable_in_this_process():
    """getPlugins(IServiceMaker) finds one plugin with tapname 'sftpauth'."""
    plugin = _sftpauth_plugin()
    assert plugin.description
    assert "LDAP" in plugin.description


def test_plugin_options_require_a_configuration_file():
    """The plugin's options are sftpauth.tap.Options, and --config is required."""
    options = _sftpauth_plugin().options()
    from sftpauth.tap import Options

    assert isinstance(options, Options)
    with pytest.raises(usage.UsageError, match="--config FILE is required"):
        options.parseOptions([])


def test_the_options_ignore_sighup_until_its_handler_is_installed(tmp_path):
    """QA: a SIGHUP in the second a start takes (before the reload handler) ended twistd with status 129."""
    import signal

    config = tmp_path / "ok.ini"
    config.write_text(f"[server]\ndata_folder = {tmp_path}/data\n[services/ftp]\ntype = ftp\nport = 0\n", encoding="utf-8")
    saved = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        _sftpauth_plugin().options().parseOptions(["--config", str(config)])
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, saved)


def test_plugin_refuses_a_bad_configuration_with_exit_status_1(tmp_path, capsys):
    """A configuration with errors stops twistd with status 1 and the errors, not a traceback."""
    bad = tmp_path / "bad.ini"
    bad.write_text("[services/ftp]\ntype = ftp\n", encoding="utf-8")
    options = _sftpauth_plugin().options()
    with pytest.raises(SystemExit) as caught:
        options.parseOptions(["--config", str(bad)])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert f"{bad}:1 [services/ftp] port: required option is missing" in err


def _clean_environment() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    environment["PYTHONNOUSERSITE"] = "1"
    return environment


def test_plugin_is_discoverable_from_any_folder(tmp_path):
    """A fresh interpreter in an unrelated folder (as twistd runs) finds the sftpauth plugin."""
    found = subprocess.run(
        [sys.executable, "-c", DISCOVER],
        cwd=tmp_path,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "'sftpauth'" in found.stdout, found.stdout + found.stderr


def test_twistd_lists_sftpauth(tmp_path):
    """``twistd --help`` of this environment lists the sftpauth subcommand."""
    twistd = BIN / "twistd"
    if not twistd.exists():  # pragma: no cover - twisted always installs it
        pytest.skip("no twistd script next to this interpreter")
    listed = subprocess.run(
        [str(twistd), "--help"], cwd=tmp_path, env=_clean_environment(), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "sftpauth" in listed.stdout


# -- the wheel, in a fresh virtualenv ----------------------------------------------------------

_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "dropin.cache", "var", "_trial_temp"
)


def _pip(*arguments: str, python: str = sys.executable, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "pip", "--disable-pip-version-check", *arguments],
        cwd=cwd,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _build_wheel(source: Path, output: Path) -> Path:
    """Build sftpauth's wheel; without build isolation when the environment can."""
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(output), str(source))
    if built.returncode != 0:  # setuptools >= 68 or wheel missing here: let pip fetch them
        built = _pip("wheel", "--no-deps", "-w", str(output), str(source))
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = glob.glob(str(output / "sftpauth-*.whl"))
    return Path(wheel)


@pytest.mark.integration
def test_wheel_installs_a_working_twistd_plugin(tmp_path):
    """The wheel ships the plugin and configspec (no twisted/plugins/__init__.py) and works in a fresh venv."""
    # Build from a copy so no build/ or egg-info appears in the checkout.
    source = tmp_path / "source"
    shutil.copytree(PROJECT, source, ignore=_NOT_SOURCE, symlinks=True)
    wheels = tmp_path / "wheels"
    wheel = _build_wheel(source, wheels)

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/sftpauth_plugin.py" in names
    assert "sftpauth/config/configspec.ini" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not any(name.startswith("tests/") for name in names)

    # The dependencies as wheels (from the pip cache or the registry), then an offline install.
    collected = _pip("wheel", "-w", str(wheels), str(wheel))
    assert collected.returncode == 0, collected.stdout + collected.stderr
    venv = tmp_path / "venv"
    created = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300
    )
    assert created.returncode == 0, created.stderr
    python = str(venv / "bin" / "python")
    installed = _pip("install", "--no-index", "--find-links", str(wheels), str(wheel), python=python)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv / "bin" / command[0]), *command[1:]],
            cwd=tmp_path,
            env=_clean_environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    listed = run("twistd", "--help")
    assert listed.returncode == 0, listed.stderr
    assert "sftpauth" in listed.stdout

    plugin_help = run("twistd", "sftpauth", "--help")
    assert plugin_help.returncode == 0, plugin_help.stderr
    assert "--config" in plugin_help.stdout

    version = run("sftpauth", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("sftpauth ")

    # configspec.ini is read from the installed package.
    config = tmp_path / "check.ini"
    config.write_text("[services/ftp]\ntype = ftp\nport = 2121\n", encoding="utf-8")
    checked = run("sftpauth", "check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "service ftp: ftp on 127.0.0.1:2121" in checked.stdout


def test_a_port_in_use_on_ipv6_is_written_in_brackets():
    """QA, session 26: the start-up error said ``cannot listen on ::1:2121``."""
    import errno

    from twisted.internet.error import CannotListenError

    from sftpauth.config.loader import parse_configuration
    from sftpauth.tap import cannot_listen_problem

    text = "[services/ftp]\ntype = ftp\naddress = ::1\nport = 2121\n"
    configuration = parse_configuration(text, "/etc/sftpauth/sftpauth.ini", "/etc/sftpauth", {})
    error = CannotListenError("::1", 2121, OSError(errno.EADDRINUSE, "Address already in use"))
    problem = cannot_listen_problem(configuration, error)
    assert (problem.section, problem.option, problem.line) == ("services/ftp", "port", 4)
    assert problem.message == (
        "cannot listen on [::1]:2121: Address already in use (another program, or another sftpauth, already listens there)"
    )
