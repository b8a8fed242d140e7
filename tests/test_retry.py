"""AdaptiveRetry: the original examples, jitter, classification, deadlines, Retry-After, budget, learning.

No test here sleeps: time.sleep raises for the whole module, and every retry gets a fake one.
"""

import contextlib
import email.message
import errno
import functools
import io
import math
import random
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import unittest
from email.utils import format_datetime
from datetime import datetime, timezone
from urllib.error import HTTPError, URLError

import metasystem_monitor as mm

from .support import SUBPROCESS_TIMEOUT_S, FakeClock, StoreTestCase, forbid_real_sleep

setUpModule, tearDownModule = forbid_real_sleep()


def http_error(code, retry_after=None):
    headers = email.message.Message()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return HTTPError("http://127.0.0.1/x", code, "status", headers, None)


class Failing:
    """A callable that raises the given errors in turn, then returns 'ok'; it advances the clock."""

    def __init__(self, *errors, clock=None, cost_s=0.0):
        self.errors = list(errors)
        self.calls = 0
        self.clock = clock
        self.cost_s = cost_s

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.clock is not None:
            self.clock.advance(self.cost_s)
        if self.errors:
            error = self.errors.pop(0)
            raise error() if isinstance(error, type) else error
        return "ok"


class RetryTestCase(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock()

    def retry(self, config=None, seed=1234, **kwargs):
        collector = self.collector(self.clock)
        return mm.AdaptiveRetry(config, collector=collector, clock=self.clock.monotonic, now=self.clock.time,
                                sleep=self.clock.sleep, rng=random.Random(seed), **kwargs)

    def attempt_rows(self, retry, operation):
        return retry.store.query("SELECT attempt, error, category FROM retry_attempts WHERE operation = ? "
                                 "ORDER BY ts, attempt", (operation,))


class OriginalDocumentExamplesTest(RetryTestCase):
    """The AdaptiveRetry section of PHASE_17_IMPLEMENTATION_SUMMARY.md, as written there."""

    EXAMPLE = textwrap.dedent(
        """
        retry = AdaptiveRetry()

        # Simple retry with defaults (3 attempts)
        result = retry.retry('fetch_data', fetch_data_function, url='...')

        # Custom retry config
        config = RetryConfig(
            max_attempts=5,
            initial_backoff=2.0,
            max_backoff=120.0,
            backoff_multiplier=2.0,
            use_jitter=True
        )
        retry_custom = AdaptiveRetry(config)
        result = retry_custom.retry('slow_operation', operation_func)

        # Async version (returns None on failure instead of raising)
        result = retry.retry_async('operation', func)
        if result is None:
            print("Operation failed after all retries")

        # Get retry statistics
        stats = retry.get_retry_stats('fetch_data', hours=24)
        print(f"Success rate: {stats['success_rate']:.1f}%")
        print(f"Common errors: {stats['common_errors']}")

        # Analyze failure patterns
        analysis = retry.analyze_failures('fetch_data')
        """
    )

    def test_the_examples_run_and_say_what_the_document_says(self):
        collector = self.collector(self.clock)
        factory = functools.partial(mm.AdaptiveRetry, collector=collector, clock=self.clock.monotonic,
                                    now=self.clock.time, sleep=self.clock.sleep, rng=random.Random(1))
        fetch = Failing(ConnectionResetError)
        slow = Failing(TimeoutError, TimeoutError, TimeoutError)
        dead = Failing(*[ConnectionRefusedError] * 10)
        namespace = {"AdaptiveRetry": factory, "RetryConfig": mm.RetryConfig, "fetch_data_function": fetch,
                     "operation_func": slow, "func": dead}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(self.EXAMPLE, "<seed example>", "exec"), namespace)
        self.assertEqual(out.getvalue(), "Operation failed after all retries\n"
                                         "Success rate: 100.0%\n"
                                         "Common errors: [('ConnectionResetError', 1)]\n")
        self.assertEqual((fetch.calls, slow.calls, dead.calls), (2, 4, 3))
        self.assertEqual(namespace["result"], None)
        self.assertEqual({key: namespace["analysis"][key] for key in
                          ("total_failures", "transient", "permanent", "transient_rate")},
                         {"total_failures": 1, "transient": 1, "permanent": 0, "transient_rate": 100.0})
        self.assertIsInstance(namespace["analysis"]["recommendation"], str)

    def test_the_documented_backoff(self):
        # Attempt 1: Fail, wait 1.0s +/- 0.2s; attempt 2: 2.0s +/- 0.4s; attempt 3: 4.0s +/- 0.8s ... max 60 s.
        collector = self.collector(self.clock)
        for seed in range(200):
            retry = mm.AdaptiveRetry(mm.RetryConfig(max_attempts=9, budget=False), collector=collector,
                                     sleep=self.clock.sleep, clock=self.clock.monotonic, now=self.clock.time,
                                     rng=random.Random(seed))
            with self.assertRaises(ConnectionResetError) as caught:
                retry.retry("documented", Failing(*[ConnectionResetError] * 9))
            delays = caught.exception.retry_info.delays
            with self.subTest(seed=seed):
                for nominal, delay in zip((1, 2, 4, 8, 16, 32, 60, 60), delays):
                    self.assertGreaterEqual(delay, 0.8 * nominal)
                    self.assertLessEqual(delay, min(1.2 * nominal, 60.0))

    def test_scenario_two_on_a_fresh_store(self):
        analysis = self.retry().analyze_failures("sync_icloud")
        self.assertFalse(analysis["transient_rate"] > 50)  # the document's own check must not fail


