"""Faults: a full disk, a read-only store, broken files, a lock held too long, signals, kill -9.

Real subprocesses on temporary stores, each bounded in time. After every fault, nothing already
stored is lost, the store passes quick_check, and the command said what happened in one line.
"""

import contextlib
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time

import metasystem_monitor as mm

from .servers import HTTPServer, SyslogSocket
from .support import SUBPROCESS_TIMEOUT_S, StoreTestCase, file_bytes, reap, sqlite_rows

# Runs argv[2:] with writes limited to argv[1] bytes per file: a disk that is full for this process. It
# writes no bytecode: CPython's .pyc writer takes a short write for a whole one and renames a truncated
# file into __pycache__, which every later import then fails to read.
LIMITED = ("import os, resource, signal, sys; limit = int(sys.argv[1]); "
           "os.environ['PYTHONDONTWRITEBYTECODE'] = '1'; "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
           "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); os.execv(sys.argv[2], sys.argv[2:])")
SAMPLES = "SELECT name, labels, ts, seq, value FROM samples JOIN series ON id = series_id ORDER BY 1, 2, 3, 4"


class FaultTestCase(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.syslog = SyslogSocket(os.path.join(self.tmp, "log.sock"))
        self.addCleanup(self.syslog.__exit__)
        self.config = os.path.join(self.tmp, "alerting-config.ini")
        with open(self.config, "w", encoding="utf-8") as handle:
            handle.write(f"[channel:log]\ntype = log\naddress = {self.syslog.path}\n")
        os.chmod(self.config, 0o600)
        with mm.MetricsCollector(self.db) as metrics:
            for i in range(50):
                metrics.record_sync_metric("icloud", i % 4 != 0, 2.0 + i / 100, timestamp=time.time() - 4000 * 3600
                                           + i * 60)
            metrics.record("kept", 1.0)
        self.before = sqlite_rows(self.db, SAMPLES)

    def cli(self, *args, stdin=b"", prefix=(), env=None):
        env = env or self.child_env(METASYSTEM_CONFIG=self.config, METASYSTEM_DB=self.db)
        return subprocess.run([*prefix, sys.executable, "-m", "metasystem_monitor", *args], input=stdin,
                              capture_output=True, env=env, cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)

    def assertOneLine(self, result, code, fragment):
        err = result.stderr.decode()
        self.assertEqual((result.returncode, len(err.splitlines())), (code, 1), err + result.stdout.decode())
        self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)

    def assertIntact(self, extra=()):
        self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
        rows = sqlite_rows(self.db, SAMPLES)
        self.assertEqual([row for row in rows if row not in extra], self.before)


class FullDiskTest(FaultTestCase):
    """RLIMIT_FSIZE: every write that would grow a file fails with EFBIG, as on a full disk."""

    def setUp(self):
        super().setUp()
        # A connection held open keeps the WAL and its index in place, empty: the command's first
        # write is the one that must grow a file.
        self.keeper = sqlite3.connect(self.db)
        self.addCleanup(self.keeper.close)
        self.keeper.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def full(self, *args, stdin=b""):
        return self.cli(*args, stdin=stdin, prefix=(sys.executable, "-c", LIMITED, "1024"))

    def test_every_writing_command_fails_in_one_line_and_loses_nothing(self):
        full = "cannot be written: "  # the disk is full, or (EFBIG) a disk I/O error
        self.assertOneLine(self.full("record", "x", "1"), 1, full)
        self.assertOneLine(self.full("record", "-", stdin=b"a 1\nb 2\nc 3\n"), 1, full)
        self.assertOneLine(self.full("cleanup"), 1, full)
        self.assertOneLine(self.full("record-sync", "icloud", "--success", "--duration", "1"), 1, full)
        with HTTPServer() as hook:
            with open(self.config, "a", encoding="utf-8") as handle:
                handle.write(f"[channel:hook]\ntype = webhook\nurl = {hook.url('/hook')}\n")
            alert = self.full("alert", "--critical", "disk full")
        self.assertOneLine(alert, 1, full)
        self.assertEqual([request.json()["title"] for request in hook.requests], ["disk full"])  # sent all the same
        checked = self.full("check", "--only", "database", "--no-alert")
        self.assertOneLine(checked, 0, "the check results were not recorded")
        self.assertTrue(checked.stdout.startswith(b"METASYSTEM OK - 1 check OK | "), checked.stdout)
        self.keeper.close()
        self.assertIntact()
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alerts"), [(0,)])


