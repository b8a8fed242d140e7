"""run: a cron job wrapped like chronic, with timeout, retries, lock, breaker, metrics and alerts; and the
job check that watches it. Real subprocesses throughout."""

import fcntl
import os
import select
import signal
import subprocess
import sys
import unittest

import metasystem_monitor as mm

from .servers import HTTPServer
from .support import SCRIPT, SUBPROCESS_TIMEOUT_S, AlertTestCase, reap, sqlite_rows

T0 = 1_800_000_000.0


class RunCommand(AlertTestCase):
    def setUp(self):
        super().setUp()
        self.write_config("")

    def run_job(self, *args, stdin=b"", env=None):
        return self.run_cli("run", *args, stdin=stdin, env=env or self.cli_env())

    def runs(self, job):
        return sqlite_rows(self.db, "SELECT exit_code, outcome, attempts, ended IS NOT NULL FROM job_runs "
                                    "WHERE job = ? ORDER BY started", (job,))

    def test_silent_on_success_and_every_run_recorded(self):
        result = self.run_job("nightly", "--", sys.executable, "-c", "print('lots of output')")
        self.assertCleanExit(result)
        self.assertEqual(self.runs("nightly"), [(0, "success", 1, 1)])
        self.assertEqual(sqlite_rows(self.db, "SELECT name, value FROM samples JOIN series ON id = series_id "
                                              "WHERE name = 'job_exit_code'"), [("job_exit_code", 0.0)])
        self.assertEqual(sqlite_rows(self.db, "SELECT labels FROM series WHERE name = 'job_duration'"),
                         [('{"job":"nightly"}',)])

    def test_a_failure_prints_a_report_exits_with_the_childs_code_and_alerts(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            failed = self.run_job("backup", "--", "sh", "-c", "echo copying; echo 'disk full' >&2; exit 23")
            again = self.run_job("backup", "--", "sh", "-c", "exit 23")
            fixed = self.run_job("backup", "--", "true")
        self.assertEqual((failed.returncode, again.returncode, fixed.returncode), (23, 23, 0))
        report = failed.stdout.decode().splitlines()
        self.assertRegex(report[0], r"^run backup: failure \(exit 23\) after [0-9.]+ s$")
        self.assertEqual(report[1:], ["command: sh -c 'echo copying; echo '\"'\"'disk full'\"'\"' >&2; exit 23'",
                                      "copying", "disk full"])
        self.assertEqual(fixed.stdout, b"")
        payloads = [r.json() for r in hook.requests]
        self.assertEqual([(p["kind"], p["title"]) for p in payloads],
                         [("firing", "job backup failed"), ("resolved", "job backup failed")])
        self.assertEqual(self.runs("backup"), [(23, "failure", 1, 1), (23, "failure", 1, 1), (0, "success", 1, 1)])

    def test_a_child_that_ignores_sigterm_is_killed_at_the_timeout_with_its_group(self):
        pid_file = os.path.join(self.tmp, "grandchild.pid")
        stubborn = self.write_script("stubborn", f"""
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = __import__('subprocess').Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])
with open({pid_file!r}, 'w') as handle:
    handle.write(str(child.pid))
print('started', flush=True)
time.sleep(60)""")
        result = self.run_job("stuck", "--timeout", "0.5s", "--kill-after", "0.2s", "--", stubborn)
        self.assertEqual(result.returncode, 124)
        lines = result.stdout.decode().splitlines()
        self.assertRegex(lines[0], r"^run stuck: timeout \(exit 124\) after [0-9.]+ s$")
        self.assertEqual(lines[2:], ["started", "[metasystem: timed out after 0.5 s; the process group was stopped]"])
        with open(pid_file, encoding="utf-8") as handle:
            grandchild = int(handle.read())
        self.assertFalse(_alive(grandchild), "the grandchild outlived the timeout")
        self.assertEqual(self.runs("stuck"), [(124, "timeout", 1, 1)])

    def test_a_run_is_skipped_while_another_holds_the_lock(self):
        folder = os.path.join(self.tmp, "locks")
        os.makedirs(folder)
        with open(os.path.join(folder, "sync.lock"), "a+b") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            skipped = self.run_job("sync", "--lock", "--", "sh", "-c", "touch ran")
        ran = self.run_job("sync", "--lock", "--", "true")
        self.assertEqual((skipped.returncode, skipped.stdout), (0, b""))
        self.assertEqual(skipped.stderr.decode(),
                         "metasystem_monitor.py: warning: run sync: skipped: another run of it still holds its lock\n")
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "ran")))
        self.assertCleanExit(ran)
        self.assertEqual(self.runs("sync"), [(None, "skipped", 0, 1), (0, "success", 1, 1)])

    def test_exit_75_is_retried_with_backoff(self):
        counter = os.path.join(self.tmp, "tries")
        flaky = self.write_script("flaky", f"""
tries = 1
if os.path.exists({counter!r}):
    with open({counter!r}) as handle:
        tries = int(handle.read()) + 1
with open({counter!r}, 'w') as handle:
    handle.write(str(tries))
print('try', tries)
sys.exit(75 if tries < 2 else 0)""")
        result = self.run_job("fetch", "--retries", "2", "--", flaky)
        self.assertCleanExit(result)
        self.assertEqual(self.runs("fetch"), [(0, "success", 2, 1)])

    def test_exit_1_is_not_retried(self):
        result = self.run_job("fetch", "--retries", "3", "--", "sh", "-c", "exit 1")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(self.runs("fetch"), [(1, "failure", 1, 1)])

    def test_only_the_last_10000_bytes_of_output_are_kept_and_the_cut_is_said(self):
        result = self.run_job("chatty", "--", sys.executable, "-c",
                              "import sys; sys.stdout.write('a' * 15000 + 'b' * 10000); sys.exit(2)")
        self.assertEqual(result.returncode, 2)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(lines[2:], ["[... 15000 earlier bytes of output cut; the last 10000 follow ...]", "b" * 10000])
        self.assertEqual(sqlite_rows(self.db, "SELECT length(output), cut_bytes FROM job_runs"), [(10000, 15000)])

    def test_stdin_and_environment_pass_through(self):
        out = os.path.join(self.tmp, "seen")
        echo = self.write_script("echo", f"with open({out!r}, 'w') as handle:\n"
                                   f"    handle.write(sys.stdin.read() + os.environ['JOB_SETTING'])")
        result = self.run_job("pipe", "--", echo, stdin=b"from stdin;", env=self.cli_env(JOB_SETTING="from env"))
        self.assertCleanExit(result)
        with open(out, encoding="utf-8") as handle:
            self.assertEqual(handle.read(), "from stdin;from env")

    def start_and_signal(self, signum, code):
        """Start a job that reports the signal it gets, send ``signum`` to run, return run's output."""
        fifo = os.path.join(self.tmp, "ready")
        os.mkfifo(fifo)
        job = self.write_script("graceful", f"""
def stop(signum, frame):
    print('got', signal.Signals(signum).name, flush=True)
    sys.exit({code})
signal.signal(signal.{signum.name}, stop)
with open({fifo!r}, 'w') as ready:
    ready.write('ready')
time.sleep(60)""")
        process = subprocess.Popen([sys.executable, SCRIPT, "run", "svc", "--", job], env=self.cli_env(),
                                   cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(reap, process)
        with open(fifo, encoding="utf-8") as ready:  # blocks until the job is running
            readable, _, _ = select.select([ready], [], [], SUBPROCESS_TIMEOUT_S)
            self.assertEqual(ready.read(), "ready")
        # While it runs, its row is there without an end: the job check sees a run in progress.
        self.assertEqual(sqlite_rows(self.db, "SELECT job, outcome, ended FROM job_runs"), [("svc", "running", None)])
        process.send_signal(signum)
        out, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual(process.returncode, code)
        return out.decode().splitlines()[2:]

    def test_sigterm_to_run_reaches_the_job(self):
        self.assertEqual(self.start_and_signal(signal.SIGTERM, 143), ["got SIGTERM"])

    def test_sigint_to_run_reaches_the_job(self):
        self.assertEqual(self.start_and_signal(signal.SIGINT, 130), ["got SIGINT"])

    def test_an_open_breaker_fails_fast(self):
        with mm.MetricsCollector(self.db) as collector:
            breaker = mm.CircuitBreaker("nas", failure_threshold=1, open_duration=3600, collector=collector)
            with self.assertRaises(OSError):
                breaker.call(_fail)
        result = self.run_job("copy", "--breaker", "nas", "--", "sh", "-c", "touch ran")
        self.assertEqual(result.returncode, 75)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "ran")))
        self.assertIn("circuit breaker 'nas' is open for", result.stdout.decode())
        self.assertEqual(self.runs("copy"), [(None, "breaker_open", 1, 1)])

    def test_failures_through_a_breaker_open_it(self):
        for _ in range(3):
            self.run_job("copy", "--breaker", "nas", "--", "false")
        self.assertEqual(self.run_job("copy", "--breaker", "nas", "--", "true").returncode, 75)

    def test_usage_errors(self):
        self.assertOneLineError(self.run_job("x"), 2, "run needs a command")
        cases = [(("x", "--"), "run needs a command"),
                 (("x", "--retries", "-1", "--", "true"), "--retries must be 0 or more"),
                 (("x", "--timeout", "0", "--", "true"), "--timeout must be more than 0"),
                 (("x", "--timeout", "soon", "--", "true"), "'soon' is not a duration")]
        for args, message in cases:  # the same main(), in this process
            with self.subTest(args=args):
                self.assertMainError(2, message, "run", *args)
        self.assertFalse(os.path.exists(self.db))

    def test_a_broken_store_does_not_stop_the_job(self):
        with open(self.db, "wb") as handle:
            handle.write(b"not a database\n" * 50)
        marker = os.path.join(self.tmp, "ran")
        result = self.run_job("backup", "--", "sh", "-c", f"touch {marker}; echo done; exit 4")
        self.assertEqual(result.returncode, 4)
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(result.stderr.decode().splitlines(), [
            f"metasystem_monitor.py: warning: store {self.db} is not a SQLite database: this run of backup was not "
            "recorded",  # and, no channel but the log configured, the alert itself
            f"metasystem_monitor.py: critical: [CRITICAL] job backup failed | run backup: failure (exit 4) after 0.0 s "
            f"command: sh -c 'touch {marker}; echo done; exit 4' done"])
        self.assertEqual(result.stdout.decode().splitlines()[2:], ["done"])
        with open(self.db, "rb") as handle:
            self.assertEqual(handle.read(), b"not a database\n" * 50)


