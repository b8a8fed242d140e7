"""AlertingSystem: the original design's API, dedup through the store, retries, budget, history."""

import logging
import os
import socket
import unittest

import metasystem_monitor as mm

from .servers import HTTPServer, Reply, SMTPServer, closed_port
from .support import AlertTestCase, forbid_real_sleep, sqlite_rows

setUpModule, tearDownModule = forbid_real_sleep()


class OriginalDesignExamples(AlertTestCase):
    """Every example of the original document's AlertingSystem section, as it is written there."""

    def test_create_and_send_to_email_and_slack(self):
        with SMTPServer() as smtp, HTTPServer() as slack:
            alerts = self.system(
                f"[alerting]\nslack_webhook_url = {slack.url('/services/T1/B2/tok3n')}\n\n"
                f"[channel:email]\ntype = email\nto = user@example.com\nsmtp_host = 127.0.0.1\n"
                f"smtp_port = {smtp.port}\nsecurity = none\n")
            alert = alerts.create_alert(
                title="High Disk Usage",
                message="Disk usage reached 95%",
                severity=mm.AlertSeverity.CRITICAL,
                channels=[mm.AlertChannel.EMAIL, mm.AlertChannel.SLACK],
                details={"free_gb": 2.5},
            )
            results = alerts.send_alert(alert)
        self.assertEqual(results, {"email": True, "slack": True})
        self.assertEqual(len(slack.requests), 1)
        self.assertEqual(slack.requests[0].path, "/services/T1/B2/tok3n")
        [mail] = smtp.mails
        self.assertEqual(mail.recipients, ["user@example.com"])
        self.assertEqual(mail.message()["Subject"], "[CRITICAL] High Disk Usage")
        self.assertEqual(mail.message().get_content().replace("\r\n", "\n"),
                         f"Disk usage reached 95%\n\nfree_gb: 2.5\n\nhost: {socket.gethostname()}\n"
                         f"time: {mm.iso_time(self.clock.now)}\n")
        self.assertEqual(self.syslog.pending(), [])  # the log channel was not selected

    def test_convenience_methods_and_deduplication_window(self):
        with HTTPServer() as slack:
            alerts = self.system(f"[alerting]\nslack_webhook_url = {slack.url('/hook')}\n")
            first = alerts.send_critical_alert("Test", "Message 1")
            second = alerts.send_critical_alert("Test", "Message 2")  # Skipped - duplicate
            self.clock.advance(3599)
            third = alerts.send_critical_alert("Test", "Message 3")  # still inside the hour
            self.clock.advance(1)
            fourth = alerts.send_critical_alert("Test", "Message 4")  # Sent - dedup window expired
        self.assertEqual([r.json()["attachments"][0]["blocks"][0]["text"]["text"].split("\n")[0]
                          for r in slack.requests], ["Message 1", "Message 4"])
        self.assertEqual(first, {"log": True, "slack": True})
        self.assertEqual({k: d.outcome for k, d in second.outcomes.items()},
                         {"log": "deduplicated", "slack": "deduplicated"})
        self.assertEqual(third.outcomes["slack"].outcome, "deduplicated")
        self.assertEqual(fourth.outcomes["slack"].outcome, "sent")
        self.assertEqual(len(self.syslog.pending()), 2)

    def test_warning_and_info_have_their_own_keys(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alerts.send_warning_alert("Slow Sync Performance", "Recent sync took 30+ seconds")
            alerts.send_info_alert("Slow Sync Performance", "same title, another severity")
            alerts.send_critical_alert("Slow Sync Performance", "and a third")
        self.assertEqual([r.json()["severity"] for r in hook.requests], ["warning", "info", "critical"])
        self.assertEqual([r.json()["dedup_key"] for r in hook.requests],
                         ["warning:Slow Sync Performance", "info:Slow Sync Performance",
                          "critical:Slow Sync Performance"])

    def test_dedup_window_is_configurable(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\ndedup_window = 5m\n")
            alerts.send_critical_alert("T")
            self.clock.advance(299)
            alerts.send_critical_alert("T")
            self.clock.advance(1)
            alerts.send_critical_alert("T")
        self.assertEqual(len(hook.requests), 2)

    def test_history_newest_first_with_each_channel(self):
        with HTTPServer(Reply(404, "no_such_hook")) as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alerts.send_warning_alert("One", "first", details={"n": 1})
            self.clock.advance(60)
            alerts.send_critical_alert("Two", "second", channels=["webhook", "discord"])
        self.clock.advance(60)
        history = alerts.get_alert_history(hours=24)
        self.assertEqual([h["title"] for h in history], ["Two", "One"])
        self.assertEqual(history[0]["channels"]["webhook"],
                         {"outcome": "sent", "attempts": 1, "http_status": 200, "error_class": None, "error": None,
                          "latency_ms": 0.0, "kind": "alert"})
        self.assertEqual(history[0]["channels"]["discord"]["outcome"], "not_configured")
        self.assertEqual(history[1]["channels"]["webhook"]["outcome"], "failed")
        self.assertEqual(history[1]["channels"]["webhook"]["http_status"], 404)
        self.assertEqual(history[1]["channels"]["webhook"]["error"], "HTTP 404: no_such_hook")
        self.assertEqual(history[1]["channels"]["log"]["outcome"], "sent")
        self.assertEqual(history[1]["details"], {"n": 1})
        self.assertEqual(history[1]["time"], mm.iso_time(self.clock.now - 120))
        self.clock.advance(24 * 3600 - 119)
        self.assertEqual([h["title"] for h in alerts.get_alert_history(hours=24)], ["Two"])


class HistoryRetention(AlertTestCase):
    def test_cleanup_drops_history_past_the_retention_and_keeps_what_fires(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alerts.send_critical_alert("Old one")
            alerts.fire("disk", "Disk full", severity="critical")
            self.clock.advance(31 * 86400)
            alerts.send_warning_alert("Recent one")
        with mm.MetricsCollector(self.db, now=self.clock.time) as collector:
            self.assertEqual(collector.cleanup()["deleted_alerts"], 2)
        self.assertEqual(sqlite_rows(self.db, "SELECT title FROM alerts"), [("Recent one",)])
        self.assertEqual(sqlite_rows(self.db, "SELECT DISTINCT a.title FROM alert_deliveries d "
                                              "JOIN alerts a ON a.id = d.alert_id"), [("Recent one",)])
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alert_deliveries"), [(2,)])
        self.assertEqual(sqlite_rows(self.db, "SELECT key, state FROM alert_states"), [("disk", "firing")])


class MissingConfiguration(AlertTestCase):
    def test_no_file_at_all_still_works_through_the_log(self):
        alerts = mm.AlertingSystem(os.path.join(self.tmp, "absent.ini"), db_path=self.db, now=self.clock.time,
                                   sleep=self.clock.sleep)
        self.addCleanup(alerts.close)
        with self.assertLogs("metasystem", logging.INFO) as logs:
            results = alerts.send_alert(alerts.create_alert("Disk", "full", mm.AlertSeverity.CRITICAL,
                                                            channels=[mm.AlertChannel.SLACK, "email"]))
        self.assertEqual(results, {"slack": False, "email": False})
        self.assertEqual([r.getMessage() for r in logs.records],
                         ["channel slack skipped (not configured)", "channel email skipped (not configured)",
                          "[CRITICAL] Disk | full"])
        self.assertEqual(results.exit_code(), 4)  # neither channel asked for got it

    def test_a_secret_whose_variable_is_unset_skips_the_channel(self):
        alerts = self.system("[channel:ops]\ntype = slack\nurl_env = MM_TEST_UNSET_VARIABLE\n",
                             environ={"PATH": os.environ.get("PATH", "")})
        with self.assertLogs("metasystem", logging.INFO) as logs:
            results = alerts.send_critical_alert("Disk", "full")
        self.assertEqual(results, {"log": True, "ops": False})
        self.assertIn("channel ops skipped ($MM_TEST_UNSET_VARIABLE is not set)",
                      [r.getMessage() for r in logs.records])
        self.assertEqual(sqlite_rows(self.db, "SELECT channel, outcome FROM alert_deliveries ORDER BY channel"),
                         [("log", "sent"), ("ops", "not_configured")])

    def test_a_malformed_file_raises_config_error_naming_section_and_key(self):
        with self.assertRaises(mm.ConfigError) as caught:
            self.system("[channel:ops]\ntype = slack\nurl = ftp://example.com/x\ncolour = red\n")
        self.assertEqual(str(caught.exception),
                         f"{self.config_path}: [channel:ops] colour: unknown key for a slack channel "
                         "(and 1 more; see 'config --check')")


def claimed_by_another_process(alerts, alert, until):
    """The webhook channel's claim on ``alert``, as another process would leave it."""
    with alerts.store.write() as conn:
        conn.execute("INSERT INTO alert_marks VALUES (?, 'webhook', NULL, 'another', ?)", (alert.key, until))


class FailedChannelsAndDedup(AlertTestCase):
    def test_a_failed_channel_is_tried_again_while_delivered_ones_stay_quiet(self):
        failing = [Reply(500, "boom")] * 3
        with HTTPServer(*failing) as slack, HTTPServer(default=Reply(204)) as discord:
            alerts = self.system(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\n"
                                 f"discord_webhook_url = {discord.url('/d')}\n")
            first = alerts.send_critical_alert("Backup failed", "rsync 23")
            self.clock.advance(300)
            second = alerts.send_critical_alert("Backup failed", "rsync 23")
            self.clock.advance(300)
            third = alerts.send_critical_alert("Backup failed", "rsync 23")
        self.assertEqual(first, {"log": True, "slack": False, "discord": True})
        self.assertEqual(first.outcomes["slack"].attempts, 3)
        self.assertEqual(first.exit_code(), 3)
        self.assertEqual(second, {"log": True, "slack": True, "discord": True})
        self.assertEqual({k: d.outcome for k, d in second.outcomes.items()},
                         {"log": "deduplicated", "slack": "sent", "discord": "deduplicated"})
        self.assertEqual({d.outcome for d in third.outcomes.values()}, {"deduplicated"})
        self.assertEqual((len(slack.requests), len(discord.requests)), (4, 1))
        rows = sqlite_rows(self.db, "SELECT a.id, d.channel, d.outcome, d.attempts FROM alerts a "
                                    "JOIN alert_deliveries d ON d.alert_id = a.id WHERE d.channel = 'slack' "
                                    "ORDER BY a.id")
        self.assertEqual([row[2:] for row in rows], [("failed", 3), ("sent", 1), ("deduplicated", 0)])

    def test_a_process_waits_for_another_processes_claim_then_sees_its_delivery(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alert = alerts.create_alert("Disk", "full", mm.AlertSeverity.CRITICAL, channels=["webhook"])
            claimed_by_another_process(alerts, alert, until=self.clock.now + 30)  # and it is sending now
            polls = []

            def the_other_process_finishes(seconds):
                polls.append(seconds)
                self.clock.advance(seconds)
                if len(polls) == 3:
                    with alerts.store.write() as conn:
                        conn.execute("UPDATE alert_marks SET sent_at = ?, claim_owner = '', claim_until = 0",
                                     (self.clock.now,))

            alerts._sleep = the_other_process_finishes
            results = alerts.send_alert(alert)
        self.assertEqual(results.outcomes["webhook"].outcome, "deduplicated")
        self.assertEqual(polls, [mm.DELIVERY_CLAIM_POLL_S] * 3)
        self.assertEqual(hook.requests, [])

    def test_a_claim_left_by_a_killed_process_expires(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alert = alerts.create_alert("Disk", "full", mm.AlertSeverity.CRITICAL, channels=["webhook"])
            claimed_by_another_process(alerts, alert, until=self.clock.now + 2)  # which was killed
            results = alerts.send_alert(alert)
        self.assertEqual(results.outcomes["webhook"].outcome, "sent")
        self.assertEqual(len(hook.requests), 1)
        # It polled until the lease ran out, and no longer.
        self.assertGreaterEqual(sum(self.clock.slept), 2.0)
        self.assertLess(sum(self.clock.slept), 2.0 + 2 * mm.DELIVERY_CLAIM_POLL_S)

    def test_a_mark_from_a_clock_that_jumped_back_does_not_silence_the_alert(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alerts.send_critical_alert("T", channels=["webhook"])
            self.clock.advance(-86400)
            results = alerts.send_critical_alert("T", channels=["webhook"])
        self.assertEqual(results.outcomes["webhook"].outcome, "sent")
        self.assertEqual(len(hook.requests), 2)


class RetryTable(AlertTestCase):
    """Which failures are tried again, how long it waits, and the budget."""

    def send_once(self, *replies, extra=""):
        with HTTPServer(*replies) as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n{extra}")
            report = alerts.send_critical_alert("Disk", "full", channels=["webhook"])
        return report.outcomes["webhook"], hook.requests

    def test_transient_statuses_are_retried_up_to_three_attempts(self):
        for status in (408, 425, 429, 500, 502, 503, 504):
            with self.subTest(status=status):
                self.clock.slept.clear()
                delivery, requests = self.send_once(*[Reply(status)] * 3)
                self.assertEqual((delivery.outcome, delivery.attempts, delivery.http_status, len(requests)),
                                 ("failed", 3, status, 3))
                self.assertEqual(len(self.clock.slept), 2)
                self.assertTrue(all(0 <= s <= mm.DELIVERY_BACKOFF_CAP_S for s in self.clock.slept))

    def test_permanent_statuses_get_one_attempt_and_no_sleep(self):
        for status in (400, 401, 403, 404, 410, 413):
            with self.subTest(status=status):
                self.clock.slept.clear()
                delivery, requests = self.send_once(Reply(status), Reply(200))
                self.assertEqual((delivery.outcome, delivery.attempts, delivery.error_class, len(requests)),
                                 ("failed", 1, "http", 1))
                self.assertEqual(self.clock.slept, [])

    def test_recovery_on_the_second_attempt(self):
        delivery, requests = self.send_once(Reply(503), Reply(200))
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.http_status), ("sent", 2, 200))
        self.assertEqual(requests[0].headers["webhook-id"] if "webhook-id" in requests[0].headers else None, None)

    def test_backoff_is_jittered_below_an_exponential_cap(self):
        self.send_once(*[Reply(500)] * 3)
        first, second = self.clock.slept
        self.assertTrue(0 <= first <= 1.0 and 0 <= second <= 2.0, self.clock.slept)
        self.assertNotEqual(first, second)

    def test_retry_after_is_a_floor(self):
        delivery, _ = self.send_once(Reply(429, "slow down", {"Retry-After": "7"}), Reply(200))
        self.assertEqual((delivery.outcome, delivery.attempts), ("sent", 2))
        self.assertEqual(len(self.clock.slept), 1)
        self.assertGreaterEqual(self.clock.slept[0], 7.0)

    def test_retry_after_beyond_the_budget_gives_up_without_sleeping(self):
        delivery, requests = self.send_once(Reply(429, "", {"Retry-After": "600"}), Reply(200))
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.error_class), ("failed", 1, "rate_limited"))
        self.assertEqual(delivery.error, "HTTP 429 (asked to retry after 600 s, beyond the 20 s left of the budget)")
        self.assertEqual((self.clock.slept, len(requests)), ([], 1))

    def test_the_channel_budget_bounds_the_whole_delivery(self):
        replies = [Reply(503, "", {"Retry-After": "5"})] * 3
        start = self.clock.now
        delivery, requests = self.send_once(*replies, extra="channel_budget = 8s\n")
        self.assertEqual((delivery.outcome, delivery.attempts, len(requests)), ("failed", 2, 2))
        self.assertLessEqual(self.clock.now - start, 8.0)
        self.assertTrue(delivery.error.endswith("beyond the 3 s left of the budget)"), delivery.error)

    def test_connection_refused_is_transient(self):
        alerts = self.system(f"[alerting]\nwebhook_url = http://127.0.0.1:{closed_port()}/x\n")
        delivery = alerts.send_critical_alert("Disk", channels=["webhook"]).outcomes["webhook"]
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.error_class), ("failed", 3, "connection"))
        self.assertIn("ConnectionRefusedError", delivery.error)

    def test_a_server_that_hangs_times_out_twice_at_most(self):
        with HTTPServer(default=Reply(hang=True)) as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\ntimeout = 0.2s\n")
            delivery = alerts.send_critical_alert("Disk", channels=["webhook"]).outcomes["webhook"]
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.error_class), ("failed", 2, "timeout"))
        self.assertTrue(delivery.error.endswith("(timed out twice; it may have arrived)"), delivery.error)
        self.assertEqual(len(hook.requests), 2)

    def test_a_redirect_is_a_failure_not_followed(self):
        delivery, requests = self.send_once(Reply(302, "", {"Location": "/elsewhere"}))
        self.assertEqual((delivery.outcome, delivery.http_status, len(requests)), ("failed", 302, 1))


