"""The command line, run as cron runs it: real subprocesses, exact output, exit codes."""

import json
import os
import random
import sqlite3
import subprocess
import sys
import time

import metasystem_monitor as mm

from .support import REPO, SCRIPT, SUBPROCESS_TIMEOUT_S, StoreTestCase, file_bytes


def stored(path, name=None):
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT name, labels, ts, value FROM samples JOIN series ON id = series_id"
        params = ()
        if name is not None:
            sql += " WHERE name = ?"
            params = (name,)
        return conn.execute(sql + " ORDER BY name, ts, seq", params).fetchall()
    finally:
        conn.close()


class RecordCommandTest(StoreTestCase):
    def test_record_is_silent_and_stores_labels_and_time(self):
        when = round(time.time()) - 86400 + 0.5
        result = self.run_cli("--db", self.db, "record", "backup_bytes", "52428800",
                              "--label", "host=nas", "--label", "job=nightly", "--time", str(when))
        self.assertCleanExit(result)
        self.assertEqual(stored(self.db), [("backup_bytes", '{"host":"nas","job":"nightly"}', when, 52428800.0)])

    def test_record_without_time_uses_now(self):
        before = time.time()
        self.assertCleanExit(self.run_cli("--db", self.db, "record", "x", "-2500.5"))
        self.assertCleanExit(self.run_cli("--db", self.db, "record", "x", "--", "-2.5e3"))
        ((name, labels, ts, value), (_, _, _, exponent_form)) = stored(self.db)
        self.assertEqual((name, labels, value, exponent_form), ("x", "{}", -2500.5, -2500.0))
        self.assertLessEqual(before, ts)
        self.assertLessEqual(ts, time.time())

    def test_global_options_go_before_or_after_the_subcommand(self):
        other = os.path.join(self.tmp, "other.db")
        self.assertCleanExit(self.run_cli("record", "a", "1", "--db", other, "-q"))
        self.assertCleanExit(self.run_cli("-q", "--db", other, "record", "b", "2"))
        self.assertEqual([row[0] for row in stored(other)], ["a", "b"])

    def test_store_location_precedence(self):
        home_db = os.path.join(self.tmp, "home", "metrics.db")
        env_db = os.path.join(self.tmp, "env.db")
        option_db = os.path.join(self.tmp, "option.db")
        self.assertCleanExit(self.run_cli("record", "in_home", "1"))
        self.assertCleanExit(self.run_cli("record", "in_env", "1", env=self.child_env(METASYSTEM_DB=env_db)))
        self.assertCleanExit(self.run_cli("--db", option_db, "record", "in_option", "1",
                                          env=self.child_env(METASYSTEM_DB=env_db)))
        default_env = self.child_env()
        del default_env["METASYSTEM_HOME"]
        self.assertCleanExit(self.run_cli("record", "in_dot_home", "1", env=default_env))
        self.assertEqual([row[0] for row in stored(home_db)], ["in_home"])
        self.assertEqual([row[0] for row in stored(env_db)], ["in_env"])
        self.assertEqual([row[0] for row in stored(option_db)], ["in_option"])
        self.assertEqual([row[0] for row in stored(os.path.join(self.tmp, ".metasystem", "metrics.db"))], ["in_dot_home"])

    def test_graphite_lines_from_stdin_in_one_transaction(self):
        then = int(time.time()) - 3600
        lines = f"load1 0.42\nload5 0.37 {then}\n\ndisk_free;mount=/;host=nas 12.5 {then + 60}\n".encode()
        self.assertCleanExit(self.run_cli("--db", self.db, "record", "-", stdin=lines))
        rows = stored(self.db)
        self.assertEqual([(r[0], r[1], r[3]) for r in rows],
                         [("disk_free", '{"host":"nas","mount":"/"}', 12.5), ("load1", "{}", 0.42), ("load5", "{}", 0.37)])
        self.assertEqual((rows[0][2], rows[2][2]), (then + 60.0, float(then)))

    def test_a_bad_graphite_line_is_named_and_nothing_of_the_input_is_stored(self):
        self.assertCleanExit(self.run_cli("--db", self.db, "record", "kept", "1"))
        cases = [
            (b"a 1\nb 2\nc nan\n", "line 3: value must be a finite number, got nan"),
            (b"a 1\nb\n", "line 2: expected 'name value [timestamp]', got 'b\\n'"),
            (b"a 1 2 3\n", "line 1: expected 'name value [timestamp]'"),
            (b"a 1\nb 2 yesterday\n", "line 2: timestamp 'yesterday' is not a number"),
            (b"a;host 1\n", "line 1: label 'host' is not KEY=VALUE"),
            (b"a 1\n\xff\xfe 2\n", "line 2: not UTF-8 text"),
            (b"a\x1b[2J 1\n", "line 1: metric name 'a\\x1b[2J' holds a control or other non-printable character"),
        ]
        (first, message), *rest = cases  # one in a process of its own, the rest through main() here
        self.assertOneLineError(self.run_cli("--db", self.db, "record", "-", stdin=first), 2, message)
        for stdin, message in rest:
            with self.subTest(stdin=stdin):
                self.assertMainError(2, message, "--db", self.db, "record", "-", stdin=stdin)
        self.assertEqual([row[0] for row in stored(self.db)], ["kept"])

    def test_bad_arguments_get_one_line_and_exit_2_and_change_nothing(self):
        self.assertCleanExit(self.run_cli("--db", self.db, "record", "kept", "1"))
        before = stored(self.db)
        cases = [
            (("record", "", "1"), "metric name is empty"),
            (("record", "x" * 300, "1"), "is 300 characters long; the limit is 200"),
            (("record", "x", "nan"), "value must be a finite number, got nan"),
            (("record", "x", "--", "-inf"), "value must be a finite number, got -inf"),
            (("record", "x", "-1e3"), "unrecognized arguments: -1e3"),
            (("record", "x", "12abc"), "value '12abc' is not a number"),
            (("record", "x"), "record needs a VALUE after the name"),
            (("record", "x", "1", "--label", "novalue"), "label 'novalue' is not KEY=VALUE"),
            (("record", "x", "1", "--label", "bad-key=1"), "label key 'bad-key' must be letters"),
            (("record", "x", "1", "--time", "-1"), "timestamp must not be negative, got -1.0"),
            (("record", "x", "1", "--time", "1e12"), "timestamp must be before the year 10000"),
            (("record", "-", "1"), "'record -' reads name, value and time from stdin"),
            (("record-sync", "icloud", "--success", "--duration", "-2"), "duration must not be negative"),
            (("record-sync", "icloud", "--success", "--duration", "1", "--files", "2.5"), "files_synced must be a whole number"),
            (("record-sync", "icloud", "--duration", "1"), "one of the arguments --success --failure is required"),
            (("record-sync", "icloud", "--success", "--failure", "--duration", "1"), "not allowed with argument"),
            (("record-agent", "cat", "--success", "--duration", "x"), "--duration 'x' is not a number"),
            (("stats", "x", "--hours", "0"), "'0' must be a positive number of hours"),
            (("stats", "x", "--hours", "nan"), "'nan' must be a positive number of hours"),
            (("frobnicate",), "unknown command 'frobnicate'"),
            ((), "the following arguments are required: COMMAND"),
        ]
        (first, message), *rest = cases  # one in a process of its own, the rest through main() here
        self.assertOneLineError(self.run_cli("--db", self.db, *first), 2, message)
        for args, message in rest:
            with self.subTest(args=args[:3]):
                self.assertMainError(2, message, "--db", self.db, *args)
        self.assertEqual(stored(self.db), before)