class JobRunRetention(AlertTestCase):
    def test_cleanup_drops_old_runs_but_keeps_each_jobs_last(self):
        self.write_config("")
        day = 86400
        for job, when in (("hourly", T0 - 40 * day), ("hourly", T0 - 39 * day), ("hourly", T0 - day),
                          ("weekly", T0 - 40 * day)):
            self.run_cli("run", job, "--", "true", env=self.cli_env(METASYSTEM_NOW=repr(when)))
        with mm.MetricsCollector(self.db, now=lambda: T0) as collector:
            # The last run's own daily upkeep, at T0 - 1 day by its clock, already dropped the two.
            self.assertEqual(collector.cleanup()["deleted_job_runs"], 0)
        self.assertEqual(sqlite_rows(self.db, "SELECT job, started FROM job_runs ORDER BY job, started"),
                         [("hourly", T0 - day), ("weekly", T0 - 40 * day)])


class JobCheck(AlertTestCase):
    """The job check reads what run recorded."""

    def run_at(self, when, *args):
        return self.run_cli(*args, env=self.cli_env(METASYSTEM_NOW=repr(when)))

    def test_late_failed_too_long_and_skipped(self):
        self.write_config("[check:backup]\ntype = job\njob = backup\nexpected_every = 1d\nmax_duration = 1h\n"
                          "min_duration = 0s\n")
        never = self.run_at(T0, "check", "--no-alert")
        self.run_at(T0, "run", "backup", "--", "true")
        fresh = self.run_at(T0 + 3600, "check", "--no-alert")
        late = self.run_at(T0 + 2 * 86400, "check", "--no-alert")
        self.run_at(T0 + 2 * 86400, "run", "backup", "--", "false")
        failed = self.run_at(T0 + 2 * 86400 + 60, "check", "--no-alert")
        self.assertEqual(never.stdout.decode().splitlines()[1], "CRITICAL backup: job backup: no run recorded")
        self.assertEqual(fresh.returncode, 0)
        self.assertRegex(fresh.stdout.decode().splitlines()[1], r"^OK backup: job backup: last run 1h ago, exit 0 in ")
        self.assertEqual(late.stdout.decode().splitlines()[1],
                         "CRITICAL backup: job backup: late: last started 2d ago, expected every 1d")
        self.assertEqual(failed.stdout.decode().splitlines()[1],
                         "CRITICAL backup: job backup: the last run failed (failure, exit 1)")
        self.assertEqual([r.returncode for r in (never, late, failed)], [2, 2, 2])

    def test_too_long_too_fast_still_running_and_skipped(self):
        self.write_config("[check:sync]\ntype = job\njob = sync\nmax_duration = 10m\nmin_duration = 5s\n")
        rows = [("a", T0, T0 + 1200, 0, "success"), ("b", T0 + 3600, T0 + 3601, 0, "success"),
                ("c", T0 + 7200, None, None, "running"), ("d", T0 + 9000, T0 + 9000, None, "skipped")]
        checks = []
        for count in range(1, 5):
            with mm.Store(self.db) as store, store.write() as conn:
                conn.execute("DELETE FROM job_runs")
                conn.executemany("INSERT INTO job_runs VALUES (?, 'sync', ?, ?, ?, ?, 1, x'', 0)", rows[:count])
            checks.append(self.run_at(rows[count - 1][1] + 1800, "check", "--no-alert"))
        self.assertEqual([c.stdout.decode().splitlines()[1] for c in checks], [
            "WARNING sync: job sync: took 20m, longer than 10m",
            "WARNING sync: job sync: took 1s, less than 5s",
            "CRITICAL sync: job sync: running for 30m, longer than 10m; took 1s, less than 5s",
            "CRITICAL sync: job sync: running for 1h, longer than 10m; the last run was skipped: the one before "
            "was still going; took 1s, less than 5s",
        ])

    def test_a_run_killed_long_ago_is_superseded_by_the_next_one_that_ran(self):
        self.write_config("[check:sync]\ntype = job\njob = sync\nmax_duration = 10m\n")
        with mm.Store(self.db) as store, store.write() as conn:
            conn.executemany("INSERT INTO job_runs VALUES (?, 'sync', ?, ?, ?, ?, 1, x'', 0)",
                             [("killed", T0, None, None, "running"), ("next", T0 + 3600, T0 + 3660, 0, "success")])
        result = self.run_at(T0 + 7200, "check", "--no-alert")
        self.assertEqual(result.stdout.decode().splitlines()[1],
                         "OK sync: job sync: last run 1h ago, exit 0 in 1m")


def _fail():
    raise OSError("nas unreachable")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie left for init to reap counts as gone
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return True


if __name__ == "__main__":
    unittest.main()