class SleepGuardTest(unittest.TestCase):
    """This module forbids time.sleep; the standard library waiting on a real child is not a test sleeping."""

    def test_a_sleep_in_the_test_raises_and_a_wait_on_a_child_does_not(self):
        with self.assertRaisesRegex(AssertionError, r"time.sleep\(0.01\) was called in a test"):
            time.sleep(0.01)
        # The child closes its pipes, then lives on a moment: communicate() ends in Popen.wait(timeout),
        # which polls with time.sleep (3.9 to 3.13) - once a failure of whichever test hit that race.
        child = "import os, time; os.close(1); os.close(2); time.sleep(0.2)"
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""))


class JitterTest(unittest.TestCase):
    DRAWS = 10_000

    def draws(self, mode, k, seed=99, cap=60.0):
        rng = random.Random(seed)
        nominal = mm.nominal_delay(k, 1.0, 2.0, cap)
        return nominal, [mm.jittered_delay(nominal, mode, rng, cap=cap, initial=1.0, previous=nominal)
                         for _ in range(self.DRAWS)]

    @staticmethod
    def ks_statistic(values, low, high):
        ordered = sorted(values)
        n = len(ordered)
        return max(max((i + 1) / n - (v - low) / (high - low), (v - low) / (high - low) - i / n)
                   for i, v in enumerate(ordered))

    def test_proportional_jitter_is_uniform_inside_the_cap(self):
        for k in range(1, 10):
            nominal, delays = self.draws("proportional", k)
            low, high = 0.8 * nominal, min(1.2 * nominal, 60.0)
            with self.subTest(k=k, nominal=nominal):
                self.assertGreaterEqual(min(delays), low)
                self.assertLessEqual(max(delays), high)
                self.assertAlmostEqual(sum(delays) / len(delays), (low + high) / 2, delta=0.02 * (low + high) / 2)
                self.assertLess(self.ks_statistic(delays, low, high), 1.628 / math.sqrt(self.DRAWS))  # p > 0.01
                self.assertLessEqual(sum(d == 60.0 for d in delays), self.DRAWS // 100)  # no pile-up at the cap

    def test_full_jitter(self):
        for k in (1, 3, 7, 9):
            nominal, delays = self.draws("full", k)
            with self.subTest(k=k):
                self.assertGreaterEqual(min(delays), 0.0)
                self.assertLessEqual(max(delays), nominal)
                self.assertAlmostEqual(sum(delays) / len(delays), nominal / 2, delta=0.02 * nominal / 2)

    def test_decorrelated_jitter_stays_inside_the_cap(self):
        rng, previous, delays = random.Random(5), 1.0, []
        for _ in range(self.DRAWS):
            previous = mm.jittered_delay(1.0, "decorrelated", rng, cap=60.0, initial=1.0, previous=previous)
            delays.append(previous)
        self.assertGreaterEqual(min(delays), 1.0)
        self.assertLessEqual(max(delays), 60.0)
        self.assertLessEqual(sum(d == 60.0 for d in delays), self.DRAWS // 100)

    def test_nominal_delay_never_overflows(self):
        self.assertEqual(mm.nominal_delay(10_000, 1.0, 2.0, 60.0), 60.0)
        self.assertEqual(mm.nominal_delay(3, 1.0, 1.0, 60.0), 1.0)


class DeterminismTest(RetryTestCase):
    def test_the_same_seed_gives_the_same_delays(self):
        runs = []
        for _ in range(2):
            retry = self.retry(mm.RetryConfig(max_attempts=6, jitter="full", budget=False), seed=1234)
            with self.assertRaises(TimeoutError) as caught:
                retry.retry("op", Failing(*[TimeoutError] * 6))
            runs.append(caught.exception.retry_info.delays)
        self.assertEqual(runs[0], runs[1])
        self.assertEqual(len(runs[0]), 5)


class ClassificationTest(RetryTestCase):
    PERMANENT = [
        PermissionError(errno.EACCES, "denied"), FileNotFoundError(errno.ENOENT, "gone"),
        OSError(errno.ENOSPC, "full"), OSError(errno.EROFS, "read-only"), OSError(errno.EDQUOT, "quota"),
        http_error(400), http_error(401), http_error(403), http_error(404), http_error(410), http_error(422),
        ValueError("bad"), TypeError("bad"), KeyError("k"), mm.ValidationError("bad"),
        socket.gaierror(socket.EAI_NONAME, "unknown host"),
    ]
    TRANSIENT = [
        ConnectionResetError(), ConnectionRefusedError(), ConnectionAbortedError(), BrokenPipeError(),
        TimeoutError(), socket.timeout(), BlockingIOError(), socket.gaierror(socket.EAI_AGAIN, "try again"),
        sqlite3.OperationalError("database is locked"), mm.StorageError("store x is locked by another process"),
        http_error(408), http_error(429), http_error(500), http_error(502), http_error(503), http_error(504),
        URLError(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), URLError("timed out"),
        OSError(errno.EHOSTUNREACH, "no route"),
    ]

    def test_permanent_errors_get_one_attempt_and_no_sleep(self):
        for error in self.PERMANENT:
            with self.subTest(error=repr(error)):
                self.assertEqual(mm.classify_error(error), "permanent")
                retry = self.retry()
                op = Failing(error, error, error)
                with self.assertRaises(type(error)):
                    retry.retry("p", op)
                self.assertEqual((op.calls, self.clock.slept), (1, []))
                self.assertEqual(self.attempt_rows(retry, "p")[-1][2], "permanent")

    def test_transient_errors_are_retried(self):
        for number, error in enumerate(self.TRANSIENT):
            with self.subTest(error=repr(error)):
                self.assertEqual(mm.classify_error(error), "transient")
                retry = self.retry()
                op = Failing(error, error)
                operation = f"t{number}"  # each its own retry budget
                self.assertEqual(retry.retry(operation, op), "ok")
                self.assertEqual(op.calls, 3)
                self.assertEqual([row[1:] for row in self.attempt_rows(retry, operation)],
                                 [(type(error).__name__, "transient")] * 2 + [("", "")])

    def test_unknown_errors_are_retried_like_the_original(self):
        self.assertEqual(mm.classify_error(RuntimeError("?")), "unknown")
        op = Failing(RuntimeError, RuntimeError, RuntimeError)
        with self.assertRaises(RuntimeError):
            self.retry().retry("u", op)
        self.assertEqual(op.calls, 3)

    def test_the_classifier_can_be_overridden_per_operation(self):
        retry = self.retry(classifiers={"strict": lambda error: "permanent"})
        strict, other = Failing(ConnectionResetError), Failing(ConnectionResetError)
        with self.assertRaises(ConnectionResetError):
            retry.retry("strict", strict)
        self.assertEqual(retry.retry("other", other), "ok")
        self.assertEqual((strict.calls, other.calls), (1, 2))


class DeadlineTest(RetryTestCase):
    def test_no_sleep_crosses_the_deadline(self):
        collector = self.collector(self.clock)
        worst = 0.0
        for seed in range(1000):
            rng = random.Random(seed)
            deadline, cost = rng.uniform(2.0, 40.0), rng.uniform(0.0, 2.0)
            config = mm.RetryConfig(max_attempts=6, deadline=deadline, budget=False,
                                    jitter=rng.choice(["proportional", "full", "decorrelated"]))
            retry = mm.AdaptiveRetry(config, collector=collector, clock=self.clock.monotonic, now=self.clock.time,
                                     sleep=self.clock.sleep, rng=rng)
            op = Failing(*[TimeoutError] * 6, clock=self.clock, cost_s=cost)
            start = self.clock.now
            with self.assertRaises(TimeoutError) as caught:
                retry.retry("deadline", op)
            info = caught.exception.retry_info
            with self.subTest(seed=seed):
                self.assertLessEqual(info.total_sleep + (op.calls - 1) * cost, deadline)
                self.assertLessEqual(self.clock.now - start - cost, deadline)
                self.assertIn(info.stop_reason, ("deadline", "exhausted"))
            worst = max(worst, info.total_sleep)
        self.assertLessEqual(worst, 37.2)  # the documented worst case of six attempts, capped at 60 s

    def test_refusal_without_sleep_when_the_first_delay_would_cross(self):
        retry = self.retry(mm.RetryConfig(deadline=0.5, budget=False))
        with self.assertRaises(TimeoutError) as caught:
            retry.retry("short", Failing(TimeoutError, TimeoutError))
        self.assertEqual((caught.exception.retry_info.stop_reason, self.clock.slept), ("deadline", []))


class RetryAfterTest(RetryTestCase):
    def test_seconds_are_a_floor(self):
        retry = self.retry(mm.RetryConfig(max_attempts=2, budget=False))
        self.assertEqual(retry.retry("ra", Failing(http_error(429, "7"))), "ok")
        self.assertEqual(self.clock.slept, [7.0])

    def test_an_http_date_is_read_against_the_injected_wall_clock(self):
        when = datetime.fromtimestamp(self.clock.now + 30, timezone.utc)
        retry = self.retry(mm.RetryConfig(max_attempts=2, budget=False))
        retry.retry("ra", Failing(http_error(503, format_datetime(when, usegmt=True))))
        self.assertEqual(self.clock.slept, [30.0])

    def test_an_attribute_set_by_the_callee(self):
        error = ConnectionResetError()
        error.retry_after = 4.5
        retry = self.retry(mm.RetryConfig(max_attempts=2, budget=False))
        retry.retry("ra", Failing(error))
        self.assertEqual(self.clock.slept, [4.5])

    def test_an_unreadable_value_falls_back_to_backoff(self):
        retry = self.retry(mm.RetryConfig(max_attempts=2, budget=False))
        retry.retry("ra", Failing(http_error(503, "soon, maybe")))
        self.assertEqual(len(self.clock.slept), 1)
        self.assertTrue(0.8 <= self.clock.slept[0] <= 1.2)

    def test_too_long_fails_at_once_with_the_value_asked_for(self):
        for config, asked, limit in ((mm.RetryConfig(budget=False), "3600", 300.0),
                                     (mm.RetryConfig(deadline=20.0, budget=False), "25", 20.0)):
            with self.subTest(asked=asked):
                retry = self.retry(config)
                original = http_error(429, asked)
                op = Failing(original, original)
                with self.assertRaises(mm.RetryAfterTooLong) as caught:
                    retry.retry("ra", op)
                self.assertEqual((caught.exception.retry_after, caught.exception.limit), (float(asked), limit))
                self.assertIs(caught.exception.__cause__, original)
                self.assertEqual((op.calls, self.clock.slept), (1, []))
                self.assertEqual(original.retry_info.stop_reason, "retry_after")

    def test_parse_retry_after(self):
        self.assertEqual(mm.parse_retry_after(" 12 ", now=0.0), 12.0)
        self.assertEqual(mm.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0), 10.0)
        self.assertEqual(mm.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0), 0.0)
        for bad in ("-3", "soon", "", None, True, float("nan")):
            with self.subTest(bad=bad):
                self.assertIsNone(mm.parse_retry_after(bad, now=0.0))