class ReadOnlyTest(FaultTestCase):
    """A store in a folder nobody may write: reading works, writing fails in one line."""

    def test_reading_commands_work_and_writing_ones_fail(self):
        folder = os.path.dirname(self.db)
        for args in (("stats", "sync_icloud_success", "--hours", "5000", "--json"),
                     ("anomalies", "sync_icloud_success", "--hours", "5000", "--json"), ("export",)):
            with self.subTest(args=args):
                result = self.run_cli_in_readonly_folder(folder, "--db", self.db, *args)
                self.assertEqual((result.returncode, result.stderr), (0, b""))
        stats = json.loads(self.run_cli_in_readonly_folder(folder, "--db", self.db, "stats", "sync_icloud_success",
                                                           "--hours", "5000", "--json").stdout)
        self.assertEqual(stats["count"], 37)
        summary = self.run_cli_in_readonly_folder(folder, "--db", self.db, "--summary", module="monitoring_dashboard")
        self.assertEqual((summary.returncode, summary.stderr), (0, b""))
        self.assertIn("icloud", json.loads(summary.stdout)["sync"])
        self.assertOneLineError(self.run_cli_in_readonly_folder(folder, "--db", self.db, "record", "x", "1"), 1,
                                "metasystem_monitor.py: error: store ")
        self.assertIntact()


class BrokenFilesTest(FaultTestCase):
    """Not a database, cut short, or from a newer version: a clear error, and the file left as it was."""

    def broken(self, kind):
        if kind == "truncated":
            with open(self.db, "r+b") as handle:
                handle.truncate(os.path.getsize(self.db) // 3)
        elif kind == "not a database":
            with open(self.db, "wb") as handle:
                handle.write(b"this is a text file, not a store\n" * 200)
        else:
            conn = sqlite3.connect(self.db)
            conn.execute(f"PRAGMA user_version = {mm.SCHEMA_VERSION + 1}")
            conn.commit()
            conn.close()
        return file_bytes(self.db)

    def test_each_kind_is_refused_unchanged_and_check_says_critical(self):
        for kind, message in (("truncated", "is damaged"), ("not a database", "is not a SQLite database"),
                              ("newer", "was written by a newer version")):
            with self.subTest(kind=kind):
                self.setUp_store_again()
                before = self.broken(kind)
                self.assertOneLine(self.cli("record", "x", "1"), 1, message)
                self.assertOneLine(self.cli("stats", "x"), 1, message)
                checked = self.cli("check", "--no-alert")
                self.assertEqual(checked.returncode, 2, checked.stdout)
                self.assertIn(message, checked.stdout.decode().splitlines()[0])
                self.assertTrue(checked.stdout.startswith(b"METASYSTEM CRITICAL - database CRITICAL: "), checked.stdout)
                self.assertEqual(file_bytes(self.db), before)

    def setUp_store_again(self):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.db + suffix):
                os.unlink(self.db + suffix)
        with mm.MetricsCollector(self.db) as metrics:
            for i in range(2000):
                metrics.record(f"m{i % 7}", float(i), timestamp=time.time() - i)


