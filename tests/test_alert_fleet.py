"""The fleet's own alerting tools as channels: Alertmanager's API v2 and PagerDuty's Events API v2, each
against a real local server that records what it receives."""

import json
import os
import sqlite3

import metasystem_monitor as mm

from .servers import HTTPServer, Reply
from .support import AlertTestCase, forbid_real_sleep, sqlite_rows

setUpModule, tearDownModule = forbid_real_sleep()

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"


class AlertmanagerChannelTest(AlertTestCase):

    def setUp(self):
        super().setUp()
        self.server = HTTPServer()
        self.server.__enter__()
        self.addCleanup(self.server.__exit__)
        self.alerts = self.system(f"[alerting]\nresolve_after = 1\n\n[channel:am]\ntype = alertmanager\n"
                                  f"url = {self.server.url('')}/\nvalid_for = 2h\n")

    def test_firing_then_resolved_is_one_alert_to_alertmanager(self):
        started = self.clock.now
        self.alerts.fire("backup", "backup failed", "exit 2", "critical")
        self.clock.advance(600)
        self.alerts.resolve("backup", "ran fine")
        firing, resolved = self.server.requests
        self.assertEqual((firing.method, firing.path, firing.headers["Content-Type"]),
                         ("POST", "/api/v2/alerts", "application/json"))
        [alert] = firing.json()
        self.assertEqual(alert["labels"], {"alertname": "backup", "severity": "critical",
                                           "instance": self.alerts.hostname, "job": "metasystem"})
        self.assertEqual(alert["annotations"]["summary"], "backup failed")
        self.assertTrue(alert["annotations"]["description"].startswith("exit 2\n"), alert["annotations"])
        self.assertEqual((alert["startsAt"], alert["endsAt"]), (mm.iso_time(started), mm.iso_time(started + 7200)))
        [ended] = resolved.json()
        # The same labels: Alertmanager's fingerprint, so the resolve ends the alert it received.
        self.assertEqual(ended["labels"], alert["labels"])
        self.assertEqual((ended["startsAt"], ended["endsAt"]), (mm.iso_time(started), mm.iso_time(started + 600)))

    def test_a_bad_valid_for_is_a_configuration_problem(self):
        self.write_config("[channel:am]\ntype = alertmanager\nurl = http://127.0.0.1:9093\nvalid_for = soon\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual(code, 1)
        self.assertIn("[channel:am] valid_for:", out + err)


class PagerDutyChannelTest(AlertTestCase):

    def system_for(self, server, extra=""):
        return self.system(f"[alerting]\nresolve_after = 1\n\n[channel:pd]\ntype = pagerduty\n"
                           f"url = {server.url('/v2/enqueue')}\nrouting_key_env = PD_KEY\n{extra}",
                           environ={"PD_KEY": ROUTING_KEY})

    def test_trigger_and_resolve_share_the_dedup_key_and_202_is_success(self):
        with HTTPServer(default=Reply(202, '{"status":"success","dedup_key":"sync"}')) as pagerduty:
            alerts = self.system_for(pagerduty)
            fired = alerts.fire("sync", "sync failing", "3 failures in a row", "warning", details={"target": "nas"})
            self.clock.advance(300)
            resolved = alerts.resolve("sync")
        self.assertEqual((fired["pd"], resolved["pd"]), (True, True))
        trigger, resolve = (request.json() for request in pagerduty.requests)
        self.assertEqual(trigger, {
            "routing_key": ROUTING_KEY, "dedup_key": "sync", "event_action": "trigger",
            "payload": {"summary": "sync failing - 3 failures in a row", "source": alerts.hostname,
                        "severity": "warning", "timestamp": mm.iso_time(self.clock.now - 300),
                        "custom_details": {"target": "nas", "message": "3 failures in a row"}},
        })
        self.assertEqual(resolve, {"routing_key": ROUTING_KEY, "dedup_key": "sync", "event_action": "resolve"})

    def test_429_and_5xx_are_retried_400_is_not(self):
        with HTTPServer(Reply(429, '{"status":"throttle"}', {"Retry-After": "2"}), Reply(503, "busy"),
                        default=Reply(202, "{}")) as pagerduty:
            alerts = self.system_for(pagerduty)
            delivered = alerts.send_critical_alert("disk full", "1 GB left", channels=["pd"]).outcomes["pd"]
        self.assertEqual((delivered.outcome, delivered.attempts, len(pagerduty.requests)), ("sent", 3, 3))
        self.assertGreaterEqual(self.clock.slept[0], 2.0)  # Retry-After is a floor
        with HTTPServer(default=Reply(400, '{"status":"invalid event","message":"Event object is invalid"}')) as bad:
            alerts = self.system_for(bad)
            refused = alerts.send_critical_alert("disk still full", "1 GB left", channels=["pd"]).outcomes["pd"]
        self.assertEqual((refused.outcome, refused.attempts, len(bad.requests)), ("failed", 1, 1))
        self.assertEqual(refused.error_class, "http")

    def test_limits_a_long_key_and_a_long_summary(self):
        with HTTPServer(default=Reply(202, "{}")) as pagerduty:
            alerts = self.system_for(pagerduty)
            alerts.send_critical_alert("t" * 2000, "m", channels=["pd"])  # its key: critical:ttt...
        event = pagerduty.requests[0].json()
        self.assertEqual(event["dedup_key"], mm.pagerduty_dedup_key("critical:" + "t" * 2000))
        self.assertEqual(len(event["dedup_key"]), 64)
        self.assertEqual(mm.pagerduty_dedup_key("k" * 255), "k" * 255)
        self.assertEqual(len(event["payload"]["summary"]), 1024)
        self.assertTrue(event["payload"]["summary"].endswith(mm.TRUNCATION_MARKER))

    def test_the_routing_key_is_never_shown(self):
        with HTTPServer(default=Reply(400, f"bad key {ROUTING_KEY}")) as pagerduty:
            alerts = self.system_for(pagerduty)
            alerts.send_warning_alert("x", "y", channels=["pd"])
            dry = "\n".join(alerts.render(alerts.create_alert("x", "y", channels=["pd"])))
        stored = json.dumps(sqlite_rows(self.db, "SELECT * FROM alert_deliveries"))
        self.assertIn('"routing_key":', dry)
        self.assertNotIn(ROUTING_KEY, stored + dry + "\n".join(self.logged))
        self.assertIn("HTTP 400: bad key ", stored)

    def test_deliveries_are_counted_for_good(self):
        with HTTPServer(Reply(400, "no"), default=Reply(202, "{}")) as pagerduty:
            alerts = self.system_for(pagerduty)
            alerts.send_warning_alert("a", "", channels=["pd"])
            alerts.send_warning_alert("b", "", channels=["pd"])
            alerts.send_warning_alert("c", "", channels=["pd"])
        self.assertEqual(sqlite_rows(self.db, "SELECT channel, outcome, n FROM delivery_counts ORDER BY outcome"),
                         [("pd", "failed", 1), ("pd", "sent", 2)])
        with mm.MetricsCollector(self.db, now=lambda: self.clock.now + 365 * 86400) as metrics:
            metrics.cleanup()  # the history goes, the counts stay
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alert_deliveries"), [(0,)])
        self.assertEqual(sqlite_rows(self.db, "SELECT sum(n) FROM delivery_counts"), [(3,)])


class DeliveryCountsMigrationTest(AlertTestCase):

    def test_a_version_6_store_counts_the_deliveries_it_already_has(self):
        alerts = self.system()
        alerts.send_info_alert("one", "", channels=["log"])
        alerts.send_info_alert("two", "", channels=["log"])
        alerts.close()
        old = os.path.join(self.tmp, "v6.db")  # the schema of version 6, holding the alerts just sent
        conn = sqlite3.connect(old)
        for statements in mm._MIGRATIONS[:6]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {mm.APPLICATION_ID}")
        conn.execute("ATTACH ? AS sent", (self.db,))
        conn.execute("INSERT INTO alerts SELECT * FROM sent.alerts")
        conn.execute("INSERT INTO alert_deliveries SELECT * FROM sent.alert_deliveries")
        conn.execute("PRAGMA user_version = 6")
        conn.commit()
        conn.close()
        mm.Store(old).close()  # opened for writing: migrated
        self.assertEqual(sqlite_rows(old, "SELECT channel, outcome, n FROM delivery_counts"), [("log", "sent", 2)])