class OriginalExceptionTest(RetryTestCase):
    def test_the_last_error_itself_is_raised_with_the_outcome_attached(self):
        errors = [ConnectionResetError("one"), ConnectionResetError("two"), ConnectionResetError("three")]
        try:
            raise errors[2] from KeyError("cause")
        except ConnectionResetError:
            pass
        retry = self.retry()
        with self.assertRaises(ConnectionResetError) as caught:
            retry.retry("orig", Failing(*errors))
        self.assertIs(caught.exception, errors[2])
        self.assertIsInstance(caught.exception.__cause__, KeyError)
        info = caught.exception.retry_info
        self.assertEqual((info.attempts, info.succeeded, info.category, info.stop_reason, len(info.delays)),
                         (3, False, "transient", "exhausted", 2))
        self.assertEqual(info.total_sleep, sum(self.clock.slept))

    def test_run_returns_the_outcome_as_a_value(self):
        result, outcome = self.retry().run("value", Failing(TimeoutError))
        self.assertEqual((result, outcome.attempts, outcome.succeeded, outcome.stop_reason), ("ok", 2, True, "success"))


class BudgetTest(RetryTestCase):
    def test_a_total_outage_costs_about_one_attempt_per_call(self):
        retry = self.retry(mm.RetryConfig(max_attempts=3))
        dead = Failing(*[ConnectionRefusedError] * 10_000)
        for _ in range(1000):
            self.assertIsNone(retry.retry_async("dead", dead))
        self.assertLessEqual(dead.calls, 1100)
        self.assertEqual(dead.calls, 1000 + int(mm.RETRY_BUDGET_MAX))
        stats = retry.get_retry_stats("dead")
        self.assertEqual((stats["calls"], stats["attempts"], stats["success_rate"]), (1000, dead.calls, 0.0))

    def test_successes_refill_the_budget(self):
        retry = self.retry(mm.RetryConfig(max_attempts=2))
        dead = Failing(*[ConnectionRefusedError] * 100)
        for _ in range(20):
            retry.retry_async("op", dead)
        for _ in range(30):
            retry.retry("op", lambda: "ok")
        self.assertEqual(retry.store.query("SELECT tokens FROM retry_budget WHERE operation = 'op'")[0][0],
                         pytest_approx(3.0))
        flaky = Failing(ConnectionResetError)
        self.assertEqual(retry.retry("op", flaky), "ok")
        self.assertEqual(flaky.calls, 2)