class RunWithoutStoreTest(FaultTestCase):
    """run when the store cannot be written: the job's code, its report, its alert; one line about the store."""

    def setUp(self):
        super().setUp()
        self.hook = HTTPServer()
        self.hook.__enter__()
        self.addCleanup(self.hook.__exit__)
        with open(self.config, "a", encoding="utf-8") as handle:
            handle.write(f"[channel:hook]\ntype = webhook\nurl = {self.hook.url('/hook')}\n"
                         "[storage]\nbusy_timeout = 0.5s\n")

    def assertReportedAndAlerted(self, code, out, err, fragment):
        self.assertEqual(code, 3, err)
        self.assertEqual(out.decode().splitlines()[:2], [out.decode().splitlines()[0], "command: " + self.job])
        self.assertTrue(out.startswith(b"run nightly: failure (exit 3) after "), out)
        self.assertIn(b"\nbackup: no space left\n", out)  # the tail of its output
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(fragment, lines[0])
        self.assertIn("this run of nightly was not recorded", lines[0])
        self.assertEqual([request.json()["title"] for request in self.hook.requests], ["job nightly failed"])

    def test_a_full_disk_keeps_the_jobs_code_report_and_alert(self):
        self.job = self.write_script("job.py", "print('backup: no space left'); sys.exit(3)")
        result = self.cli("run", "nightly", "--", self.job, prefix=(sys.executable, "-c", LIMITED, "1024"))
        self.assertReportedAndAlerted(result.returncode, result.stdout, result.stderr, "cannot be written: ")
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM job_runs"), [(0,)])

    def test_a_lock_held_past_the_busy_timeout_at_the_end_leaves_a_row_the_next_run_repairs(self):
        started, proceed = os.path.join(self.tmp, "started"), os.path.join(self.tmp, "proceed")
        os.mkfifo(started)
        os.mkfifo(proceed)
        self.job = self.write_script("job.py", f"open({started!r}, 'w').close()\nwith open({proceed!r}) as wait:\n    wait.read()\n"
                                               "print('backup: no space left'); sys.exit(3)")
        process = subprocess.Popen([sys.executable, "-m", "metasystem_monitor", "run", "nightly", "--", self.job],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.tmp,
                                   env=self.child_env(METASYSTEM_CONFIG=self.config, METASYSTEM_DB=self.db))
        self.addCleanup(reap, process)
        with open(started, encoding="utf-8") as handle:  # the run has its row; the job waits
            handle.read()
        holder = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")  # held until the run has given up on it
        with open(proceed, "w", encoding="utf-8"):
            pass
        out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        holder.execute("ROLLBACK")
        self.assertReportedAndAlerted(process.returncode, out, err, "is locked by another process")
        self.assertEqual(sqlite_rows(self.db, "SELECT outcome, ended FROM job_runs"), [("running", None)])
        again = self.cli("run", "nightly", "--", sys.executable, "-c", "pass")
        self.assertEqual((again.returncode, again.stderr), (0, b""))
        self.assertEqual(sqlite_rows(self.db, "SELECT outcome, ended = started FROM job_runs ORDER BY started"),
                         [("unrecorded", 1), ("success", 0)])


class LockTest(FaultTestCase):
    """Another program holds a write transaction past the busy timeout: each waiting command says so."""

    def test_waiting_commands_give_up_after_the_busy_timeout_in_one_line(self):
        with open(self.config, "a", encoding="utf-8") as handle:
            handle.write("\n[storage]\nbusy_timeout = 0.5s\n")
        holder = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO meta VALUES ('held', '1')")
        started = time.monotonic()
        waiting = [subprocess.Popen([sys.executable, "-m", "metasystem_monitor", *args], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.tmp,
                                    env=self.child_env(METASYSTEM_CONFIG=self.config, METASYSTEM_DB=self.db))
                   for args in (("record", "x", "1"), ("record", "-"), ("cleanup",), ("silence", "add", "--match",
                                                                                       "x", "--for", "1h"))]
        for process in waiting:  # all of them waiting at once
            self.addCleanup(reap, process)
            process.stdin.write(b"y 2\n")
            process.stdin.close()
            process.stdin = None  # given: nothing more to send
        results = []
        for process in waiting:
            out, err = process.stdout.read(), process.stderr.read()
            results.append((process.wait(SUBPROCESS_TIMEOUT_S), out, err))
        waited = time.monotonic() - started
        holder.execute("ROLLBACK")
        for code, out, err in results:
            self.assertEqual((code, out, len(err.splitlines())), (1, b"", 1), err)
            self.assertIn(b"is locked by another process (gave up after 0.5 s)", err)
        self.assertGreaterEqual(waited, 0.5)
        self.assertIntact()


