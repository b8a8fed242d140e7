"""Shared helpers for the tests: temporary stores, a fake clock, running the CLI."""

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import metasystem_monitor as mm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "metasystem_monitor.py")
SUBPROCESS_TIMEOUT_S = 120
_ENV_KEYS = ("METASYSTEM_DB", "METASYSTEM_HOME", "METASYSTEM_CONFIG")
# Mount the folder in $1 read-only in a private mount namespace, then run the rest.
_READONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'


REAL_SLEEP = time.sleep


def forbid_real_sleep():
    """(setUpModule, tearDownModule) that make time.sleep raise for a whole test module."""
    real_sleep = time.sleep

    def no_sleeping(seconds):
        if sys._getframe(1).f_globals.get("__name__") == "subprocess":
            # Popen.wait(timeout=...) polls with short sleeps when a child closed its pipes but has not
            # exited yet: the standard library waiting on a real process, not the code under test.
            return real_sleep(seconds)
        raise AssertionError(f"time.sleep({seconds}) was called in a test")

    def forbid():
        time.sleep = no_sleeping

    def allow():
        time.sleep = real_sleep

    return forbid, allow


class FakeClock:
    """A clock that moves only when told: time() for wall time, sleep() advances it."""

    def __init__(self, start=1_800_000_000.0):
        self.now = float(start)
        self.slept = []

    def time(self):
        return self.now

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds

    def advance(self, seconds):
        self.now += seconds


class StoreTestCase(unittest.TestCase):
    """A temporary folder per test, with the environment pointed at it."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="mm-test-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.db = os.path.join(self.tmp, "metrics.db")
        saved = {key: os.environ.get(key) for key in _ENV_KEYS}
        self.addCleanup(_restore_environ, saved)
        for key in _ENV_KEYS:
            os.environ.pop(key, None)
        os.environ["METASYSTEM_HOME"] = os.path.join(self.tmp, "home")

    def collector(self, clock=None, **kwargs):
        """A collector on this test's store, closed at the end of the test."""
        if clock is not None:
            kwargs.setdefault("now", clock.time)
            kwargs.setdefault("clock", clock.monotonic)
        collector = mm.MetricsCollector(kwargs.pop("db_path", self.db), **kwargs)
        self.addCleanup(collector.close)
        return collector

    def child_env(self, **extra):
        """The environment of a CLI subprocess: isolated HOME and store folder."""
        env = {key: value for key, value in os.environ.items() if key not in _ENV_KEYS}
        env.update(HOME=self.tmp, METASYSTEM_HOME=os.path.join(self.tmp, "home"), PYTHONPATH=REPO)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # run_cli's children share the module's cached bytecode
        env.update(extra)
        return env

    def run_cli(self, *args, stdin=b"", env=None, timeout=SUBPROCESS_TIMEOUT_S, prefix=(), module="metasystem_monitor"):
        """Run the command line in a subprocess; return the CompletedProcess.

        As ``python3 -m metasystem_monitor``: the same main() as the script, from cached bytecode, so
        hundreds of runs do not each compile the file. The tests that start processes together run
        the script itself.
        """
        return subprocess.run(
            [*prefix, sys.executable, "-m", module, *args],
            input=stdin,
            capture_output=True,
            env=self.child_env() if env is None else env,
            cwd=self.tmp,
            timeout=timeout,
        )

    def run_main(self, *args, stdin=b""):
        """Run main() in this process; return (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        saved_stdin = sys.stdin
        sys.stdin = fake_stdin
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = mm.main(list(args))
        finally:
            sys.stdin = saved_stdin
        return code, out.getvalue(), err.getvalue()

    def run_cli_in_readonly_folder(self, folder, *args, module="metasystem_monitor"):
        """Run the CLI (or the dashboard, ``module="monitoring_dashboard"``) while ``folder`` cannot be
        written, even by root."""
        if os.geteuid() != 0:
            mode = os.stat(folder).st_mode
            os.chmod(folder, 0o555)
            try:
                return self.run_cli(*args, module=module)
            finally:
                os.chmod(folder, mode)
        unshare = shutil.which("unshare")
        if unshare is None:
            self.skipTest("running as root without unshare(1): no way to make a folder read-only")
        probe = subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            self.skipTest("running as root where unshare -m is not permitted")
        return self.run_cli(*args, prefix=(unshare, "-m", "sh", "-c", _READONLY_MOUNT, "sh", folder), module=module)

    def write_script(self, name, body):
        """An executable Python script in the test's folder (os, signal, sys and time imported); its path."""
        import stat

        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"#!{sys.executable}\nimport os, signal, sys, time\n{body}\n")
        os.chmod(path, stat.S_IRWXU)
        return path

    def assertCleanExit(self, result, code=0, stdout=b""):
        """Exit code and exact stdout, and nothing on stderr."""
        self.assertEqual((result.returncode, result.stderr.decode()), (code, ""))
        if stdout is not None:
            self.assertEqual(result.stdout.decode(), stdout if isinstance(stdout, str) else stdout.decode())

    def assertMainError(self, code, fragment, *args, stdin=b""):
        """assertOneLineError for main() run in this process: the same checks, without a process to start."""
        status, out, err = self.run_main(*args, stdin=stdin)
        self.assertEqual((status, out, len(err.splitlines())), (code, "", 1), err)
        self.assertTrue(err.startswith("metasystem_monitor.py"), err)
        self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)

    def assertOneLineError(self, result, code, fragment):
        """Exit ``code``, nothing on stdout, one stderr line naming ``fragment``, no traceback."""
        err = result.stderr.decode()
        self.assertEqual(result.returncode, code, err)
        self.assertEqual(result.stdout, b"")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("metasystem_monitor.py"), err)
        self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)