def pytest_approx(value):
    """A float that compares equal within 1e-9 (named for what it does, not a pytest import)."""
    class Approx(float):
        def __eq__(self, other):
            return abs(other - value) <= 1e-9

        __hash__ = float.__hash__

    return Approx(value)


class StatisticsTest(RetryTestCase):
    def test_every_instance_writing_to_one_store_is_counted(self):
        first, second = self.retry(), self.retry()
        first.retry("shared", Failing(TimeoutError))
        second.retry_async("shared", Failing(*[PermissionError] * 3))
        second.retry("shared", lambda: 1)
        stats = first.get_retry_stats("shared")
        self.assertEqual({key: stats[key] for key in ("calls", "successes", "failures", "attempts", "retries",
                                                       "first_try_successes", "recovered_after_retry",
                                                       "failed_without_retry", "failed_after_retries")},
                         {"calls": 3, "successes": 2, "failures": 1, "attempts": 4, "retries": 1,
                          "first_try_successes": 1, "recovered_after_retry": 1, "failed_without_retry": 1,
                          "failed_after_retries": 0})
        self.assertEqual(stats["common_errors"], [("PermissionError", 1), ("TimeoutError", 1)])
        self.assertAlmostEqual(stats["success_rate"], 200 / 3)
        self.assertIsNone(first.get_retry_stats("never")["success_rate"])


