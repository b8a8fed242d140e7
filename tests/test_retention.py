"""Retention: raw samples expire, hours fold into days, and statistics do not change."""

import json
import os
import random
import statistics
import subprocess
import sys
import time

import metasystem_monitor as mm

from .support import REPO, SUBPROCESS_TIMEOUT_S, FakeClock, StoreTestCase, sqlite_rows

DAY = 86400.0
HOUR = 3600.0


def table_rows(store):
    return {table: store.query(f"SELECT * FROM {table} ORDER BY 1, 2, 3")
            for table in ("series", "samples", "rollups")}


class FoldingTest(StoreTestCase):
    """A store with 1 day of raw samples, 3 days of hours, and days before that."""

    def setUp(self):
        super().setUp()
        self.clock = FakeClock(1_800_000_000.0 + 5 * HOUR + 17)  # 05:00:17 UTC
        self.metrics = self.collector(self.clock, retention_days=1, hourly_days=3, maintain=False)
        rng = random.Random(21)
        start = self.clock.now - 8 * DAY
        self.points = [(start + i * 600.0 + rng.uniform(0, 599), rng.gauss(100, 15)) for i in range(8 * 144)]
        self.metrics.record_many([("m", v, {"site": "a" if i % 3 else "b"}, ts) for i, (ts, v) in enumerate(self.points)])

    def expected(self, since):
        values = [v for ts, v in self.points if since <= ts <= self.clock.now]
        return len(values), statistics.fmean(values), min(values), max(values), statistics.stdev(values)

    def observed(self, hours):
        stats = self.metrics.get_metric_stats("m", hours=hours)
        return stats["count"], stats["avg"], stats["min"], stats["max"], stats["stddev"]

    def assertSameStats(self, observed, expected):
        self.assertEqual(observed[0], expected[0])
        self.assertEqual(observed[2:4], expected[2:4])
        for got, want in zip((observed[1], observed[4]), (expected[1], expected[4])):
            self.assertAlmostEqual(got, want, delta=1e-9 * abs(want))

    def test_hours_fold_into_days_and_statistics_stay_exact(self):
        report = self.metrics.cleanup()
        # Site b has two samples an hour: they are kept raw for their hours, and fold into days with the rest.
        self.assertEqual(report["deleted_samples"], sum(1 for i, (ts, _) in enumerate(self.points)
                                                        if i % 3 and ts < mm.bucket_start(self.clock.now - DAY)))
        self.assertEqual(self.metrics.store.query(
            "SELECT count(*) FROM samples WHERE ts < ?", (mm.bucket_start(self.clock.now - 3 * DAY, DAY),)), [(0,)])
        day_edge = mm.bucket_start(self.clock.now - 3 * DAY, DAY)
        self.assertEqual(self.metrics.store.meta_times("daily_until")[0], day_edge)
        self.assertEqual(report["daily_rollups"], 2 * 5)  # two series, five whole days before the edge
        self.assertEqual(self.metrics.store.query("SELECT count(*) FROM rollups WHERE span = 3600 AND bucket < ?",
                                                  (day_edge,)), [(0,)])
        # A window that starts on a day boundary inside the daily tier is exact.
        since = mm.bucket_start(self.clock.now - 7 * DAY, DAY)
        hours = (self.clock.now - since) / HOUR
        self.assertSameStats(self.observed(hours), self.expected(since))
        self.assertEqual(self.metrics.get_metric_stats("m", hours=hours)["tiers"], ["daily", "hourly", "raw"])
        self.assertEqual(self.metrics.get_metric_stats("m", hours=20)["tiers"], ["hourly", "raw"])
        self.assertEqual(self.metrics.get_metric_stats("m", hours=0.5)["tiers"], ["raw"])

    def test_a_second_cleanup_changes_nothing(self):
        self.metrics.cleanup()
        before = table_rows(self.metrics.store)
        traced = []
        self.metrics.store.connection.set_trace_callback(traced.append)
        self.assertEqual(self.metrics.cleanup(), {"rolled_up_hours": 0, "deleted_samples": 0, "folded_hours": 0,
                                                  "daily_rollups": 0, "deleted_days": 0,
                                                  "deleted_retry_records": 0, "deleted_job_runs": 0,
                                                  "deleted_alerts": 0})
        self.metrics.store.connection.set_trace_callback(None)
        self.assertEqual(table_rows(self.metrics.store), before)
        writes = [sql for sql in traced if sql.split()[0] in ("INSERT", "UPDATE", "DELETE")]
        self.assertEqual(len(writes), 1)  # when the last cleanup ran, and nothing else
        self.assertTrue(writes[0].startswith("INSERT OR REPLACE INTO meta (key, value) VALUES ("), writes)
        # Nothing due costs the same whatever the number of series: no statement reads them or their rows.
        self.assertEqual([sql for sql in traced if "samples" in sql or "FROM series" in sql], [])

    def test_a_sample_older_than_what_was_deleted_goes_at_the_next_cleanup(self):
        self.metrics.cleanup()
        self.metrics.record("m", 5.0, {"site": "a"}, self.clock.now - 2 * DAY)  # past the one-day retention
        self.assertEqual(self.metrics.cleanup()["deleted_samples"], 1)
        self.assertEqual(self.metrics.cleanup()["deleted_samples"], 0)

    def test_a_late_sample_for_a_folded_day_joins_that_day(self):
        self.metrics.cleanup()
        since = mm.bucket_start(self.clock.now - 7 * DAY, DAY)
        late = (since + 3 * HOUR + 1, 1000.0)
        self.metrics.record("m", late[1], {"site": "a"}, late[0])
        self.points.append(late)
        hours = (self.clock.now - since) / HOUR
        self.assertSameStats(self.observed(hours), self.expected(since))
        self.assertEqual(self.metrics.store.query("SELECT count(*) FROM rollups WHERE span = 3600 AND bucket < ?",
                                                  (self.metrics.store.meta_times("daily_until")[0],)), [(0,)])

    def test_daily_rollups_expire_when_configured(self):
        self.metrics.daily_days = 5
        report = self.metrics.cleanup()
        self.assertEqual(report["deleted_days"], 2 * 3)  # days 8, 7 and 6 ago (the oldest is partial)
        oldest = self.metrics.store.query("SELECT min(bucket) FROM rollups")[0][0]
        self.assertEqual(oldest, mm.bucket_start(self.clock.now - 5 * DAY, DAY))