def _restore_environ(saved):
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def reap(process):
    """Kill a test's child process if it still runs, and wait for it (bounded)."""
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=SUBPROCESS_TIMEOUT_S)


def sqlite_rows(path, sql, params=()):
    """Read a store with a plain sqlite3 connection, independent of the module."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def strict_json(text):
    """json.loads that refuses Infinity, -Infinity and NaN, as every other JSON reader does."""
    import json

    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def file_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


class _ListHandler(logging.Handler):
    """Keeps "LEVEL message" of each record: what the tests assert on, and nothing printed."""

    def __init__(self, lines):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


class AlertTestCase(StoreTestCase):
    """A store, a fake clock, and a syslog socket that the log channel writes to."""

    def setUp(self):
        super().setUp()
        from .servers import SyslogSocket

        self.clock = FakeClock()
        self.syslog_path = os.path.join(self.tmp, "log.sock")
        self.syslog = SyslogSocket(self.syslog_path)
        self.addCleanup(self.syslog.__exit__)
        self.config_path = os.path.join(self.tmp, "alerting-config.ini")
        self.logged = []
        handler = _ListHandler(self.logged)
        logger = logging.getLogger("metasystem")
        saved_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self.addCleanup(logger.setLevel, saved_level)
        self.addCleanup(logger.removeHandler, handler)

    def write_config(self, text="", mode=0o600, log_channel=True):
        """The INI file of this test (the log channel pointed at the test's syslog socket); its path."""
        head = f"[channel:log]\ntype = log\naddress = {self.syslog_path}\n\n" if log_channel else ""
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(head + text)
        os.chmod(self.config_path, mode)
        return self.config_path

    def system(self, text="", **kwargs):
        """An AlertingSystem on this test's store, clock and configuration, closed at the end."""
        import random

        self.write_config(text)
        kwargs.setdefault("now", self.clock.time)
        kwargs.setdefault("clock", self.clock.monotonic)
        kwargs.setdefault("sleep", self.clock.sleep)
        kwargs.setdefault("rng", random.Random(7))
        system = mm.AlertingSystem(self.config_path, db_path=self.db, **kwargs)
        self.addCleanup(system.close)
        return system

    def cli_env(self, **extra):
        return self.child_env(METASYSTEM_CONFIG=self.config_path, METASYSTEM_DB=self.db, **extra)
