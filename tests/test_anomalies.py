"""Anomaly detection: the pure functions, the store-backed detector, and the CLI."""

import json
import random
import statistics
import time
import unittest

import metasystem_monitor as mm

from .support import FakeClock, StoreTestCase

REGULAR = [10, 11, 9, 10, 12, 10, 11, 9, 10, 11]
ONE_SPIKE = REGULAR * 3 + [60]
THREE_HIGH = [10, 11, 9, 10, 12, 10, 11, 50, 50, 50]


def points(values, start=1_800_000_000.0, step=60.0):
    return [(start + i * step, float(v)) for i, v in enumerate(values)]


class PureDetectorTest(unittest.TestCase):
    def flagged(self, values, method, **kwargs):
        return [p["value"] for p in mm.find_anomalies(points(values), method, **kwargs)]

    def test_one_spike_is_flagged_alone_by_both_methods(self):
        for method in mm.ANOMALY_METHODS:
            with self.subTest(method=method):
                self.assertEqual(self.flagged(ONE_SPIKE, method), [60.0])

    def test_three_outliers_hide_from_the_zscore_but_not_from_the_robust_default(self):
        report = mm.find_anomalies(points(THREE_HIGH), "zscore")
        self.assertEqual(list(report), [])
        self.assertLess(max(abs(mm.anomaly_score(v, report.baseline)) for v in THREE_HIGH), 2.0)
        self.assertEqual(self.flagged(THREE_HIGH, "robust"), [50.0, 50.0, 50.0])

    def test_five_samples_are_insufficient_data_not_no_anomalies(self):
        # With 5 samples no z-score can reach 2.0: (n - 1) / sqrt(n) = 1.79.
        zscores = mm.zscore_baseline([10.0, 10.0, 10.0, 10.0, 60.0])
        self.assertAlmostEqual(mm.anomaly_score(60.0, zscores), 4 / 5 ** 0.5)
        for method in mm.ANOMALY_METHODS:
            with self.subTest(method=method):
                report = mm.find_anomalies(points([10, 10, 10, 10, 60]), method)
                self.assertEqual((list(report), report.insufficient_data, report.n), ([], True, 5))
                self.assertEqual(report.as_json()["baseline"], {"n": 5})
        self.assertEqual(self.flagged([10, 10, 10, 10, 60], "robust", min_samples=5), [60.0])

    def test_a_flat_series_flags_nothing(self):
        for method in mm.ANOMALY_METHODS:
            with self.subTest(method=method):
                report = mm.find_anomalies(points([7.5] * 1000), method)
                self.assertEqual((list(report), report.insufficient_data), ([], False))

    def test_mad_of_zero_falls_back_to_the_mean_absolute_deviation(self):
        report = mm.find_anomalies(points([10] * 999 + [60]), "robust")
        self.assertEqual(report.baseline.basis, "mean_absolute_deviation")
        self.assertEqual(report.baseline.describe(), {"n": 1000, "median": 10.0, "mad": 0.0,
                                                      "mean_absolute_deviation": 0.05})
        (point,) = report
        self.assertAlmostEqual(point["score"], 50 / (1.253314 * 0.05))
        self.assertEqual(point["reason"], "modified z-score 797.88 above the median 10 "
                                          "(from the mean absolute deviation; MAD is 0)")

    def test_a_flat_baseline_flags_any_other_value_without_a_score(self):
        history = mm.robust_baseline([4.0] * 50)
        self.assertEqual((history.basis, history.divisor), ("flat", 0.0))
        self.assertTrue(mm.is_anomalous(4.5, history, 3.5))
        self.assertFalse(mm.is_anomalous(4.0, history, 3.5))
        self.assertIsNone(mm.anomaly_score(4.5, history))
        (point,) = mm.flag_points([(1.0, 4.5), (2.0, 4.0)], history, 3.5)
        self.assertEqual((point["score"], point["reason"]), (None, "flat baseline: every other value is 4"))

    def test_anomaly_reason_says_what_flag_points_says(self):
        for baseline, value in ((mm.zscore_baseline([1.0, 2.0, 3.0, 2.0]), -9.0),
                                (mm.robust_baseline([10.0] * 9 + [60.0]), 60.0),
                                (mm.robust_baseline([1.0, 2.0, 3.0, 4.0, 5.0]), 40.0),
                                (mm.robust_baseline([4.0] * 9), 4.5)):
            with self.subTest(basis=baseline.basis):
                (point,) = mm.flag_points([(0.0, value)], baseline, 0.1)
                self.assertEqual(mm.anomaly_reason(value, baseline), point["reason"])
        self.assertEqual(mm.anomaly_reason(-9.0, mm.zscore_baseline([1.0, 2.0, 3.0, 2.0])),
                         "13.47 standard deviations below the mean 2")

    def test_result_shape_keeps_the_original_keys(self):
        (point,) = mm.find_anomalies(points(ONE_SPIKE), "zscore")
        self.assertEqual(sorted(point), ["method", "reason", "score", "time", "timestamp", "value", "z_score"])
        self.assertEqual((point["timestamp"], point["time"]), (1_800_001_800.0, "2027-01-15T08:30:00.000+00:00"))
        self.assertEqual(point["z_score"], point["score"])

    def test_pure_noise(self):
        rng = random.Random(3)
        noise = [rng.gauss(100.0, 5.0) for _ in range(10_000)]
        zscore = len(mm.find_anomalies(points(noise, step=1.0), "zscore"))
        robust = len(mm.find_anomalies(points(noise, step=1.0), "robust"))
        self.assertGreater(zscore, 300)  # |z| > 2 is about 4.6 % of a normal sample
        self.assertLess(robust, 20)  # |modified z| > 3.5 is about 0.05 %

    def test_bad_settings_are_refused(self):
        cases = [
            (dict(method="iqr"), "anomaly method must be one of robust, zscore, got 'iqr'"),
            (dict(threshold=0), "threshold must be positive, got 0.0"),
            (dict(threshold=float("nan")), "threshold must be a finite number, got nan"),
            (dict(min_samples=1), "min_samples must be a whole number of at least 2, got 1"),
        ]
        for kwargs, message in cases:
            with self.subTest(message=message):
                with self.assertRaises(mm.ValidationError) as caught:
                    mm.find_anomalies(points(ONE_SPIKE), **kwargs)
                self.assertEqual(str(caught.exception), message)