class SlicedRollUpTest(StoreTestCase):
    """A write rolls up at most one slice of series; the rest follow; statistics stay exact meanwhile."""

    SERIES = 2 * mm.ROLLUP_SERIES_PER_SLICE + 500

    def test_a_write_does_one_slice_and_a_late_sample_in_a_done_slice_is_counted_once(self):
        clock = FakeClock(1_800_000_000.0 + 2 * HOUR + 120)  # 02:02: the hours 00:00 and 01:00 are closed
        metrics = self.collector(clock, maintain=False)
        hour = mm.bucket_start(clock.now - HOUR)
        # Three samples a series: every hour gets its rollup row (one or two would be kept raw instead).
        metrics.record_many((f"s{i}", float(i % 7 + k), None, hour + i % 3000 + k)
                            for i in range(self.SERIES) for k in range(3))
        metrics.roll_up(slices=1)
        cursor, rolled = metrics.store.meta_times("rollup_cursor", "rolled_until")
        self.assertEqual(rolled, None)
        self.assertEqual(metrics.store.query("SELECT count(DISTINCT series_id) FROM rollups"),
                         [(mm.ROLLUP_SERIES_PER_SLICE,)])
        done = metrics.store.query("SELECT name FROM series WHERE id <= ? ORDER BY id LIMIT 1", (cursor,))[0][0]
        metrics.record(done, 100.0, None, hour + 10)  # late for a series whose slice is done
        metrics.record("s9999999", 1.0, None, hour + 20)  # a new series: the slices to come take it
        self.assertEqual(metrics.get_metric_stats(done, hours=3)["count"], 4)  # raw: the hour is not rolled yet
        self.assertGreater(metrics.roll_up(), 0)
        self.assertEqual(metrics.store.meta_times("rollup_cursor", "rolled_until"), (None, mm.bucket_start(clock.now)))
        for name, count in ((done, 4), ("s9999999", 1), (f"s{self.SERIES - 1}", 3)):  # s9999999: kept raw
            stats = metrics.get_metric_stats(name, hours=3)
            self.assertEqual((stats["count"], stats["tiers"]), (count, ["hourly"]), name)
        self.assertEqual(metrics.get_metric_stats(done, hours=3)["max"], 100.0)

    def test_the_write_path_does_one_slice_a_minute(self):
        clock = FakeClock(1_800_000_000.0 + 2 * HOUR + 120)
        metrics = self.collector(clock)
        hour = mm.bucket_start(clock.now - HOUR)
        with mm.MetricsCollector(self.db, maintain=False, now=clock.time) as bulk:
            bulk.record_many((f"s{i}", 1.0, None, hour) for i in range(self.SERIES))
            bulk.cleanup()  # the daily cleanup is done: what remains due is the roll-up of the next hour
        clock.advance(HOUR)
        with mm.MetricsCollector(self.db, maintain=False, now=clock.time) as bulk:
            bulk.record_many((f"s{i}", 2.0, None, clock.now - HOUR + 5 + k) for i in range(self.SERIES)
                             for k in range(3))
        for minute in range(3):
            metrics.record("x", 1.0)
            rolled = metrics.store.query("SELECT count(DISTINCT series_id) FROM rollups WHERE bucket = ?",
                                         (mm.bucket_start(clock.now - HOUR),))[0][0]
            self.assertEqual(rolled, min(self.SERIES, (minute + 1) * mm.ROLLUP_SERIES_PER_SLICE), minute)
            clock.advance(60)


