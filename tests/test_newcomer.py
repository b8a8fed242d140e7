"""A newcomer's first minutes: the demo, help that ends in examples, and typos that get a suggestion."""

import os
import shutil
import subprocess
import unittest

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, StoreTestCase, file_bytes, sqlite_rows

NOW = 1_800_000_000.0


class DemoTest(StoreTestCase):

    def demo(self, db, *args):
        os.environ["METASYSTEM_NOW"] = str(NOW)
        self.addCleanup(os.environ.pop, "METASYSTEM_NOW", None)
        return self.run_main("--db", db, "demo", *args)

    def test_a_week_of_the_original_documents_world(self):
        code, out, err = self.demo(self.db, "--seed", "3")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines()[1], f"  python3 monitoring_dashboard.py --db {self.db}")
        week = mm.read_summary(self.db, 168, now=lambda: NOW)
        day = mm.read_summary(self.db, 24, now=lambda: NOW)
        for summary in (week, day):
            self.assertAlmostEqual(summary["sync"]["icloud"]["success_rate"], 92, delta=2.5)
            self.assertAlmostEqual(summary["sync"]["external"]["success_rate"], 75, delta=4.5)
        self.assertEqual(week["sync"]["icloud"]["attempts"], 7 * 48 + 1)
        self.assertEqual(sorted(week["agents"]), ["cataloger", "maintainer", "synthesizer"])
        self.assertEqual(sorted(week["circuit_breakers"]), ["database_write", "external_sync", "icloud_sync",
                                                           "knowledge_graph"])
        self.assertEqual(sqlite_rows(self.db, "SELECT from_state, to_state FROM breaker_transitions"),
                         [("closed", "open"), ("open", "half_open"), ("half_open", "closed")] * 2)
        self.assertEqual(len(week["alerts"]), 4)
        self.assertEqual(sorted(week["health"]), ["circuit_breaker", "database", "disk", "sync_recency_external",
                                                  "sync_recency_icloud"])
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*), sum(exit_code != 0) FROM job_runs"), [(7, 1)])
        anomalies = mm.MetricsCollector(self.db, readonly=True, now=lambda: NOW)
        with anomalies:
            found = anomalies.detect_anomalies("sync_icloud_success", 24, method="robust")
        self.assertEqual([point["value"] for point in found], [14.2])
        synthesizer = day["agents"]["synthesizer"]["recent"]
        self.assertIn(synthesizer["durations"].index(9.8), synthesizer["anomalous"])

    def test_the_same_seed_gives_the_same_data(self):
        other = os.path.join(self.tmp, "other.db")
        self.assertEqual(self.demo(self.db, "--seed", "9", "--days", "2")[0], 0)
        self.assertEqual(self.demo(other, "--seed", "9", "--days", "2")[0], 0)
        query = ("SELECT name, labels, ts, value FROM samples JOIN series ON id = series_id "
                 "WHERE name NOT LIKE 'check%' ORDER BY name, labels, ts")  # the checks measure this machine
        self.assertEqual(sqlite_rows(self.db, query), sqlite_rows(other, query))
        self.demo(os.path.join(self.tmp, "third.db"), "--seed", "10", "--days", "2")
        self.assertNotEqual(sqlite_rows(self.db, query), sqlite_rows(os.path.join(self.tmp, "third.db"), query))

    def test_it_writes_only_into_a_new_store(self):
        with mm.MetricsCollector(self.db) as metrics:
            metrics.record("mine", 1.0)
        before = file_bytes(self.db)
        self.assertMainError(1, "already holds samples; the demo writes only into a new one", "--db", self.db,
                             "demo")
        self.assertEqual(file_bytes(self.db), before)
        self.assertMainError(2, "--days must be more than 0 and at most 366", "--db", self.db, "demo", "--days", "0")

    @unittest.skipIf(shutil.which("make") is None, "make is not installed")
    def test_make_demo_shows_the_dashboard_and_leaves_nothing_behind(self):
        env = dict(self.child_env(), TMPDIR=self.tmp)
        result = subprocess.run(["make", "--no-print-directory", "demo"], cwd=REPO, capture_output=True, env=env,
                                timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        text = result.stdout.decode()
        for heading in ("SYNC OPERATIONS", "CIRCUIT BREAKERS", "AGENTS", "RECENT ALERTS", "SYSTEM HEALTH"):
            self.assertIn(f"\n{heading}\n", text)
        self.assertIn("  OK       icloud ", text)
        self.assertEqual(os.listdir(self.tmp), [])  # the temporary store is gone


class HelpAndTyposTest(StoreTestCase):

    def test_every_subcommand_help_ends_with_examples(self):
        for name, *_ in mm._COMMANDS:
            with self.subTest(command=name):
                code, out, err = self.run_main(name, "--help")
                self.assertEqual((code, err), (0, ""))
                tail = out.rstrip("\n").split("\nexamples:\n")
                self.assertEqual(len(tail), 2, out[-300:])
                self.assertTrue(all(line.startswith("  ") and mm.PROG in line or "python3" in line
                                    for line in tail[1].splitlines()[:1]), tail[1])

    def test_a_typo_gets_the_closest_command_or_option(self):
        for args, fragment in (
                (("recrod", "x", "1"), "unknown command 'recrod'; did you mean 'record'? (see --help)"),
                (("chek",), "unknown command 'chek'; did you mean 'check'?"),
                (("stats", "x", "--jsn"), "unrecognized arguments: --jsn; did you mean --json?"),
                (("export", "--format", "promethus"), "did you mean 'prometheus'?"),
                (("alert", "--critcal", "t"), "did you mean --critical?"),
        ):
            with self.subTest(args=args):
                self.assertMainError(2, fragment, *args)
        code, out, err = self.run_main("zzzz")
        self.assertEqual((code, err), (2, "metasystem_monitor.py: error: unknown command 'zzzz' (see --help)\n"))