class MedianAbsoluteDeviationTest(unittest.TestCase):
    def test_agrees_with_sorting_the_deviations(self):
        rng = random.Random(11)
        for trial in range(400):
            n = rng.randint(1, 60)
            values = sorted(rng.choice([rng.randint(0, 5), rng.uniform(-3, 3)]) for _ in range(n))
            median = statistics.median(values)
            expected = statistics.median([abs(v - median) for v in values])
            with self.subTest(trial=trial, values=values):
                self.assertEqual(mm.median_absolute_deviation(values, median), expected)
                self.assertEqual(mm.robust_baseline(values).center, median)


class StoreDetectorTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock(1_800_000_123.0)
        self.metrics = self.collector(self.clock)

    def record(self, name, values, step=60.0):
        start = self.clock.now - len(values) * step
        samples = points(values, start=start, step=step)
        self.metrics.record_many([(name, v, None, ts) for ts, v in samples])
        return samples

    def test_the_original_call_is_a_zscore_at_two(self):
        self.record("m", ONE_SPIKE)
        anomalies = self.metrics.detect_anomalies(metric_name="m", hours=24, std_dev_threshold=2.0)
        self.assertEqual([(a["value"], a["method"]) for a in anomalies], [(60.0, "zscore")])
        self.assertEqual(self.metrics.detect_anomalies("m", std_dev_threshold=6.0), [])
        self.assertEqual(self.metrics.detect_anomalies("m", method="robust")[0]["value"], 60.0)

    def test_store_and_pure_detectors_agree_across_rollups(self):
        rng = random.Random(5)
        values = [rng.gauss(50, 4) for _ in range(3000)] + [90.0, 10.0]
        rng.shuffle(values)
        samples = self.record("m", values, step=20.0)
        self.metrics.roll_up()
        for method in mm.ANOMALY_METHODS:
            with self.subTest(method=method):
                stored = self.metrics.detect_anomalies("m", hours=24, method=method)
                pure = mm.find_anomalies(samples, method)
                self.assertEqual([p["timestamp"] for p in stored], [p["timestamp"] for p in pure])
                self.assertIn(90.0, [p["value"] for p in stored])
                for key in ("n",):
                    self.assertEqual(stored.baseline.describe()[key], pure.baseline.describe()[key])
                self.assertAlmostEqual(stored.baseline.center, pure.baseline.center, delta=1e-9)
                self.assertAlmostEqual(stored.baseline.divisor, pure.baseline.divisor, delta=1e-9)

    def test_large_windows_agree_with_the_pure_detector(self):
        rng = random.Random(8)
        cases = {
            "gauss": [rng.gauss(50, 4) for _ in range(25_000)] + [95.0, 3.0],
            "ties": [float(rng.randint(0, 6)) for _ in range(25_001)] + [40.0],
            "mostly_equal": [10.0] * 24_000 + [rng.uniform(0, 20) for _ in range(1_000)] + [60.0],
        }
        for label, values in cases.items():
            with self.subTest(data=label):
                samples = self.record(label, values, step=3.0)
                stored = self.metrics.detect_anomalies(label, hours=24, method="robust")
                pure = mm.find_anomalies(samples, "robust")
                self.assertEqual(stored.baseline, pure.baseline)
                self.assertEqual([p["timestamp"] for p in stored], [p["timestamp"] for p in pure])

    def test_an_empty_window_is_insufficient_data(self):
        report = self.metrics.detect_anomalies("nothing", method="robust")
        self.assertEqual((list(report), report.insufficient_data, report.n), ([], True, 0))