class RecommendTest(RetryTestCase):
    def history(self, retry):
        """40 failures recovered on the 2nd attempt, 2 on the 4th, and 12 PermissionErrors that never did."""
        for i in range(42):
            retry.retry("sync", Failing(*[TimeoutError] * (1 if i < 40 else 3)))
            self.clock.advance(300)
        for _ in range(12):
            retry.retry_async("sync", Failing(PermissionError))
            self.clock.advance(300)

    def test_learns_attempts_and_deadline_and_names_what_never_recovers(self):
        retry = self.retry(mm.RetryConfig(max_attempts=5, budget=False))
        self.history(retry)
        advice = retry.recommend("sync")
        self.assertEqual((advice["max_attempts"], advice["stop_retrying"], advice["recoverable_failures"]),
                         (2, ["PermissionError"], 42))
        self.assertTrue(advice["evidence"][0].startswith(
            "40 of 42 recovered failures (95 %) succeeded by attempt 2, within 1."), advice["evidence"][0])
        self.assertIn("stop retrying PermissionError: 0 of 12 recovered", advice["evidence"])
        self.assertGreaterEqual(advice["deadline_s"], 1.0)
        again = mm.AdaptiveRetry(collector=retry.collector, now=self.clock.time).recommend("sync")
        self.assertEqual({k: v for k, v in again.items() if k != "evidence"},
                         {k: v for k, v in advice.items() if k != "evidence"})
        self.assertIn("stop retrying PermissionError", retry.analyze_failures("sync")["recommendation"])

    def test_never_harder_while_the_last_hour_mostly_fails(self):
        retry = self.retry(mm.RetryConfig(max_attempts=2, budget=False), max_attempts_limit=10)
        for _ in range(10):
            retry.retry_async("busy", Failing(TimeoutError, TimeoutError, TimeoutError))  # 2 attempts: all fail
        retry.config = mm.RetryConfig(max_attempts=5, budget=False)
        for _ in range(6):
            retry.retry("busy", Failing(TimeoutError, TimeoutError, TimeoutError, TimeoutError))  # need 5
        retry.config = mm.RetryConfig(max_attempts=2, budget=False)
        advice = retry.recommend("busy")
        self.assertGreater(advice["failure_rate_1h"], 0.5)
        self.assertEqual(advice["max_attempts"], 2)
        self.assertIn("of the last hour's calls failed", advice["summary"])
        self.clock.advance(7200)
        self.assertEqual(retry.recommend("busy")["max_attempts"], 5)

    def test_recommendations_stay_within_the_limits(self):
        retry = self.retry(mm.RetryConfig(max_attempts=8, initial_backoff=10.0, max_backoff=60.0, budget=False),
                           max_attempts_limit=4, deadline_limit_s=30.0)
        for _ in range(10):
            retry.retry("slow", Failing(*[TimeoutError] * 6))  # recovers on the 7th attempt, after minutes
            self.clock.advance(7200)
        advice = retry.recommend("slow")
        self.assertEqual((advice["max_attempts"], advice["deadline_s"]), (4, 30.0))

    def outage_history(self, retry, operation, lengths):
        """Calls made while a dependency is down for each of ``lengths`` seconds from the call's start:
        the synthetic history whose right answer is known."""
        for length in lengths:
            began = self.clock.time()

            def call():
                if self.clock.time() - began < length:
                    raise ConnectionError("refused")
                return "ok"

            self.assertEqual(retry.retry(operation, call), "ok")
            self.clock.advance(3600)

    def test_learns_the_backoff_from_how_long_failures_take_to_clear(self):
        source = random.Random(7)
        lengths = [source.uniform(20.0, 40.0) for _ in range(200)]  # outages of 20 to 40 s, uniformly
        retry = self.retry(mm.RetryConfig(max_attempts=30, initial_backoff=1.0, max_backoff=2.0, jitter="none",
                                          budget=False), max_attempts_limit=30)
        self.outage_history(retry, "slow-api", lengths)
        known = sorted(lengths)
        cleared = retry.clear_times("slow-api")
        self.assertEqual(len(cleared), 200)
        for estimate, truth in zip(cleared, known):  # each within half the last wait (1 s) and an attempt
            self.assertLessEqual(abs(estimate - truth), 1.0 + 1e-9)
        advice = retry.recommend("slow-api")
        first, most = mm.percentile(known, 0.25), mm.percentile(known, 0.95)
        self.assertAlmostEqual(advice["initial_backoff"], first, delta=1.1)  # the true quartile is 25 s
        self.assertAlmostEqual(advice["max_backoff"], most, delta=2.0)  # the true 95th percentile is 39 s
        self.assertTrue(24.0 <= advice["initial_backoff"] <= 26.0 and 38.0 <= advice["max_backoff"] <= 41.0, advice)
        self.assertIn("200 recovered failures cleared after ", advice["summary"])
        quick = self.retry(mm.RetryConfig(max_attempts=30, initial_backoff=5.0, max_backoff=60.0, jitter="none",
                                          budget=False))
        self.outage_history(quick, "fast-api", [source.uniform(0.1, 0.3) for _ in range(50)])
        advice = quick.recommend("fast-api")
        # Blips that were over before the first 5 s wait: half of it is all the history can tell, so the
        # advice halves the wait, and each adaptive round halves it again until the waits resolve the blips.
        self.assertEqual((advice["initial_backoff"], advice["max_backoff"]), (2.5, 3.0))
        thin = self.retry(mm.RetryConfig(initial_backoff=2.0, max_backoff=30.0, budget=False))
        self.assertEqual((thin.recommend("nothing")["initial_backoff"], thin.recommend("nothing")["max_backoff"]),
                         (2.0, 30.0))
        self.assertIn("only 0 cleared failures on record", thin.recommend("nothing")["summary"])

    def test_adaptive_mode_waits_as_long_as_failures_take_to_clear(self):
        learner = self.retry(mm.RetryConfig(max_attempts=30, initial_backoff=1.0, max_backoff=2.0, jitter="none",
                                            budget=False), max_attempts_limit=30)
        self.outage_history(learner, "slow-api", [30.0] * 10)
        advice = learner.recommend("slow-api")
        self.assertEqual((advice["initial_backoff"], advice["max_backoff"]), (30.0, 30.0))
        adaptive = self.retry(mm.RetryConfig(max_attempts=30, initial_backoff=1.0, max_backoff=2.0, jitter="none",
                                             budget=False), adaptive=True, max_attempts_limit=30)
        self.clock.slept.clear()
        self.outage_history(adaptive, "slow-api", [30.0])
        self.assertEqual(self.clock.slept, [30.0])  # one wait where the old policy made fifteen

    def test_adaptive_mode_applies_the_recommendation(self):
        learner = self.retry(mm.RetryConfig(max_attempts=5, budget=False))
        for _ in range(5):
            learner.retry_async("adaptive", Failing(*[RuntimeError] * 5))
        adaptive = self.retry(mm.RetryConfig(max_attempts=5, budget=False), adaptive=True)
        op = Failing(RuntimeError, RuntimeError)
        with self.assertRaises(RuntimeError) as caught:
            adaptive.retry("adaptive", op)
        self.assertEqual((op.calls, caught.exception.retry_info.category), (1, "permanent"))