class Classifier(unittest.TestCase):
    def test_one_classifier_judges_http_smtp_and_tls(self):
        import smtplib
        import ssl
        from urllib.error import HTTPError

        cases = [
            (HTTPError("u", 503, "x", {}, None), "transient"),
            (HTTPError("u", 501, "x", {}, None), "transient"),
            (HTTPError("u", 413, "x", {}, None), "permanent"),
            (smtplib.SMTPResponseException(451, b"try later"), "transient"),
            (smtplib.SMTPAuthenticationError(535, b"bad"), "permanent"),
            (smtplib.SMTPServerDisconnected("gone"), "transient"),
            (ssl.SSLCertVerificationError(1, "self-signed"), "permanent"),
        ]
        for error, expected in cases:
            with self.subTest(error=repr(error)):
                self.assertEqual(mm.classify_error(error), expected)


if __name__ == "__main__":
    unittest.main()


class MutationPassTest(AlertTestCase):
    """Tests written for the mutants a mutation pass over the alerting and checks sections left alive."""

    def test_a_claim_that_expires_this_very_instant_is_taken_without_waiting(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alert = alerts.create_alert("Disk", "full", mm.AlertSeverity.CRITICAL, channels=["webhook"])
            claimed_by_another_process(alerts, alert, until=self.clock.now)
            results = alerts.send_alert(alert)
        self.assertEqual((results.outcomes["webhook"].outcome, self.clock.slept), ("sent", []))

    def test_a_silenced_delivery_is_in_the_history(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alerts.add_silence("Disk", 3600)
            results = alerts.send_critical_alert("Disk full", channels=["webhook"])
        self.assertEqual((results.outcomes["webhook"].outcome, hook.requests), ("silenced", []))
        self.assertEqual(sqlite_rows(self.db, "SELECT channel, outcome, error FROM alert_deliveries"),
                         [("webhook", "silenced", "silence #1")])

    def test_removing_a_silence_that_does_not_exist_says_so(self):
        alerts = self.system("")
        self.assertFalse(alerts.remove_silence(99))
        self.assertTrue(alerts.remove_silence(alerts.add_silence("x", 60)))
        os.environ["METASYSTEM_CONFIG"], os.environ["METASYSTEM_DB"] = self.config_path, self.db
        self.addCleanup(os.environ.pop, "METASYSTEM_CONFIG", None)
        self.assertMainError(1, "99", "silence", "remove", "99")

    def test_a_repeat_interval_and_the_channel_budget_must_be_more_than_zero_seconds(self):
        for key in ("repeat_interval_warning", "channel_budget", "timeout"):
            with self.subTest(key=key):
                self.write_config(f"[alerting]\n{key} = 0s\n")
                code, out, err = self.run_main("config", "--check", "--config", self.config_path)
                self.assertEqual(code, 1, out + err)
                self.assertIn(f"[alerting] {key}: ", out + err)

    def test_a_silence_of_no_time_is_refused(self):
        alerts = self.system("")
        with self.assertRaisesRegex(mm.ValidationError, "a silence needs a duration of more than 0"):
            alerts.add_silence("x", 0)


class Acknowledgements(AlertTestCase):
    def test_an_acknowledgement_for_a_while_lets_reminders_come_back_after_it(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\nrepeat_interval_critical = 1h\n")
            alerts.fire("db", "Database down", severity="critical")
            acked_at = self.clock.time()
            done = alerts.acknowledge("db", "ana", "restoring", duration_s=5400)
            self.clock.advance(3600)
            alerts.fire("db", "Database down", severity="critical")  # acknowledged: no reminder
            self.clock.advance(1800)
            alerts.fire("db", "Database down", severity="critical")  # the acknowledgement ended at 1.5 h
            self.assertFalse(alerts.unacknowledge("db"))
        self.assertEqual((done["by"], done["comment"], done["until"]), ("ana", "restoring", mm.iso_time(acked_at + 5400)))
        self.assertEqual([request.json()["kind"] for request in hook.requests], ["firing", "reminder"])
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alert_acks"), [(0,)])