class SparseSeriesTest(StoreTestCase):
    """An hour with one or two samples of a series keeps them raw instead of adding a rollup row."""

    def setUp(self):
        super().setUp()
        self.clock = FakeClock(1_800_000_000.0 + 5 * HOUR + 17)
        self.metrics = self.collector(self.clock, retention_days=2, hourly_days=5, maintain=False)
        rng = random.Random(5)
        start = self.clock.now - 8 * DAY
        self.points = {"dense": [], "sparse": [], "mixed": []}
        for hour in range(8 * 24):
            base = start + hour * HOUR
            counts = {"dense": 6, "sparse": 1 + (hour % 5 == 0) if hour % 3 == 0 else 0,
                      "mixed": (1, 2, 5, 0)[hour % 4]}
            for site, count in counts.items():
                self.points[site] += [(base + rng.uniform(0, HOUR - 1), rng.gauss(50, 9)) for _ in range(count)]
        self.metrics.record_many([("m", v, {"site": site}, ts) for site, points in self.points.items()
                                  for ts, v in points])

    def closed_hours(self, site, small):
        """{hour: samples} of the closed hours of ``site`` kept raw (if small), else rolled up: an hour is kept
        when it and the hours on either side hold at most two samples each."""
        hours = {}
        for ts, _ in self.points[site]:
            hours[mm.bucket_start(ts)] = hours.get(mm.bucket_start(ts), 0) + 1
        return {hour: n for hour, n in hours.items() if hour < mm.bucket_start(self.clock.now - 60) and small == (
            max(n, hours.get(hour - HOUR, 0), hours.get(hour + HOUR, 0)) <= 2)}

    def assertExact(self, hours, sites=("dense", "sparse", "mixed")):
        since = self.clock.now - hours * HOUR
        values = [v for site in sites for ts, v in self.points[site] if since <= ts <= self.clock.now]
        stats = self.metrics.get_metric_stats("m", hours=hours)
        self.assertEqual((stats["count"], stats["min"], stats["max"]), (len(values), min(values), max(values)), hours)
        self.assertAlmostEqual(stats["avg"], statistics.fmean(values), delta=1e-9 * 50)
        if len(values) > 1:
            self.assertAlmostEqual(stats["stddev"], statistics.stdev(values), delta=1e-9 * 9)
        return stats

    def test_small_hours_stay_raw_fold_into_days_and_statistics_stay_exact(self):
        self.metrics.roll_up()
        rolled = self.metrics.store.query(
            "SELECT json_extract(labels, '$.site'), count(*), sum(n) FROM rollups JOIN series ON id = series_id "
            "GROUP BY labels ORDER BY 1")
        self.assertEqual(rolled, [(site, len(self.closed_hours(site, False)),
                                   sum(self.closed_hours(site, False).values())) for site in ("dense", "mixed")])
        kept = self.metrics.store.query("SELECT json_extract(labels, '$.site'), count(*) FROM samples "
                                        "JOIN series ON id = series_id WHERE seq < 0 GROUP BY labels ORDER BY 1")
        self.assertEqual(kept, [(site, sum(self.closed_hours(site, True).values())) for site in ("mixed", "sparse")])
        # One row a sample for the sparse series, where a rollup row beside each would have made two.
        self.assertEqual(self.metrics.store.query(
            "SELECT (SELECT count(*) FROM samples WHERE series_id = id) + (SELECT count(*) FROM rollups WHERE "
            "series_id = id) FROM series WHERE labels = ?", ('{"site":"sparse"}',)), [(len(self.points["sparse"]),)])
        for hours in (0.5, 1, 6.3, 24, 47.9, 100, 8 * 24):
            # The samples kept for their hours answer as the hourly tier they stand in for.
            self.assertEqual(self.assertExact(hours)["tiers"], ["raw"] if hours <= 1 else ["hourly", "raw"])
        latest = max(self.points["sparse"])
        self.assertEqual(self.metrics.get_metric_stats("m", hours=HOUR)["count"], sum(map(len, self.points.values())))
        self.assertEqual(self.metrics.store.query("SELECT value FROM samples JOIN series ON id = series_id WHERE "
                                                  "labels = ? ORDER BY ts DESC LIMIT 1", ('{"site":"sparse"}',)),
                         [(latest[1],)])

        report = self.metrics.cleanup()  # raw retention two days, hours kept five
        cutoff = mm.bucket_start(self.clock.now - 2 * DAY)
        self.assertEqual(report["deleted_samples"], sum(
            n for site in ("dense", "mixed") for hour, n in self.closed_hours(site, False).items() if hour < cutoff))
        day_edge = mm.bucket_start(self.clock.now - 5 * DAY, DAY)
        self.assertEqual(self.metrics.store.meta_times("daily_until")[0], day_edge)
        self.assertEqual(self.metrics.store.query("SELECT count(*) FROM samples WHERE ts < ?", (day_edge,)), [(0,)])
        self.assertEqual(self.metrics.store.query("SELECT min(ts) >= ? FROM samples WHERE seq < 0", (day_edge,)),
                         [(1,)])
        since = mm.bucket_start(self.clock.now - 7 * DAY, DAY)
        # Past the raw retention a window starts on an hour (or a day, past the hourly horizon).
        for hours in (0.5, 24, 47.9, 72 + 17 / 3600, 100 + 17 / 3600, (self.clock.now - since) / HOUR):
            self.assertExact(hours)
        for site in self.points:  # each series alone, through its labels' own name
            self.metrics.record_many([(f"m_{site}", v, None, ts) for ts, v in self.points[site]])
        self.metrics.cleanup()
        self.assertEqual(self.metrics.get_metric_stats("m_sparse", hours=3 * 24 + 17 / 3600)["count"],
                         sum(1 for ts, _ in self.points["sparse"] if ts >= self.clock.now - 3 * DAY - 17))

    def test_the_small_hours_at_the_edges_of_a_busy_stretch_get_rollup_rows(self):
        metrics = self.collector(self.clock, db_path=os.path.join(self.tmp, "laptop.db"), maintain=False)
        start = mm.bucket_start(self.clock.now - DAY)
        # One a minute, asleep from 02:01 to 05:58: 02:00 and 05:00 hold two samples each, between busy hours.
        points = [(start + 60.0 * i + 0.5, float(i % 7)) for i in range(24 * 60)
                  if not 2 * HOUR + 120 <= 60.0 * i < 5 * HOUR + 58 * 60]
        metrics.record_many([("awake", v, None, ts) for ts, v in points])
        metrics.roll_up()
        self.assertEqual(metrics.store.query("SELECT count(*) FROM raw_kept"), [(0,)])
        self.assertEqual(metrics.store.query("SELECT n FROM rollups WHERE bucket IN (?, ?) ORDER BY bucket",
                                             (start + 2 * HOUR, start + 5 * HOUR)), [(2,), (2,)])
        traced = []
        metrics.store.connection.set_trace_callback(traced.append)
        self.assertEqual(metrics.get_metric_stats("awake", hours=24)["count"],
                         sum(1 for ts, _ in points if ts >= self.clock.now - DAY))
        # The lookup for samples kept raw finds no series: no sample of this one is read for it.
        self.assertEqual(sum("seq < 0" in sql for sql in traced), 2)

    def test_a_late_sample_for_a_small_hour_or_an_empty_one_is_counted_once(self):
        self.metrics.roll_up()
        one = next(hour for hour, n in self.closed_hours("sparse", True).items() if n == 1)
        empty = one + HOUR  # the sparse site writes every third hour
        for ts in (one + 7.5, empty + 3.0, one + 9.0):
            value = 1000.0 + ts % 100
            self.metrics.record("m", value, {"site": "sparse"}, ts)
            self.points["sparse"].append((ts, value))
            for hours in (24, 8 * 24):
                self.assertExact(hours)
        self.metrics.cleanup()
        self.assertExact(3 * 24 + 17 / 3600)
        self.assertExact((self.clock.now - mm.bucket_start(self.clock.now - 8 * DAY, DAY)) / HOUR)

    def test_where_hours_fold_before_raw_samples_expire_the_kept_ones_stay_as_plain_raw_samples(self):
        metrics = self.collector(self.clock, db_path=os.path.join(self.tmp, "short.db"), retention_days=3,
                                 hourly_days=1, maintain=False)
        points = sorted(self.points["sparse"])
        metrics.record_many([("s", v, None, ts) for ts, v in points])
        metrics.roll_up()
        twin = next(p for p in points if self.clock.now - 3 * DAY < p[0] < self.clock.now - 2 * DAY)
        metrics.record("s", -1.0, None, twin[0])  # late, at the very instant of a kept sample
        points = sorted(points + [(twin[0], -1.0)])
        metrics.cleanup()
        day_edge, raw_cutoff = mm.bucket_start(self.clock.now - DAY, DAY), mm.bucket_start(self.clock.now - 3 * DAY)
        self.assertEqual(metrics.store.meta_times("daily_until")[0], day_edge)
        self.assertEqual(metrics.store.query("SELECT count(*) FROM samples WHERE seq < 0 AND ts < ?", (day_edge,)),
                         [(0,)])
        # Every sample younger than the raw retention is still there; those of folded days plain again (the
        # twins apart by seq).
        self.assertEqual(sorted(metrics.store.query("SELECT ts, value FROM samples WHERE ts >= ?", (raw_cutoff,))),
                         [p for p in points if p[0] >= raw_cutoff])
        self.assertEqual(metrics.store.query("SELECT count(*), min(seq) FROM samples WHERE ts >= ? AND ts < ?",
                                             (raw_cutoff, day_edge)),
                         [(sum(1 for p in points if raw_cutoff <= p[0] < day_edge), 0)])
        since = mm.bucket_start(self.clock.now - 6 * DAY, DAY)
        stats = metrics.get_metric_stats("s", hours=(self.clock.now - since) / HOUR)
        values = [v for ts, v in points if ts >= since]
        self.assertEqual((stats["count"], stats["min"], stats["tiers"]), (len(values), -1.0, ["daily", "hourly"]))
        self.assertAlmostEqual(stats["avg"], statistics.fmean(values), delta=1e-9)
        self.assertEqual(metrics.store.query("SELECT count(*) FROM raw_kept"), [(1,)])
        self.clock.advance(3 * DAY)
        metrics.cleanup()
        self.assertEqual(metrics.store.query("SELECT count(*) FROM samples WHERE ts < ?", (day_edge,)), [(0,)])
        self.assertEqual(metrics.store.query("SELECT count(*) FROM raw_kept"), [(0,)])  # all of them folded

    def test_a_slice_reads_about_a_slice_of_samples_and_never_splits_an_hour(self):
        clock = FakeClock(1_800_000_000.0 + 60)
        metrics = self.collector(clock, db_path=os.path.join(self.tmp, "dense.db"), maintain=False)
        start = clock.now - 40 * HOUR - 60
        points = [(start + i + 0.5, float(i % 1000)) for i in range(int(40 * HOUR))]  # 144,000 samples at 1 Hz
        metrics.record_many([("fast", v, None, ts) for ts, v in points])

        def assertExact():
            stats = metrics.get_metric_stats("fast", hours=41)
            values = [v for _, v in points]
            self.assertEqual((stats["count"], stats["min"], stats["max"]), (len(values), min(values), max(values)))
            self.assertAlmostEqual(stats["avg"], statistics.fmean(values), delta=1e-9)

        traced = []
        metrics.store.connection.set_trace_callback(traced.append)
        metrics.roll_up(slices=1)
        metrics.store.connection.set_trace_callback(None)
        self.assertEqual(traced.count("BEGIN IMMEDIATE"), 1)
        at, rolled = metrics.store.meta_times("rollup_cursor_ts", "rolled_until")
        self.assertIsNone(rolled)
        self.assertEqual(at, mm.bucket_start(start + mm.ROLLUP_ROWS_PER_SLICE))  # the hour it had started
        done = metrics.store.query("SELECT count(*), sum(n) FROM rollups")[0]
        self.assertEqual(done, (int((at - mm.bucket_start(start)) // HOUR), sum(1 for ts, _ in points if ts < at)))
        assertExact()
        late = (start + 100.25, 5000.0)  # in an hour that slice did
        metrics.record("fast", late[1], None, late[0])
        points.append(late)
        assertExact()
        self.assertGreater(metrics.roll_up(), 0)
        self.assertEqual(metrics.store.meta_times("rollup_cursor", "rollup_cursor_ts", "rolled_until"),
                         (None, None, mm.bucket_start(clock.now - 60)))
        assertExact()
        self.assertEqual(metrics.store.query("SELECT max(n) FROM rollups"), [(3601,)])

    def test_a_bulk_import_is_read_once_a_series_whatever_its_days(self):
        start = self.clock.now - 90 * DAY
        metrics = self.collector(self.clock, db_path=os.path.join(self.tmp, "bulk.db"), maintain=False)
        metrics.record_many((f"imported_{i}", float(day), None, start + day * DAY + i) for day in range(90)
                            for i in range(50))
        traced = []
        metrics.store.connection.set_trace_callback(traced.append)
        metrics.roll_up()
        statements = [sql for sql in traced if sql.split()[0] in ("SELECT", "INSERT", "UPDATE", "DELETE")]
        self.assertEqual(sum(sql.startswith("SELECT ts, seq, value FROM samples") for sql in statements), 50)
        # Each sample alone in its hour is kept, one update each; everything else is per series, not per day.
        self.assertEqual(sum(sql.startswith("UPDATE samples") for sql in statements), 90 * 50)
        self.assertLess(sum(not sql.startswith("UPDATE samples") for sql in statements), 50 * 3)
        self.assertEqual(metrics.store.query("SELECT count(*) FROM samples WHERE seq < 0"), [(90 * 50,)])
        self.assertEqual(metrics.get_metric_stats("imported_7", hours=91 * 24)["count"], 90)


class CleanupCommandTest(StoreTestCase):
    def test_text_json_and_quiet(self):
        old = mm.bucket_start(time.time() - 40 * DAY) + 60  # 100 seconds inside one hour, whenever this runs
        with self.collector(maintain=False) as metrics:
            metrics.record_many([("m", float(i), None, old + i) for i in range(100)])
        result = self.run_cli("--db", self.db, "cleanup")
        self.assertCleanExit(result, stdout="cleanup: rolled up 1 hours; deleted 100 raw samples older than 30 days; "
                                            "folded 0 hours into 0 days; deleted 0 daily rollups, 0 retry records, 0 job runs and "
                                            "0 alerts of the history\n")
        result = self.run_cli("--db", self.db, "cleanup", "--json")
        self.assertCleanExit(result, stdout=None)
        self.assertEqual(json.loads(result.stdout), {
            "rolled_up_hours": 0, "deleted_samples": 0, "folded_hours": 0, "daily_rollups": 0, "deleted_days": 0,
            "deleted_retry_records": 0,
            "deleted_job_runs": 0,
            "deleted_alerts": 0,
            "retention_days": 30.0, "rollup_hourly_days": 365.0, "rollup_daily_days": 0.0,
        })
        self.assertCleanExit(self.run_cli("--db", self.db, "-q", "cleanup"))
        stats = json.loads(self.run_cli("--db", self.db, "stats", "m", "--hours", str(41 * 24), "--json").stdout)
        self.assertEqual((stats["count"], stats["min"], stats["max"], stats["tiers"]), (100, 0.0, 99.0, ["hourly"]))

    def test_horizons_come_from_the_configuration(self):
        config = os.path.join(self.tmp, "c.ini")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("[storage]\nretention_days = 12h\nrollup_hourly_days = 2d\nrollup_daily_days = 400\n")
        result = self.run_cli("--config", config, "--db", self.db, "cleanup", "--json")
        document = json.loads(result.stdout)
        self.assertEqual((document["retention_days"], document["rollup_hourly_days"], document["rollup_daily_days"]),
                         (0.5, 2.0, 400.0))


_LIVE_WRITER = """
import select, sys
import metasystem_monitor as mm
collector = mm.MetricsCollector(sys.argv[1], maintain=False)
print("ready", flush=True)
count = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    collector.record("live", count)
    count += 1
collector.close()
print(count, flush=True)
"""


class LargeCleanupTest(StoreTestCase):
    ROWS = 2_000_000

    def build(self, now):
        """2,000,000 raw samples 31 to 61 days old over four series, and a few recent ones."""
        with mm.Store(self.db) as store, store.write() as conn:
            conn.executemany("INSERT INTO series (id, name, labels) VALUES (?, ?, '{}')",
                             [(i, f"s{i}") for i in range(1, 5)])
            step = 30 * DAY / (self.ROWS / 4)
            start = now - 61 * DAY
            # Row i: series i % 4 + 1, time start + (i // 4) * step, value i % 1009; made by SQLite itself,
            # which is faster than two million Python tuples.
            conn.execute(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1) "
                "INSERT INTO samples (series_id, ts, seq, value) "
                "SELECT i % 4 + 1, ? + (i / 4) * ?, 0, CAST(i % 1009 AS REAL) FROM n",
                (self.ROWS, start, step),
            )
            conn.executemany("INSERT INTO samples (series_id, ts, seq, value) VALUES (?, ?, 0, ?)",
                             [(1, now - d * DAY, 5000.0 + d) for d in range(1, 30)])

    def test_two_million_expired_rows_go_while_another_process_writes(self):
        now = time.time()
        self.build(now)
        metrics = self.collector(maintain=False)
        metrics.store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size_before = os.path.getsize(self.db)
        before = {hours: metrics.get_metric_stats("s1", hours=hours) for hours in (30 * 24, 90 * 24)}
        writer = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, self.db], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=self.child_env())
        self.addCleanup(lambda: writer.poll() is None and writer.kill())
        self.assertEqual(writer.stdout.readline(), b"ready\n")
        report = metrics.cleanup()
        out, err = writer.communicate(b"stop\n", timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((writer.returncode, err), (0, b""))
        written = int(out)
        self.assertGreater(written, 0)
        self.assertEqual(report["deleted_samples"], self.ROWS)
        self.assertEqual(metrics.store.query("SELECT count(*) FROM samples WHERE series_id <= 4"), [(29,)])
        live = metrics.store.query("SELECT count(*), min(value), max(value) FROM samples JOIN series ON id = series_id "
                                   "WHERE name = 'live'")
        self.assertEqual(live, [(written, 0.0, written - 1.0)])
        for hours, was in before.items():
            with self.subTest(hours=hours):
                now_stats = metrics.get_metric_stats("s1", hours=hours)
                self.assertEqual((now_stats["count"], now_stats["min"], now_stats["max"]),
                                 (was["count"], was["min"], was["max"]))
                self.assertAlmostEqual(now_stats["avg"], was["avg"], delta=1e-9 * was["avg"])
        self.assertEqual(before[90 * 24]["count"], self.ROWS // 4 + 29)
        self.assertEqual(sqlite_rows(self.db, "PRAGMA quick_check"), [("ok",)])
        # The freed pages go back to the file system once a checkpoint completes (not
        # while another process still reads), and the WAL, grown by the purge, is cut
        # back to its limit when it restarts.
        metrics.record("after", 1.0)
        metrics.store.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        metrics.record("after", 2.0)
        metrics.store.connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.assertGreater(size_before, 40_000_000)
        free_pages, pages = (sqlite_rows(self.db, f"PRAGMA {pragma}")[0][0] for pragma in ("freelist_count", "page_count"))
        self.assertLess(free_pages, 64)
        self.assertEqual(os.path.getsize(self.db), pages * 4096)
        self.assertLess(os.path.getsize(self.db), size_before / 4)  # what is left is rollups and the writer's samples
        self.assertLessEqual(os.path.getsize(self.db + "-wal"), mm.WAL_SIZE_LIMIT_BYTES + 65536)
        again = metrics.cleanup()
        self.assertEqual(again["deleted_samples"] + again["folded_hours"] + again["deleted_days"], 0)
