"""CircuitBreaker in one process: trip, age out, probe, back off, record each transition once.

No test here sleeps: time.sleep raises for the whole module; the clock is a fake one.
"""

import random
import unittest

import metasystem_monitor as mm

from .support import FakeClock, StoreTestCase, forbid_real_sleep

setUpModule, tearDownModule = forbid_real_sleep()


class Service:
    """A fake dependency that fails while ``down`` and counts its calls."""

    def __init__(self):
        self.down = True
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("down")
        return "up"


class BreakerTestCase(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.clock = FakeClock()
        self.metrics = self.collector(self.clock)
        self.service = Service()

    def breaker(self, name="svc", **kwargs):
        return mm.CircuitBreaker(name, collector=self.metrics, now=self.clock.time, **kwargs)

    def fail_calls(self, breaker, times=1, every_s=0.0):
        for _ in range(times):
            with self.assertRaises(ConnectionRefusedError):
                breaker.call(self.service)
            self.clock.advance(every_s)

    def transitions(self, name="svc"):
        return self.metrics.store.query("SELECT from_state, to_state, reason FROM breaker_transitions WHERE name = ? "
                                        "ORDER BY ts, rowid", (name,))


class TripTest(BreakerTestCase):
    def test_a_breaker_never_used_is_closed(self):
        self.assertEqual(self.breaker().status(), {"name": "svc", "state": "closed", "failures": 0,
                                                   "window_s": 1800.0, "since": None, "open_until": None})

    def test_three_failures_open_it_and_calls_then_fail_fast(self):
        breaker = self.breaker()
        self.fail_calls(breaker, 3)
        self.assertEqual(breaker.status()["state"], "open")
        with self.assertRaises(mm.CircuitOpenError) as caught:
            breaker.call(self.service)
        self.assertEqual((self.service.calls, caught.exception.name, caught.exception.retry_after), (3, "svc", 60.0))
        self.assertEqual(str(caught.exception), "circuit breaker 'svc' is open for 60 s more")

    def test_failures_ten_minutes_apart_trip_it(self):
        breaker = self.breaker()
        self.fail_calls(breaker, 3, every_s=600)
        self.assertEqual(breaker.status()["state"], "open")

    def test_a_failure_from_yesterday_has_aged_out(self):
        breaker = self.breaker()
        self.fail_calls(breaker, 1)
        self.clock.advance(86400)
        self.fail_calls(breaker, 2)
        self.assertEqual(breaker.status(), {"name": "svc", "state": "closed", "failures": 2, "window_s": 1800.0,
                                            "since": mm.iso_time(self.clock.now - 86400), "open_until": None})
        self.fail_calls(breaker, 1)
        self.assertEqual(breaker.status()["state"], "open")

    def test_a_success_resets_the_count(self):
        breaker = self.breaker()
        self.fail_calls(breaker, 2)
        self.service.down = False
        self.assertEqual(breaker.call(self.service), "up")
        self.service.down = True
        self.fail_calls(breaker, 2)
        self.assertEqual(breaker.status()["state"], "closed")

    def test_excluded_errors_neither_count_nor_reset(self):
        breaker = self.breaker(exclude=(PermissionError,))

        def denied():
            raise PermissionError("no")

        self.fail_calls(breaker, 2)
        for _ in range(5):
            with self.assertRaises(PermissionError):
                breaker.call(denied)
        self.assertEqual(breaker.status()["failures"], 2)
        self.fail_calls(breaker, 1)
        self.assertEqual(breaker.status()["state"], "open")


class ProbeTest(BreakerTestCase):
    def tripped(self, **kwargs):
        breaker = self.breaker(**kwargs)
        self.fail_calls(breaker, 3)
        return breaker

    def test_after_the_open_time_one_probe_closes_it(self):
        breaker = self.tripped()
        self.clock.advance(60)
        self.service.down = False
        self.assertEqual(breaker.call(self.service), "up")
        self.assertEqual(breaker.status()["state"], "closed")
        self.assertEqual(self.transitions(), [
            ("closed", "open", "3 failures within 1800 s, the last ConnectionRefusedError"),
            ("open", "half_open", "open for 60 s"),
            ("half_open", "closed", "probe succeeded"),
        ])

    def test_only_one_caller_probes_while_the_lease_lasts(self):
        breaker = self.tripped()
        self.clock.advance(60)
        prober = breaker._admit()
        self.assertIsNotNone(prober)
        with self.assertRaises(mm.CircuitOpenError) as caught:
            breaker.call(self.service)
        self.assertTrue(caught.exception.probing)
        self.assertEqual(str(caught.exception), "circuit breaker 'svc' is being probed by another caller")
        self.assertEqual(self.service.calls, 3)

    def test_a_crashed_probers_lease_expires(self):
        breaker = self.tripped(probe_timeout=30)
        self.clock.advance(60)
        breaker._admit()  # the prober that never reports back
        self.clock.advance(31)
        self.service.down = False
        self.assertEqual(breaker.call(self.service), "up")
        self.assertEqual(breaker.status()["state"], "closed")

    def test_a_failed_probe_opens_it_for_twice_as_long_up_to_the_bound(self):
        breaker = self.tripped(max_open_duration=200)
        waits = []
        for _ in range(4):
            with self.assertRaises(mm.CircuitOpenError) as caught:
                breaker.call(self.service)
            waits.append(caught.exception.retry_after)
            self.clock.advance(caught.exception.retry_after)
            self.fail_calls(breaker, 1)  # the probe fails
        self.assertEqual(waits, [60.0, 120.0, 200.0, 200.0])
        self.assertEqual([row[1] for row in self.transitions()].count("open"), 5)

    def test_a_wall_clock_that_jumps_back_never_holds_it_past_twice_the_open_time(self):
        breaker = self.tripped()
        self.clock.advance(50)
        self.clock.advance(-86400)  # someone set the clock back a day
        with self.assertRaises(mm.CircuitOpenError) as caught:
            breaker.call(self.service)
        self.assertEqual(caught.exception.retry_after, 60.0)
        self.clock.advance(60)
        self.service.down = False
        self.assertEqual(breaker.call(self.service), "up")  # open 50 + 60 s in all: under 2 x 60

    def test_reset_by_hand(self):
        breaker = self.tripped()
        breaker.reset()
        self.assertEqual(breaker.status()["state"], "closed")
        self.assertEqual(self.transitions()[-1], ("open", "closed", "reset by hand"))


class RecordingTest(BreakerTestCase):
    def test_each_transition_is_one_row_and_one_metric_sample(self):
        breaker = self.breaker()
        self.fail_calls(breaker, 3)
        self.clock.advance(60)
        self.service.down = False
        breaker.call(self.service)
        self.assertEqual(len(self.transitions()), 3)
        states = self.metrics.store.query(
            "SELECT value FROM samples JOIN series ON id = series_id WHERE name = 'circuit_breaker_svc_state' "
            "ORDER BY ts, seq")
        self.assertEqual([row[0] for row in states], [1.0, 2.0, 0.0])
        summary = self.metrics.get_system_summary()["circuit_breakers"]["svc"]
        self.assertEqual((summary["state"], summary["since"]), ("closed", mm.iso_time(self.clock.now)))

    def test_record_circuit_breaker_metric_keeps_a_transition_when_told_the_previous_state(self):
        self.metrics.record_circuit_breaker_metric("ext", "open", 5, previous_state="closed", reason="5 timeouts")
        self.metrics.record_circuit_breaker_metric("ext", "open", 6)
        self.assertEqual(self.transitions("ext"), [("closed", "open", "5 timeouts")])
        with self.assertRaises(mm.ValidationError):
            self.metrics.record_circuit_breaker_metric("ext", "open", previous_state="ajar")


class FormsTest(BreakerTestCase):
    def test_decorator_and_context_manager(self):
        breaker = self.breaker()

        @breaker
        def guarded():
            return self.service()

        with self.assertRaises(ConnectionRefusedError):
            guarded()
        with self.assertRaises(ConnectionRefusedError):
            with breaker:
                self.service()
        with self.assertRaises(ConnectionRefusedError):
            guarded()
        with self.assertRaises(mm.CircuitOpenError):
            with breaker:
                self.fail("the body must not run while the breaker is open")
        self.assertEqual(guarded.__name__, "guarded")


class RetryWithBreakerTest(BreakerTestCase):
    def test_an_open_breaker_costs_no_attempt_and_no_sleep(self):
        breaker = self.breaker()
        retry = mm.AdaptiveRetry(mm.RetryConfig(max_attempts=5, budget=False), collector=self.metrics,
                                 breaker=breaker, clock=self.clock.monotonic, now=self.clock.time,
                                 sleep=self.clock.sleep, rng=random.Random(1))
        with self.assertRaises(mm.CircuitOpenError) as caught:
            retry.retry("svc_call", self.service)
        self.assertEqual(self.service.calls, 3)  # the third failure opened it; the fourth attempt was refused
        slept = list(self.clock.slept)
        with self.assertRaises(mm.CircuitOpenError) as caught:
            retry.retry("svc_call", self.service)
        self.assertEqual((self.service.calls, self.clock.slept, caught.exception.retry_info.attempts),
                         (3, slept, 0))
        self.assertEqual(caught.exception.retry_info.stop_reason, "breaker")


if __name__ == "__main__":
    unittest.main()