class TheScriptItselfTest(StoreTestCase):
    """run_cli goes through ``python3 -m``; here the file runs as a user runs it: by its own name."""

    def test_the_executable_script_records_and_reads(self):
        recorded = subprocess.run([SCRIPT, "record", "backup_bytes", "42", "--time", "1800000000"],
                                  capture_output=True, env=self.child_env(), cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertCleanExit(recorded)
        read = subprocess.run([sys.executable, SCRIPT, "metrics"], capture_output=True, env=self.child_env(),
                              cwd=self.tmp, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertCleanExit(read, 0, "backup_bytes\t1\t01-15 08:00 UTC\n")


class ReadCommandsTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        now = time.time()
        # Inside an hour that closed over an hour ago, so it is rolled up whenever the test runs.
        self.base = base = mm.bucket_start(now) - 7200
        with self.collector() as metrics:
            for offset, success, duration in ((300, True, 2.0), (1000, False, 5.0), (2000, True, 3.0)):
                metrics.record_sync_metric("icloud", success, duration, timestamp=base + offset)
            metrics.record("old", 1.0, timestamp=now - 30 * 3600)
        self.now = now

    def test_stats_text(self):
        result = self.run_cli("--db", self.db, "stats", "sync_icloud_success")
        self.assertCleanExit(result, stdout=(
            "sync_icloud_success (last 24h, times UTC)\n"
            "  count       2\n"
            "  avg         2.5\n"
            "  min         2\n"
            "  max         3\n"
            "  stddev      0.707106781186548\n"
            "  latest      3\n"
            f"  first_time  {mm.local_time(self.base + 300, seconds=True)}\n"
            f"  last_time   {mm.local_time(self.base + 2000, seconds=True)}\n"
            "  tiers       hourly\n"
        ))

    def test_stats_json_is_one_sorted_object(self):
        result = self.run_cli("--db", self.db, "stats", "sync_icloud_success", "--json", "--percentiles", "--hours", "3")
        self.assertCleanExit(result, stdout=None)
        document = json.loads(result.stdout)
        self.assertEqual(list(document), sorted(document))
        self.assertEqual(document, {
            "name": "sync_icloud_success", "hours": 3.0, "count": 2, "avg": 2.5, "min": 2.0, "max": 3.0,
            "stddev": 0.7071067811865476, "latest": 3.0, "p50": 2.5, "p95": 2.95,
            "first_time": mm.iso_time(self.base + 300), "last_time": mm.iso_time(self.base + 2000),
            "tiers": ["hourly"],
        })

    def test_stats_of_an_unknown_metric_is_empty_not_an_error_with_one_line_saying_so(self):
        result = self.run_cli("--db", self.db, "stats", "nothing", "--json")
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (0, "metasystem_monitor.py: warning: no samples for 'nothing' ('metrics' lists the names)\n"))
        self.assertEqual(json.loads(result.stdout)["count"], 0)

    def test_success_rate_text_and_json(self):
        self.assertCleanExit(self.run_cli("--db", self.db, "success-rate", "sync_icloud"),
                             stdout="sync_icloud: 66.7% of 3 attempts in the last 24h\n")
        nowhere = self.run_cli("--db", self.db, "success-rate", "sync_nowhere", "--hours", "2")
        self.assertEqual((nowhere.returncode, nowhere.stdout, nowhere.stderr),
                         (0, b"sync_nowhere: no attempts in the last 2h\n",
                          b"metasystem_monitor.py: warning: no samples for 'sync_nowhere' ('metrics' lists the names)\n"))
        result = self.run_cli("--db", self.db, "success-rate", "sync_icloud", "--json")
        self.assertEqual(json.loads(result.stdout),
                         {"name": "sync_icloud", "hours": 24.0, "success_rate": 200 / 3, "attempts": 3})
        result = self.run_cli("--db", self.db, "success-rate", "sync_nowhere", "--json")
        self.assertEqual(result.stdout, b'{\n  "attempts": 0,\n  "hours": 24.0,\n  "name": "sync_nowhere",\n'
                                        b'  "success_rate": null\n}\n')

    def test_metrics_lists_every_name(self):
        last = mm.local_time(self.base + 2000, zone=True)
        self.assertCleanExit(self.run_cli("--db", self.db, "metrics"), stdout=(
            f"old\t1\t{mm.local_time(self.now - 30 * 3600, zone=True)}\n"
            f"sync_icloud_conflicts\t1\t{last}\n"
            f"sync_icloud_failure\t1\t{mm.local_time(self.base + 1000, zone=True)}\n"
            f"sync_icloud_files\t1\t{last}\n"
            f"sync_icloud_success\t1\t{last}\n"
        ))
        document = json.loads(self.run_cli("--db", self.db, "metrics", "--json").stdout)
        self.assertEqual(document["metrics"][0], {"name": "old", "series": 1,
                                                  "last_time": mm.iso_time(self.now - 30 * 3600)})
        with mm.MetricsCollector(self.db) as metrics:  # two label sets of one name: two series
            metrics.record("old", 1.0, {"disk": "a"}, timestamp=self.now - 20 * 3600)
        self.assertIn(f"old\t2\t{mm.local_time(self.now - 20 * 3600, zone=True)}\n",
                      self.run_cli("--db", self.db, "metrics").stdout.decode())

    def test_reading_a_missing_store_creates_nothing(self):
        missing = os.path.join(self.tmp, "missing", "m.db")
        self.assertCleanExit(self.run_cli("--db", missing, "metrics"))
        self.assertFalse(os.path.exists(os.path.dirname(missing)))

    def test_record_sync_and_agent_then_read_back(self):
        other = os.path.join(self.tmp, "o.db")
        self.assertCleanExit(self.run_cli("--db", other, "record-sync", "external", "--failure", "--duration", "31",
                                          "--files", "3", "--conflicts", "1"))
        self.assertCleanExit(self.run_cli("--db", other, "record-agent", "cataloger", "--success",
                                          "--duration", "1.2", "--items", "45"))
        self.assertEqual([(r[0], r[1], r[3]) for r in stored(other)], [
            ("agent_cataloger_items", '{"agent":"cataloger"}', 45.0),
            ("agent_cataloger_success", '{"agent":"cataloger"}', 1.2),
            ("sync_external_conflicts", '{"target":"external"}', 1.0),
            ("sync_external_failure", '{"target":"external"}', 31.0),
            ("sync_external_files", '{"target":"external"}', 3.0),
        ])
        self.assertCleanExit(self.run_cli("--db", other, "success-rate", "agent_cataloger"),
                             stdout="agent_cataloger: 100.0% of 1 attempts in the last 24h\n")


class BrokenStoresTest(StoreTestCase):
    def test_a_file_that_is_not_a_database(self):
        with open(self.db, "wb") as handle:
            handle.write(b"not sqlite\n" * 500)
        before = file_bytes(self.db)
        for args in (("record", "x", "1"), ("stats", "x"), ("metrics",)):
            with self.subTest(args=args):
                self.assertOneLineError(self.run_cli("--db", self.db, *args), 1,
                                        f"error: store {self.db} is not a SQLite database")
        self.assertEqual(file_bytes(self.db), before)

    def test_a_store_from_a_newer_version(self):
        conn = sqlite3.connect(self.db)
        conn.execute(f"PRAGMA application_id = {mm.APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {mm.SCHEMA_VERSION + 1}")
        conn.close()
        before = file_bytes(self.db)
        self.assertOneLineError(self.run_cli("--db", self.db, "record", "x", "1"), 1,
                                f"was written by a newer version (schema {mm.SCHEMA_VERSION + 1};")
        self.assertEqual(file_bytes(self.db), before)

    def test_a_read_only_folder(self):
        folder = os.path.join(self.tmp, "ro")
        os.mkdir(folder)
        existing = os.path.join(folder, "m.db")
        self.assertCleanExit(self.run_cli("--db", existing, "record", "x", "4"))
        before = file_bytes(existing)
        new = os.path.join(folder, "new.db")
        self.assertOneLineError(self.run_cli_in_readonly_folder(folder, "--db", new, "record", "x", "1"), 1,
                                f"error: store {new} cannot be created: ")
        self.assertOneLineError(self.run_cli_in_readonly_folder(folder, "--db", existing, "record", "x", "1"), 1,
                                f"error: store {existing} ")
        result = self.run_cli_in_readonly_folder(folder, "--db", existing, "stats", "x", "--json")
        self.assertCleanExit(result, stdout=None)
        self.assertEqual(json.loads(result.stdout)["latest"], 4.0)
        self.assertEqual(file_bytes(existing), before)
        self.assertFalse(os.path.exists(new))

    def test_verbose_adds_the_traceback(self):
        with open(self.db, "wb") as handle:
            handle.write(b"junk" * 100)
        result = self.run_cli("--db", self.db, "stats", "x", "-v")
        err = result.stderr.decode()
        self.assertEqual(result.returncode, 1)
        self.assertIn("Traceback (most recent call last)", err)
        self.assertTrue(err.endswith(f"metasystem_monitor.py: error: store {self.db} is not a SQLite database\n"))


class ConfigurationTest(StoreTestCase):
    def write_config(self, text, name="config.ini"):
        path = os.path.join(self.tmp, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def test_the_example_configuration_is_valid(self):
        example = os.path.join(os.path.dirname(mm.__file__), "alerting-config.example.ini")
        self.assertCleanExit(self.run_cli("--config", example, "--db", self.db, "record", "x", "1"))

    def test_storage_settings_are_read_from_option_or_environment(self):
        config = self.write_config("[storage]\nsynchronous = full\nretention_days = 7\n")
        hour = mm.bucket_start(time.time() - 8 * 86400)

        def store_with_old_samples(db):
            """Three samples in one hour eight days ago (one or two would be kept for the hour), no cleanup yet."""
            with mm.MetricsCollector(db, maintain=False) as metrics:
                metrics.record_many(("old", 1.0, None, hour + i) for i in range(3))
            return db

        for how, args, env in (("option", ("--config", config), self.child_env()),
                               ("environment", (), self.child_env(METASYSTEM_CONFIG=config))):
            with self.subTest(how=how):
                db = store_with_old_samples(os.path.join(self.tmp, how + ".db"))
                # The first write runs the daily cleanup: 7 days of retention drop the old samples.
                result = self.run_cli(*args, "--db", db, "-v", "record", "new", "1", env=env)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn(f"store {db} open: schema {mm.SCHEMA_VERSION}, journal wal, synchronous full,",
                              result.stderr.decode())
                self.assertEqual([row[0] for row in stored(db)], ["new"])
        default = store_with_old_samples(os.path.join(self.tmp, "default.db"))
        self.assertCleanExit(self.run_cli("--db", default, "record", "new", "1"))
        self.assertEqual(sorted(row[0] for row in stored(default)), ["new", "old", "old", "old"])

    def test_bad_configuration_gets_one_line_and_exit_1(self):
        cases = [
            ("[storage]\nsynchronous = sometimes\n", "[storage] synchronous must be normal or full, got 'sometimes'"),
            ("[storage]\nretention_days = a week\n",
             "[storage] retention_days must be a number of days or a duration such as 12h, got 'a week'"),
            ("[storage]\nretention_days = -1\n",
             "[storage] retention_days must be a number of days or a duration such as 12h, got '-1'"),
            ("[storage]\nrollup_hourly_days = 1y\n",
             "[storage] rollup_hourly_days must be a number of days or a duration such as 12h, got '1y'"),
            ("[storage]\nrollup_daily_days = nan\n",
             "[storage] rollup_daily_days must be a number of days or a duration such as 12h, got 'nan'"),
            ("[storage\nsynchronous = full\n", "line 1: '[storage' stands before any [section]"),
            ("[storage]\n[storage]\n", "line 2: section [storage] is given a second time"),
        ]
        for number, (text, message) in enumerate(cases):
            with self.subTest(message=message):
                config = self.write_config(text)
                args = ("--config", config, "--db", self.db, "record", "x", "1")
                if number == 0:  # one in a process of its own, the rest through main() here
                    self.assertOneLineError(self.run_cli(*args), 1, message)
                else:
                    self.assertMainError(1, message, *args)
        self.assertFalse(os.path.exists(self.db))

    def test_a_missing_file_is_fine_unless_named(self):
        self.assertCleanExit(self.run_cli("--db", self.db, "record", "x", "1"))
        missing = os.path.join(self.tmp, "nope.ini")
        self.assertOneLineError(self.run_cli("--config", missing, "--db", self.db, "record", "x", "1"), 1,
                                f"configuration file {missing} does not exist")
        self.assertOneLineError(
            self.run_cli("--db", self.db, "record", "x", "1", env=self.child_env(METASYSTEM_CONFIG=missing)), 1,
            f"configuration file {missing} does not exist")


_RETRYING_PROCESS = """
import random
import sys
import metasystem_monitor as mm

retry = mm.AdaptiveRetry(db_path=sys.argv[1], sleep=lambda seconds: None, rng=random.Random(1))
failures = [ConnectionResetError, TimeoutError]


def flaky():
    if failures:
        raise failures.pop(0)()
    return "ok"


retry.retry("nightly_sync", flaky)
retry.retry_async("nightly_sync", lambda: open("/nonexistent/file"))
"""


class RetryAndBreakerCommandsTest(StoreTestCase):
    def test_retry_stats_cover_every_process(self):
        for _ in range(2):
            child = subprocess.run([sys.executable, "-c", _RETRYING_PROCESS, self.db], capture_output=True,
                                   cwd=REPO, env=self.child_env(), timeout=60)
            self.assertEqual((child.returncode, child.stderr), (0, b""))
        result = self.run_cli("--db", self.db, "retry-stats", "nightly_sync", "--json")
        self.assertCleanExit(result, stdout=None)
        document = json.loads(result.stdout)
        self.assertEqual(sorted(document), ["analysis", "hours", "operation", "recommendation", "stats"])
        stats = document["stats"]
        self.assertEqual((stats["calls"], stats["attempts"], stats["success_rate"], stats["common_errors"]),
                         (4, 8, 50.0, [["ConnectionResetError", 2], ["FileNotFoundError", 2], ["TimeoutError", 2]]))
        self.assertEqual({key: document["analysis"][key] for key in ("total_failures", "transient", "permanent")},
                         {"total_failures": 4, "transient": 2, "permanent": 2})
        text = self.run_cli("--db", self.db, "retry-stats", "nightly_sync")
        self.assertCleanExit(text, stdout=None)
        draws = random.Random(1)
        slept = 2 * (draws.uniform(0.8, 1.2) + draws.uniform(1.6, 2.4))  # two processes, the same seed
        self.assertAlmostEqual(stats["total_sleep_s"], slept)
        self.assertEqual(text.stdout.decode().splitlines()[:4], [
            f"nightly_sync (last 24h): 4 calls, 50.0% succeeded, 4 retries, {slept:.1f} s asleep",
            "  errors: ConnectionResetError 2, FileNotFoundError 2, TimeoutError 2",
            "  failures ever: 4, recovered on a retry 2, never 2",
            "  recommended: max_attempts 3, deadline none",
        ])

    def test_breakers_list_and_reset(self):
        with self.collector() as metrics:
            breaker = mm.CircuitBreaker("icloud_sync", collector=metrics)
            for _ in range(3):
                with self.assertRaises(TimeoutError):
                    breaker.call(self._timeout)
            status = breaker.status()
        result = self.run_cli("--db", self.db, "breakers")
        self.assertCleanExit(result, stdout=f"icloud_sync\topen\t3 failures in 1800 s\t"
                                            f"since {mm.local_time(status['since'], zone=True)}\t"
                                            f"until {mm.local_time(status['open_until'], zone=True)}\n")
        document = json.loads(self.run_cli("--db", self.db, "breakers", "--json").stdout)
        self.assertEqual(document, {"breakers": [status]})
        self.assertCleanExit(self.run_cli("--db", self.db, "breaker", "reset", "icloud_sync"),
                             stdout="icloud_sync: open -> closed\n")
        self.assertEqual(json.loads(self.run_cli("--db", self.db, "breakers", "--json").stdout)["breakers"][0]["state"],
                         "closed")
        self.assertOneLineError(self.run_cli("--db", self.db, "breaker", "reset", "nope"), 1,
                                f"error: no circuit breaker named 'nope' in {self.db}")
        self.assertOneLineError(self.run_cli("--db", self.db, "breaker", "open", "icloud_sync"), 2,
                                "invalid choice: 'open'")

    @staticmethod
    def _timeout():
        raise TimeoutError("slow")


class HelpTest(StoreTestCase):
    def test_version(self):
        self.assertCleanExit(self.run_cli("--version"), stdout=f"metasystem_monitor.py {mm.__version__}\n")

    def test_help_lists_exit_codes_and_each_subcommand_ends_with_examples(self):
        result = self.run_cli("--help")
        self.assertCleanExit(result, stdout=None)
        self.assertIn("exit codes:\n  0      success", result.stdout.decode())
        for command in [entry[0] for entry in mm._COMMANDS]:  # every subcommand, through main() in this process
            with self.subTest(command=command):
                code, out, err = self.run_main(command, "--help")
                self.assertEqual((code, err), (0, ""))
                tail = out.rstrip().split("examples:\n")[-1]
                self.assertTrue(tail.strip().startswith("metasystem_monitor.py " + command.split("-")[0])
                                or "| metasystem_monitor.py" in tail, tail)

    def test_in_process_main_returns_codes(self):
        code, out, err = self.run_main("--db", self.db, "record", "-", stdin=b"a 1\nb 2\n")
        self.assertEqual((code, out, err), (0, "", ""))
        code, out, err = self.run_main("--db", self.db, "record", "a", "zz")
        self.assertEqual((code, out, err), (2, "", "metasystem_monitor.py: error: value 'zz' is not a number\n"))
        code, out, err = self.run_main("nope")
        self.assertEqual(code, 2)
