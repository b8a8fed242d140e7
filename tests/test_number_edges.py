"""Values at the edge of a double, and timestamps at 0 and in year 9999.

Sums and spreads are taken of values scaled by a power of two where a plain sum would overflow, so they stay
exact and finite; what still cannot be represented is null in JSON, with a note, and every JSON output parses
strictly.
"""

import math
import os
import statistics
import time

import metasystem_monitor as mm

from .support import FakeClock, StoreTestCase, strict_json

HOUR = 3600.0
T0 = 1_800_000_000.0 + 17


class FloatLimitTest(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.clock = FakeClock(T0)

    def test_sums_and_spreads_of_values_near_the_limit_stay_exact(self):
        with self.collector(self.clock) as metrics:
            for value in (1e308, 1e308, -1e308):
                metrics.record("big", value)
            stats = metrics.get_metric_stats("big")
        self.assertEqual((stats["count"], stats["min"], stats["max"]), (3, -1e308, 1e308))
        self.assertAlmostEqual(stats["avg"] / 1e308, 1 / 3, places=15)
        self.assertAlmostEqual(stats["stddev"] / 1e308, (4 / 3) ** 0.5, places=15)  # sqrt(((2/3)^2*2 + (4/3)^2) / 2)

    def test_the_original_way_and_the_scaled_way_agree_on_ordinary_values(self):
        with self.collector(self.clock) as metrics:
            for value in (1.5, 2.5, 10.0, -4.0):
                metrics.record("small", value)
            stats = metrics.get_metric_stats("small")
        self.assertEqual(stats["avg"], 2.5)
        self.assertAlmostEqual(stats["stddev"], statistics.stdev([1.5, 2.5, 10.0, -4.0]), places=12)

    def test_the_cli_and_every_summary_face_stay_strict_json(self):
        env = self.child_env(METASYSTEM_DB=self.db)
        for args in (("record", "big", "1e308"), ("record", "big", "1e308"),
                     ("record-sync", "x", "--success", "--duration", "1e308"),
                     ("record-sync", "x", "--success", "--duration", "1e308")):
            self.assertCleanExit(self.run_cli(*args, env=env))
        stats = self.run_cli("stats", "big", "--json", env=env)
        self.assertEqual(stats.returncode, 0, stats.stderr)
        self.assertEqual((strict_json(stats.stdout)["avg"], strict_json(stats.stdout)["stddev"]), (1e308, 0.0))
        plain = self.run_cli("stats", "big", env=env)
        self.assertIn(b"  avg         1e+308\n", plain.stdout)
        summary = self.run_cli("--summary", env=env, module="monitoring_dashboard")
        self.assertEqual(summary.returncode, 0, summary.stderr)
        self.assertEqual(strict_json(summary.stdout)["sync"]["x"]["avg_duration"], 1e308)
        once = self.run_cli("--once", env=env, module="monitoring_dashboard")
        self.assertEqual(once.returncode, 0, once.stderr)
        self.assertIn("avg 1.16e+303d".encode(), once.stdout)
        self.assertTrue(all(len(line) <= 80 for line in once.stdout.decode().splitlines()))
        status, kind, body = mm.serve_path("/api/summary", "", self.db, 24.0, time.time)
        self.assertEqual((status, kind), (200, "application/json"))
        self.assertEqual(strict_json(body)["sync"]["x"]["avg_duration"], 1e308)

    def test_an_infinite_sum_in_the_rollups_is_null_with_a_note(self):
        with self.collector(self.clock) as metrics:
            for _ in range(3):  # three: an hour of one or two samples keeps them raw, without a rollup row
                metrics.record("big", 1e308)
            self.clock.advance(2 * HOUR)
            metrics.roll_up()  # the hour's sum, 3e308, is infinite in the rollup row
            stats = metrics.get_metric_stats("big", hours=3)
        self.assertEqual(stats["tiers"], ["hourly"])
        self.assertEqual((stats["count"], stats["max"], stats["avg"]), (3, 1e308, float("inf")))
        document = strict_json(mm.json_text({"name": "big", **stats}))
        self.assertEqual((document["avg"], document["notes"]), (None, ["avg: out of the range of a double",
                                                                       "stddev: out of the range of a double"]))
        self.assertEqual(mm._format_value(stats["avg"]), "out of range")

    def test_late_samples_near_the_float_limit_join_a_rolled_hour(self):
        with self.collector(self.clock) as metrics:
            hour = mm.bucket_start(self.clock.now)
            metrics.record_many(("big", 1.0, None, hour + i) for i in range(3))
            self.clock.advance(2 * HOUR)
            metrics.roll_up()
            metrics.record_many([("big", 1e308, None, hour + 10), ("big", 1e308, None, hour + 11)])  # once a crash
            stats = metrics.get_metric_stats("big", hours=3)
        self.assertEqual((stats["count"], stats["max"], stats["avg"], stats["tiers"]), (5, 1e308, math.inf, ["hourly"]))

    def test_json_text_keeps_notes_and_nested_paths(self):
        self.assertEqual(mm.json_text({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "notes": ["x"]},
                                      indent=None),
                         '{"a": [1.0, null], "b": {"c": null}, "notes": ["x", "a[1]: out of the range of a double", '
                         '"b.c: out of the range of a double"]}')


class TimestampEdgeTest(StoreTestCase):

    def test_a_sample_at_epoch_0_costs_one_seek_not_every_hour_since_1970(self):
        lines = "boot 5 0\n" + "".join(f"n{i} {i}\n" for i in range(200))
        # The write rolls up every closed hour (the one of 1970 among them) before it returns: it took
        # 136 s when the rollup walked every day since 1970; the timeout bounds it at a minute.
        result = self.run_cli("--db", self.db, "record", "-", stdin=lines.encode(), timeout=60)
        self.assertCleanExit(result)
        with mm.MetricsCollector(self.db, maintain=False) as metrics:
            self.assertEqual(metrics.roll_up(), 0)  # the write already rolled up what was closed
            self.assertEqual(metrics.store.tier_marks()[0], mm.bucket_start(time.time() - 60, HOUR))
            stats = metrics.get_metric_stats("boot", hours=(time.time() + 1) / HOUR)
        self.assertEqual((stats["count"], stats["avg"], stats["first_time"]),
                         (1, 5.0, "1970-01-01T00:00:00.000+00:00"))


class YearNineThousandTest(StoreTestCase):

    def test_a_sample_stamped_in_year_9999_is_not_the_latest_anywhere(self):
        now = time.time()
        with mm.MetricsCollector(self.db, now=lambda: now) as metrics:
            metrics.record("temp", 5.0, timestamp=253402300799.0)  # 9999-12-31T23:59:59
            metrics.record("temp", 21.0, timestamp=now - 60)
            self.assertEqual(metrics.get_metric_stats("temp")["latest"], 21.0)
            self.assertEqual(metrics.last_sample_time("temp"), now - 60)
            exported = mm.export_text(metrics)
        self.assertIn("\nmetasystem_temp 21\n", exported)

    def test_a_silence_past_year_9999_is_refused_at_input_and_list_keeps_working(self):
        self.assertMainError(2, "'99999999d' is longer than 1000 years", "--db", self.db, "silence", "add",
                             "--match", "x", "--for", "99999999d")
        self.assertEqual(self.run_main("--db", self.db, "silence", "list")[0], 0)
        with mm.AlertingSystem(os.path.join(self.tmp, "none.ini"), db_path=self.db) as alerts:
            with self.assertRaisesRegex(mm.ValidationError, "would end past the year 9999"):
                alerts.add_silence("x", 9e11)