class ConfigTest(unittest.TestCase):
    def test_defaults_are_the_documents(self):
        config = mm.RetryConfig()
        self.assertEqual((config.max_attempts, config.initial_backoff, config.max_backoff, config.backoff_multiplier,
                          config.use_jitter, config.jitter), (3, 1.0, 60.0, 2.0, True, "proportional"))
        self.assertEqual(mm.RetryConfig(use_jitter=False).jitter, "none")
        self.assertEqual(config.replace(max_attempts=4), mm.RetryConfig(max_attempts=4))

    def test_bad_values_are_refused(self):
        cases = [
            (dict(max_attempts=0), "max_attempts must be a whole number of at least 1, got 0"),
            (dict(initial_backoff=-1), "initial_backoff must be positive, got -1"),
            (dict(max_backoff=0.5), "max_backoff 0.5 is below initial_backoff 1.0"),
            (dict(backoff_multiplier=0.5), "backoff_multiplier must be at least 1, got 0.5"),
            (dict(jitter="wild"), "jitter must be one of proportional, full, decorrelated, none, got 'wild'"),
            (dict(deadline=float("inf")), "deadline must be a finite number, got inf"),
        ]
        for kwargs, message in cases:
            with self.subTest(kwargs=kwargs):
                with self.assertRaises(mm.ValidationError) as caught:
                    mm.RetryConfig(**kwargs)
                self.assertEqual(str(caught.exception), message)


if __name__ == "__main__":
    unittest.main()
