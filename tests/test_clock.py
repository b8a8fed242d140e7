"""One clock, chosen once in main(): every subcommand takes its time from METASYSTEM_NOW when it is set.

The instant is in 2030, years after any real clock this suite meets, so a command that read the real
clock instead would write the wrong time, or see the samples of 2030 as the future (and hide them).
The table below names every subcommand; a new one fails here until it says how it honours the clock.
"""

import http.client
import json
import os
import signal
import subprocess
import sys

import metasystem_monitor as mm

from .servers import HTTPServer
from .support import SUBPROCESS_TIMEOUT_S, StoreTestCase, reap, sqlite_rows

T = 1_900_000_000.0  # 2030-03-17T17:46:40Z
HOUR = 3600.0


class EveryCommandTakesTheOneClockTest(StoreTestCase):

    def setUp(self):
        super().setUp()
        os.environ["METASYSTEM_NOW"] = repr(T)
        self.addCleanup(os.environ.pop, "METASYSTEM_NOW", None)
        self.config = os.path.join(self.tmp, "c.ini")
        with open(self.config, "w", encoding="utf-8") as handle:
            handle.write(f"[check:here]\ntype = file_age\npath = {self.config}\n")
        os.chmod(self.config, 0o600)

    def cli(self, *args, code=0):
        status, out, err = self.run_main("--db", self.db, "--config", self.config, *args)
        self.assertEqual(status, code, (args, out, err))
        return out

    def json(self, *args):
        return json.loads(self.cli(*args, "--json"))

    def rows(self, sql):
        return sqlite_rows(self.db, sql)

    def test_each_subcommand(self):
        checks = {
            "record": self.record, "record-sync": self.record_sync, "record-agent": self.record_agent,
            "stats": self.stats, "success-rate": self.success_rate, "anomalies": self.anomalies,
            "cleanup": self.cleanup, "breakers": self.breakers, "breaker": self.breaker_reset,
            "retry-stats": self.retry_stats, "metrics": self.metrics, "alert": self.alert, "check": self.check,
            "run": self.run_job, "silence": self.silence, "alert-test": self.alert_test, "alerts": self.alerts,
            "export": self.export, "serve": self.serve, "push": self.push, "demo": self.demo,
            "config": self.configuration, "help": self.reference, "completion": self.completion,
            "collect": self.collect,
        }
        self.assertEqual(sorted(checks), sorted(entry[0] for entry in mm._COMMANDS))
        for name, check in checks.items():  # in this order: later ones read what earlier ones wrote
            with self.subTest(command=name):
                check()

    def collect(self):
        self.cli("collect")
        self.assertEqual(self.rows("SELECT DISTINCT ts FROM samples JOIN series ON id = series_id "
                                   "WHERE name = 'host_load1'"), [(T,)])

    def reference(self):  # reads no clock: the same text at any time
        self.assertEqual(self.cli("help", "exit-codes").splitlines()[0], "EXIT CODES")

    def completion(self):  # reads no clock either
        self.assertTrue(self.cli("completion", "bash").endswith("complete -F _metasystem_monitor "
                                                                 "metasystem_monitor.py metasystem-monitor\n"))

    def record(self):
        self.cli("record", "x", "5")
        self.assertEqual(self.rows("SELECT ts FROM samples JOIN series ON id = series_id WHERE name = 'x'"), [(T,)])

    def record_sync(self):
        self.cli("record-sync", "icloud", "--success", "--duration", "2")
        self.assertEqual(self.rows("SELECT max(ts) FROM samples JOIN series ON id = series_id "
                                   "WHERE name = 'sync_icloud_success'"), [(T,)])

    def record_agent(self):
        self.cli("record-agent", "bot", "--failure", "--duration", "1")
        self.assertEqual(self.rows("SELECT max(ts) FROM samples JOIN series ON id = series_id "
                                   "WHERE name = 'agent_bot_failure'"), [(T,)])

    def stats(self):
        self.assertEqual(self.json("stats", "x", "--hours", "1")["count"], 1)  # 2030's sample is in the window

    def success_rate(self):
        self.assertEqual(self.json("success-rate", "sync_icloud", "--hours", "1")["attempts"], 1)

    def anomalies(self):
        self.assertEqual(self.json("anomalies", "x", "--hours", "1")["baseline"]["n"], 1)

    def cleanup(self):
        self.cli("record", "old", "1", "--time", repr(T - 40 * 86400))
        self.assertGreaterEqual(self.json("cleanup")["deleted_samples"], 1)  # 40 days old by this clock
        self.assertEqual(self.rows("SELECT count(*) FROM samples WHERE ts < ?".replace("?", repr(T - 30 * 86400))),
                         [(0,)])

    def breakers(self):
        with mm.MetricsCollector(self.db, now=lambda: T - HOUR) as collector:
            breaker = mm.CircuitBreaker("api", failure_threshold=1, window=600, collector=collector,
                                        now=lambda: T - HOUR)
            with self.assertRaises(ZeroDivisionError):
                breaker.call(lambda: 1 / 0)
        [listed] = self.json("breakers")["breakers"]
        self.assertEqual((listed["state"], listed["failures"]), ("open", 0))  # its failure left the window by T

    def breaker_reset(self):
        self.cli("breaker", "reset", "api")
        self.assertEqual(self.rows("SELECT max(ts) FROM breaker_transitions WHERE to_state = 'closed'"), [(T,)])

    def retry_stats(self):
        with mm.MetricsCollector(self.db, now=lambda: T - 60) as collector:
            mm.AdaptiveRetry(mm.RetryConfig(max_attempts=1), collector=collector, now=lambda: T - 60).retry(
                "sync", lambda: "ok")
        self.assertEqual(self.json("retry-stats", "sync", "--hours", "1")["stats"]["calls"], 1)

    def metrics(self):
        listed = {entry["name"]: entry for entry in self.json("metrics")["metrics"]}
        self.assertEqual(listed["x"]["last_time"], mm.iso_time(T))

    def alert(self):
        self.cli("alert", "--warning", "clocked")
        self.assertEqual(self.rows("SELECT ts FROM alerts WHERE title = 'clocked'"), [(T,)])

    def check(self):
        self.cli("check", "--no-alert")
        self.assertEqual(self.rows("SELECT ts FROM check_results WHERE name = 'here'"), [(T,)])

    def run_job(self):
        self.cli("run", "nightly", "--", sys.executable, "-c", "pass")
        self.assertEqual(self.rows("SELECT started, ended FROM job_runs WHERE job = 'nightly'"), [(T, T)])

    def silence(self):
        self.cli("silence", "add", "--match", "x", "--for", "1h")
        self.assertEqual(self.rows("SELECT starts, ends FROM silences"), [(T, T + HOUR)])

    def alert_test(self):
        self.cli("alert-test")
        self.assertEqual(self.rows("SELECT ts FROM alerts WHERE kind = 'test'"), [(T,)])

    def alerts(self):
        titles = [entry["title"] for entry in self.json("alerts", "--hours", "1")["alerts"]]
        self.assertIn("clocked", titles)

    def export(self):
        self.assertIn("\nmetasystem_x 5\n", self.cli("export"))  # 2030's sample is the latest, not the future

    def serve(self):
        env = self.child_env(METASYSTEM_NOW=repr(T))
        process = subprocess.Popen([sys.executable, "-m", "metasystem_monitor", "--db", self.db, "serve",
                                    "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, env=env, cwd=self.tmp)
        self.addCleanup(reap, process)
        port = int(process.stderr.readline().decode().split(":")[3].split("/")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SUBPROCESS_TIMEOUT_S)
        try:
            connection.request("GET", "/metrics")
            body = connection.getresponse().read().decode()
        finally:
            connection.close()
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(SUBPROCESS_TIMEOUT_S), 0)
        self.assertIn("\nmetasystem_x 5\n", body)

    def push(self):
        with HTTPServer() as gateway:
            self.cli("push", "--gateway", gateway.url("/"), "--instance", "h")
        self.assertIn(b"\nmetasystem_x 5\n", gateway.requests[0].body)

    def demo(self):
        store = os.path.join(self.tmp, "demo.db")
        self.run_main("--db", store, "demo", "--days", "1")
        [(first, last)] = sqlite_rows(store, "SELECT min(ts), max(ts) FROM samples")
        self.assertTrue(T - 8 * 86400 <= first < last <= T, (first, last))

    def configuration(self):
        self.assertTrue(self.cli("config").startswith(f"# {self.config}\n"))  # reads no clock: it only has to work


class AClockInThePastTest(StoreTestCase):
    """METASYSTEM_NOW before the real clock: a command that read the real clock instead would find its window
    empty (retry-stats did: 0 calls), or name the time zone of today rather than of that instant."""

    PAST = 1_700_000_000.0  # 2023-11-14T22:13:20Z

    def test_retry_stats_counts_the_call_recorded_a_minute_before_the_clock(self):
        with mm.MetricsCollector(self.db, now=lambda: self.PAST - 60) as collector:
            mm.AdaptiveRetry(mm.RetryConfig(max_attempts=1), collector=collector, now=lambda: self.PAST - 60).retry(
                "sync", lambda: "ok")
        env = self.child_env(METASYSTEM_NOW=repr(self.PAST))
        result = self.run_cli("--db", self.db, "retry-stats", "sync", "--hours", "1", env=env)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(result.stdout.decode().splitlines()[0],
                         "sync (last 1h): 1 calls, 100.0% succeeded, 0 retries, 0.0 s asleep")
        stats = json.loads(self.run_cli("--db", self.db, "retry-stats", "sync", "--hours", "1", "--json",
                                        env=env).stdout)["stats"]
        self.assertEqual((stats["calls"], stats["successes"]), (1, 1))

    def test_stats_and_anomalies_name_the_zone_of_the_clocks_instant(self):
        for when, zone in ((1_784_000_000.0, "EDT"), (1_800_000_000.0, "EST")):  # July 2026, January 2027
            with self.subTest(zone=zone):
                env = self.child_env(METASYSTEM_NOW=repr(when), TZ="America/New_York")
                self.assertEqual(self.run_cli("--db", self.db, "record", "x", "1", env=env).returncode, 0)
                for command in ("stats", "anomalies"):
                    result = self.run_cli("--db", self.db, command, "x", "--hours", "1", env=env)
                    self.assertEqual((result.returncode, result.stderr), (0, b""))
                    self.assertTrue(result.stdout.decode().startswith(f"x (last 1h, times {zone})"), result.stdout)