class AnomaliesCommandTest(StoreTestCase):
    def record_now(self, values):
        now = time.time()
        with self.collector() as metrics:
            metrics.record_many([("lat", float(v), None, now - 3600 + i * 60) for i, v in enumerate(values)])
        return now - 3600

    def test_text_output_defaults_to_robust(self):
        start = self.record_now(ONE_SPIKE)
        result = self.run_cli("--db", self.db, "anomalies", "lat")
        self.assertCleanExit(result, stdout=(
            "lat (last 24h, times UTC): 1 anomaly among 31 samples (robust, threshold 3.5; median 10, mad 1)\n"
            f"  {mm.local_time(start + 30 * 60, seconds=True)}  60  modified z-score 33.73 above the median 10\n"
        ))

    def test_json_output(self):
        start = self.record_now(THREE_HIGH)
        result = self.run_cli("--db", self.db, "anomalies", "lat", "--json", "--hours", "2")
        self.assertCleanExit(result, stdout=None)
        document = json.loads(result.stdout)
        self.assertEqual(list(document), sorted(document))
        self.assertEqual({key: value for key, value in document.items() if key != "anomalies"}, {
            "name": "lat", "hours": 2.0, "method": "robust", "threshold": 3.5, "insufficient_data": False,
            "min_samples": 8, "baseline": {"n": 10, "median": 11.0, "mad": 1.0},
        })
        self.assertEqual(document["anomalies"][0], {
            "time": mm.iso_time(start + 7 * 60), "timestamp": start + 7 * 60, "value": 50.0,
            "score": 0.6745 * 39, "reason": "modified z-score 26.31 above the median 11",
        })
        self.assertEqual(len(document["anomalies"]), 3)
        zscore = json.loads(self.run_cli("--db", self.db, "anomalies", "lat", "--json", "--method", "zscore").stdout)
        self.assertEqual((zscore["anomalies"], zscore["threshold"], sorted(zscore["baseline"])),
                         ([], 2.0, ["mean", "n", "stddev"]))

    def test_insufficient_data(self):
        self.record_now([10, 10, 10, 10, 60])
        self.assertCleanExit(self.run_cli("--db", self.db, "anomalies", "lat"),
                             stdout="lat (last 24h, times UTC): insufficient data: 5 samples, at least 8 needed\n")
        document = json.loads(self.run_cli("--db", self.db, "anomalies", "lat", "--json").stdout)
        self.assertEqual((document["insufficient_data"], document["anomalies"], document["baseline"]),
                         (True, [], {"n": 5}))

    def test_bad_arguments(self):
        cases = [
            (("--method", "iqr"), "invalid choice: 'iqr'"),
            (("--threshold", "0"), "threshold must be positive, got 0.0"),
            (("--threshold", "x"), "--threshold 'x' is not a number"),
            (("--min-samples", "1"), "min_samples must be a whole number of at least 2, got 1"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                self.assertOneLineError(self.run_cli("--db", self.db, "anomalies", "lat", *args), 2, message)


if __name__ == "__main__":
    unittest.main()