class SignalsTest(FaultTestCase):
    """SIGTERM and SIGINT: a clean exit, the transaction whole or absent."""

    def test_record_from_stdin_interrupted_stores_all_or_nothing(self):
        # SIGTERM ends the process as its default does; SIGINT is caught: exit 130, one line.
        for signum, code in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)):
            with self.subTest(signal=signum.name):
                process = subprocess.Popen([sys.executable, "-m", "metasystem_monitor", "--db", self.db, "record",
                                            "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, cwd=self.tmp, env=self.child_env())
                self.addCleanup(reap, process)
                # More than a pipe holds: when the write returns, the command is reading, mid-input; the
                # rest never comes.
                process.stdin.write(b"".join(b"streamed_%d %d\n" % (i, i) for i in range(20_000)))
                process.stdin.flush()
                process.send_signal(signum)
                out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
                self.assertEqual(process.returncode, code, err)
                self.assertNotIn(b"Traceback", err)
                self.assertLessEqual(len(err.splitlines()), 1, err)
                self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM series WHERE name LIKE 'streamed%'"),
                                 [(0,)])
                self.assertIntact()


# One warm interpreter forks every process of a round (a fork costs milliseconds, a new interpreter
# tens of them): "ROLE FIFO ARGS..." on stdin starts ROLE with its stdout on FIFO and answers its pid.
LAUNCHER = """
import os, signal, sys
import metasystem_monitor as mm

def writer(db, name):
    with mm.MetricsCollector(db) as metrics:
        for i in range(10 ** 9):
            metrics.record(name, float(i))
            print(i, flush=True)

def cleaner(db):
    with mm.MetricsCollector(db) as metrics:
        while True:
            metrics.cleanup()
            print("cleaned", flush=True)

def sender(db, config, count):
    with mm.AlertingSystem(config, db_path=db) as alerts:
        for i in range(int(count)):
            report = alerts.send_warning_alert(f"alert {i}", "kill -9 round")
            print(i, report["hook"], flush=True)

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped by the kernel
for line in sys.stdin:
    role, fifo, *args = line.split()
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(fifo, os.O_WRONLY), 1)
        sys.stdout = os.fdopen(1, "w")
        try:
            globals()[role](*args)
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


class KillNineTest(FaultTestCase):
    """20 rounds of kill -9 at random moments while 4 writers, a cleanup and an alert sender run."""

    ROUNDS = 20
    ALERTS = 6

    def setUp(self):
        super().setUp()
        # Its children's diagnostics (the log channel's lines among them) go to a file, not into the test's output.
        errors = open(os.path.join(self.tmp, "launcher.err"), "wb")
        self.addCleanup(errors.close)
        self.launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=errors, cwd=self.tmp, env=self.child_env())
        self.addCleanup(self.stop_launcher)

    def stop_launcher(self):
        self.launcher.stdin.close()  # its end of input: it exits
        self.launcher.stdin = None
        reap(self.launcher)

    def start(self, role, name, *args):
        """(pid, fd of its output) of ROLE, forked by the launcher."""
        fifo = os.path.join(self.tmp, f"{name}.fifo")
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.launcher.stdin.write(" ".join((role, fifo, *args)).encode() + b"\n")
        self.launcher.stdin.flush()
        return int(self.launcher.stdout.readline()), fd

    def test_nothing_returned_is_lost_and_no_alert_goes_twice(self):
        rng = random.Random(7)
        with HTTPServer() as hook:
            with open(self.config, "w", encoding="utf-8") as handle:
                handle.write(f"[channel:hook]\ntype = webhook\nurl = {hook.url('/hook')}\n")
            committed = {f"w{n}": set() for n in range(4)}
            for round_number in range(self.ROUNDS):
                started = {name: self.start("writer", f"{name}_r{round_number}", self.db, f"{name}_r{round_number}")
                           for name in committed}
                started["cleanup"] = self.start("cleaner", f"cleanup_r{round_number}", self.db)
                started["alerts"] = self.start("sender", f"alerts_r{round_number}", self.db, self.config,
                                               str(self.ALERTS))
                wanted = {name: rng.randint(1, 40) for name in committed}
                wanted.update(cleanup=rng.randint(1, 3), alerts=rng.randint(0, self.ALERTS))
                output = self.until_enough(started, wanted)
                for pid, _ in started.values():  # kill -9, all at once
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                for name, (_, fd) in started.items():
                    output[name] += self.drain(fd)
                    if name in committed:  # a line cut short by the kill does not count as returned
                        committed[name] |= {(f"{name}_r{round_number}", float(line))
                                            for line in output[name].split(b"\n")[:-1] if line.isdigit()}
            self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
            stored = set(sqlite_rows(self.db, "SELECT name, value FROM samples JOIN series ON id = series_id "
                                              "WHERE name LIKE 'w%'"))
            for name, returned in committed.items():
                lost = sorted(returned - stored)
                self.assertEqual(lost[:10], [], f"{name}: {len(lost)} of {len(returned)} returned samples are gone")
            self.assertGreater(sum(map(len, committed.values())), self.ROUNDS * 4)
            titles = [request.json()["title"] for request in hook.requests]
            self.assertEqual(len(titles), len(set(titles)), sorted(titles))

    def until_enough(self, started, wanted):
        """Read each one's output until it has said ``wanted`` lines (or ended)."""
        output = {name: b"" for name in started}
        open_fds = {fd: name for name, (_, fd) in started.items()}
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while any(output[name].count(b"\n") < wanted[name] for name in open_fds.values()):
            readable, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
            self.assertTrue(readable, "the processes stopped answering")
            for fd in readable:
                chunk = os.read(fd, 65536)
                if chunk:
                    output[open_fds[fd]] += chunk
                else:
                    del open_fds[fd]
        return output

    def drain(self, fd):
        """What is left of a killed process's output: everything up to its end."""
        rest = b""
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while time.monotonic() < deadline:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            rest += chunk
        os.close(fd)
        return rest
