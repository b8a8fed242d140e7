"""fire() and resolve() across cron runs: notify on change, reminders, resolved, flapping, silences,
quiet hours, routing and digests. Runs are separate processes where the issue says so."""

import json
import os
import signal
import subprocess
import sys
import unittest

import metasystem_monitor as mm

from .servers import HTTPServer, Reply, SMTPServer
from .support import SCRIPT, SUBPROCESS_TIMEOUT_S, AlertTestCase, sqlite_rows

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
PROG = "metasystem_monitor.py"


class CronRuns(AlertTestCase):
    """Each run is its own process, its clock set with METASYSTEM_NOW."""

    def run_at(self, when, *args, stdin=b""):
        result = self.run_cli(*args, stdin=stdin, env=self.cli_env(METASYSTEM_NOW=repr(when), TZ="UTC"))
        self.assertIn(result.returncode, (0, 3, 4), result.stderr)
        return result

    def kinds(self, server):
        return [r.json()["kind"] for r in server.requests]

    def test_fail_fail_fail_pass_pass_is_one_firing_and_one_resolved_per_channel(self):
        with HTTPServer() as hook, HTTPServer(default=Reply(204)) as discord:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\ndiscord_webhook_url = {discord.url('/d')}\n")
            for n in range(3):
                self.run_at(T0 + 300 * n, "alert", "--critical", "Disk full", "2 GB left", "--key", "disk")
            self.run_at(T0 + 900, "alert", "--resolve", "disk", "20 GB free")
            self.run_at(T0 + 1200, "alert", "--resolve", "--key", "disk", "20 GB free")  # the same, spelled out
        self.assertEqual(self.kinds(hook), ["firing", "resolved"])
        firing, resolved = (r.json() for r in hook.requests)
        self.assertEqual((firing["status"], firing["alerts"][0]["startsAt"]), ("firing", mm.iso_time(T0)))
        self.assertEqual(resolved["status"], "resolved")
        self.assertEqual(resolved["alerts"][0]["endsAt"], mm.iso_time(T0 + 1200))
        self.assertEqual(resolved["note"], f"resolved after 20m (firing since {mm.iso_time(T0)})")
        self.assertEqual(resolved["message"], "20 GB free")
        self.assertEqual([r.json()["embeds"][0]["title"] for r in discord.requests],
                         ["[CRITICAL] Disk full", "[RESOLVED] Disk full"])
        self.assertEqual([r.json()["embeds"][0]["color"] for r in discord.requests], [0xD00000, 0x2EB67D])
        self.assertEqual(len(self.syslog.pending()), 2)

    def test_reminders_every_hour_while_it_keeps_firing(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\nrepeat_interval_critical = 1h\n")
            for n in range(25):  # every 5 minutes for 2 hours
                self.run_at(T0 + 300 * n, "alert", "--critical", "Backup stale", "--key", "backup")
        self.assertEqual(self.kinds(hook), ["firing", "reminder", "reminder"])
        self.assertEqual([r.json()["note"] for r in hook.requests], [
            "", f"still firing since {mm.iso_time(T0)}, reminder #1",
            f"still firing since {mm.iso_time(T0)}, reminder #2"])

    def test_processes_firing_together_deliver_once(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            env = self.cli_env(METASYSTEM_NOW=repr(T0))
            children = [subprocess.Popen([sys.executable, SCRIPT, "alert", "--critical", "Disk", "--key", "disk"],
                                         env=env, cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                        for _ in range(4)]
            outputs = [child.communicate(timeout=SUBPROCESS_TIMEOUT_S) for child in children]
        self.assertEqual([c.returncode for c in children], [0] * 4, outputs)
        self.assertEqual(self.kinds(hook), ["firing"])
        self.assertEqual(len(self.syslog.pending()), 1)

    def test_a_run_killed_right_after_the_2xx_causes_no_second_delivery(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            env = self.cli_env(METASYSTEM_NOW=repr(T0))
            child = subprocess.Popen([sys.executable, SCRIPT, "alert", "--critical", "Disk", "--key", "disk"],
                                     env=env, cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # Stopped before the 2xx is written and killed after: the answer reaches the client's socket
            # and the run never reads it, whatever the scheduler does (a kill sent only after the
            # answer raced the client, which sometimes recorded the delivery first).
            hook.before_reply = lambda: os.kill(child.pid, signal.SIGSTOP)
            hook.after_reply = lambda: os.kill(child.pid, signal.SIGKILL)
            child.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            hook.before_reply = hook.after_reply = None
            self.assertEqual(child.returncode, -signal.SIGKILL)
            later = self.run_at(T0 + 300, "alert", "--critical", "Disk", "--key", "disk")
            self.run_at(T0 + 600, "alert", "--critical", "Disk", "--key", "disk")
        self.assertEqual(self.kinds(hook), ["firing"])
        self.assertIn(b"a run stopped while sending firing for disk; counted as delivered", later.stderr)

    def test_twelve_alerts_in_one_run_reach_a_channel_as_one_digest(self):
        lines = "".join(json.dumps({"key": f"check{n}", "severity": "critical" if n == 7 else "warning",
                                    "title": f"Check {n} failed"}) + "\n" for n in range(12))
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            result = self.run_at(T0, "alert", "--batch", stdin=lines.encode())
            again = self.run_at(T0 + 300, "alert", "--batch", stdin=lines.encode())
        self.assertEqual((result.returncode, again.returncode), (0, 0))
        [digest] = hook.requests
        payload = digest.json()
        self.assertEqual((payload["kind"], payload["title"], payload["severity"]), ("digest", "12 alerts", "critical"))
        self.assertEqual(payload["message"].splitlines(),
                         [f"[{'CRITICAL' if n == 7 else 'WARNING'}] Check {n} failed" for n in range(12)])
        self.assertEqual(len(self.syslog.pending()), 1)
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*), min(outcome), max(outcome) FROM alert_deliveries "
                                              "WHERE channel = 'webhook'"), [(12, "sent", "sent")])

    def test_each_bad_batch_line_is_reported_by_number_and_the_others_still_go_out(self):
        lines = [json.dumps({"key": "a", "title": "A"}), "not json", '{"title": "no key"}',
                 '{"key": "b", "state": "maybe"}', '{"key": "b", "severity": "loud"}',
                 '{"key": "c", "title": "\\ud83d lone"}', '{"key": "d", "details": "text"}',
                 '{"key": "e", "details": 5}', '{"key": "f", "title": 7}', '{"key": "g", "severty": "critical"}',
                 '{"key": "", "title": "empty key"}',
                 json.dumps({"key": "h", "severity": "critical", "title": "H", "details": {"n": [1, 2]}})]
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            result = self.run_cli("alert", "--batch", stdin=("\n".join(lines) + "\n").encode(),
                                  env=self.cli_env(METASYSTEM_NOW=repr(T0)))
        self.assertEqual((result.returncode, result.stdout), (2, b""))
        self.assertEqual(result.stderr.decode().splitlines(), [
            f"metasystem_monitor.py: error: line {n}: {why}; that line was not sent" for n, why in (
                (2, "not a JSON object"),
                (3, 'expected {"key": ..., "state": "firing" or "ok", "severity", "title", "message", "details"}'),
                (4, 'expected {"key": ..., "state": "firing" or "ok", "severity", "title", "message", "details"}'),
                (5, "severity must be one of info, warning, critical, got 'loud'"),
                (7, "details must be an object of KEY: VALUE, got 'text'"),
                (8, "details must be an object of KEY: VALUE, got 5"),
                (9, "title must be text, got 7"),
                (10, "unknown field 'severty'; the fields are key, state, severity, title, message, details"),
                (11, 'expected {"key": ..., "state": "firing" or "ok", "severity", "title", "message", "details"}'))])
        self.assertEqual([(r.json()["dedup_key"], r.json()["severity"], r.json()["title"]) for r in hook.requests],
                         [("a", "warning", "A"), ("c", "warning", "\ufffd lone"), ("h", "critical", "H")])
        self.assertEqual(sqlite_rows(self.db, "SELECT dedup_key, severity, title, details FROM alerts ORDER BY id"),
                         [("a", "warning", "A", "{}"), ("c", "warning", "\ufffd lone", "{}"),
                          ("h", "critical", "H", '{"n": "[1, 2]"}')])

    def test_a_silence_suppresses_is_recorded_and_expires(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            added = self.run_at(T0, "silence", "add", "--match", "backup", "--for", "1h", "--comment", "moving")
            listed = self.run_at(T0 + 60, "silence", "list")
            self.run_at(T0 + 60, "alert", "--critical", "Backup stale", "--key", "nas-backup")
            self.run_at(T0 + 1800, "alert", "--critical", "Backup stale", "--key", "nas-backup")
            self.run_at(T0 + 3600, "alert", "--critical", "Backup stale", "--key", "nas-backup")
        self.assertEqual(added.stdout, b"1\n")
        self.assertEqual(listed.stdout.decode(), "1  backup  until 01-15 09:00 UTC  active  # moving\n")
        self.assertEqual(self.kinds(hook), ["firing"])
        self.assertEqual(hook.requests[0].json()["alerts"][0]["startsAt"], mm.iso_time(T0 + 60))
        self.assertEqual(sqlite_rows(self.db, "SELECT outcome, error, count(*) FROM alert_deliveries "
                                              "WHERE channel = 'webhook' GROUP BY outcome, error ORDER BY outcome"),
                         [("sent", None, 1), ("silenced", "silence #1", 2)])

    def test_firing_lists_what_fires_and_each_channels_last_delivery(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            self.run_at(T0, "alert", "--warning", "Slow sync", "31 s", "--key", "sync")
            self.run_at(T0 + 60, "alert", "--critical", "Disk", "--key", "disk")
            self.run_at(T0 + 120, "alert", "--resolve", "disk")
            self.run_at(T0 + 150, "alert", "--resolve", "disk")
        result = self.run_at(T0 + 180, "alerts", "--firing", "--json")
        [entry] = json.loads(result.stdout)["firing"]
        self.assertEqual({k: entry[k] for k in ("key", "severity", "since", "title", "message", "flips")},
                         {"key": "sync", "severity": "warning", "since": mm.iso_time(T0), "title": "Slow sync",
                          "message": "31 s", "flips": 1})
        self.assertEqual(entry["channels"]["webhook"],
                         {"last_delivered": mm.iso_time(T0), "severity": "warning", "reminders": 0, "held": False})
        text = self.run_at(T0 + 180, "alerts", "--firing")
        self.assertEqual(text.stdout.decode(), "sync  warning   since 01-15 08:00 UTC  (1 failing run)  Slow sync  "
                                               "log=01-15 08:00 webhook=01-15 08:00\n")

    def test_a_check_that_depends_on_a_critical_one_is_inhibited_until_that_one_recovers(self):
        router, site = os.path.join(self.tmp, "router-up"), os.path.join(self.tmp, "site-up")
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n"
                              f"[check:router]\ntype = file_age\npath = {router}\n\n"
                              f"[check:site]\ntype = file_age\npath = {site}\ndepends_on = router\n")
            first = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0), TZ="UTC"))
            titles = [request.json()["dedup_key"] for request in hook.requests]
            open(router, "w").close()
            os.utime(router, (T0, T0))
            second = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 300), TZ="UTC"))
        self.assertEqual((first.returncode, first.stderr, second.returncode, second.stderr), (2, b"", 2, b""))
        self.assertEqual(first.stdout.decode().splitlines()[1:], [f"CRITICAL router: {router} does not exist",
                                                                  f"CRITICAL site: {site} does not exist"])
        self.assertEqual(titles, ["router"])
        self.assertEqual(hook.requests[-1].json()["dedup_key"], "site")
        self.assertEqual(sqlite_rows(self.db, "SELECT a.dedup_key, d.outcome, d.error FROM alert_deliveries d JOIN "
                                              "alerts a ON a.id = d.alert_id WHERE d.channel = 'webhook' ORDER BY a.id"),
                         [("router", "sent", None), ("site", "inhibited", "router is CRITICAL"), ("site", "sent", None)])
        self.write_config("[check:a]\ntype = disk\ndepends_on = a\n\n[check:b]\ntype = disk\ndepends_on = nothere\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual(out.splitlines(), [f"{self.config_path}: [check:a] depends_on: a check cannot depend on itself",
                                            f"{self.config_path}: [check:b] depends_on: no check named 'nothere'"])

    def test_an_acknowledged_alert_stops_reminding_until_its_severity_rises_and_still_resolves(self):
        import monitoring_dashboard as dash

        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\nrepeat_interval_warning = 1h\n"
                              "repeat_interval_critical = 1h\n")
            self.run_at(T0, "alert", "--warning", "Disk filling", "--key", "disk")
            acked = self.run_cli("alerts", "ack", "disk", "--comment", "moving files", "--by", "ana",
                                 env=self.cli_env(METASYSTEM_NOW=repr(T0 + 60), TZ="UTC"))
            listed = self.run_at(T0 + 120, "alerts", "--firing")
            self.run_at(T0 + 2 * 3600, "alert", "--warning", "Disk filling", "--key", "disk")  # no reminder
            self.run_at(T0 + 3 * 3600, "alert", "--critical", "Disk full", "--key", "disk")  # rises: news
            self.run_at(T0 + 4 * 3600 + 60, "alert", "--critical", "Disk full", "--key", "disk")  # a reminder again
            for when in (T0 + 5 * 3600, T0 + 5 * 3600 + 60):
                self.run_at(when, "alert", "--resolve", "disk")
            missing = self.run_cli("alerts", "ack", "disk", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 6 * 3600)))
        self.assertEqual((acked.returncode, acked.stdout, acked.stderr), (0, b"", b""))
        self.assertEqual(listed.stdout.decode(), "disk  warning   since 01-15 08:00 UTC  (1 failing run)  Disk filling  "
                                                 "acknowledged by ana at 01-15 08:01 (moving files)  "
                                                 "log=01-15 08:00 webhook=01-15 08:00\n")
        self.assertEqual([(r.json()["kind"], r.json()["severity"]) for r in hook.requests],
                         [("firing", "warning"), ("firing", "critical"), ("reminder", "critical"),
                          ("resolved", "critical")])
        self.assertEqual((missing.returncode, missing.stderr.decode()),
                         (1, "metasystem_monitor.py: error: no firing alert 'disk' (nothing fires)\n"))
        summary = mm.read_summary(self.db, now=lambda: T0 + 300)
        [ack] = [alert for alert in summary["alerts"] if alert["kind"] == "acknowledged"]
        self.assertEqual(ack, {"time": mm.iso_time(T0 + 60), "kind": "acknowledged", "severity": "warning",
                               "title": "Disk filling", "channels": {}, "message": "acknowledged by ana: moving files"})
        self.assertIn("  01-15 08:01 ACKED    Disk filling (acknowledged by ana: moving files)\n",
                      dash.plain_text(summary))
        self.assertIn('<td class="OK">ACKED</td><td>01-15 08:01</td><td>Disk filling (acknowledged by ana: moving '
                      'files)</td>', mm.status_page(summary))

    def test_a_critical_alert_unacknowledged_escalates_once_and_its_resolved_follows(self):
        with HTTPServer() as chat, HTTPServer() as pager:
            self.write_config(f"[alerting]\nrepeat_interval_critical = 4h\n\n"
                              f"[channel:chat]\ntype = webhook\nurl = {chat.url('/c')}\nescalate_after = 30m\n"
                              "escalate_to = pager\n\n"
                              f"[channel:pager]\ntype = webhook\nurl = {pager.url('/p')}\n")
            for minute in (0, 20, 31, 45):
                self.run_at(T0 + 60 * minute, "alert", "--critical", "Database down", "--key", "db")
                self.run_at(T0 + 60 * minute, "alert", "--critical", "Queue stuck", "--key", "queue")
                self.run_at(T0 + 60 * minute, "alert", "--warning", "Disk filling", "--key", "disk")
                if minute == 0:
                    self.run_at(T0 + 60, "alerts", "ack", "queue", "--by", "ana")
            for minute in (50, 51):
                self.run_at(T0 + 60 * minute, "alert", "--resolve", "db")
        self.assertEqual(sorted((r.json()["dedup_key"], r.json()["kind"]) for r in chat.requests),
                         [("db", "firing"), ("db", "resolved"), ("disk", "firing"), ("queue", "firing")])
        self.assertEqual([(r.json()["dedup_key"], r.json()["kind"], r.json()["note"]) for r in pager.requests], [
            ("db", "firing", "escalated from chat: firing for 31m without an acknowledgement"),
            ("db", "resolved", f"resolved after 51m (firing since {mm.iso_time(T0)})")])
        shown = self.run_at(T0, "config").stdout.decode()
        self.assertIn("escalate_after = 30m\nescalate_to = pager\n", shown)
        self.write_config("[channel:a]\ntype = webhook\nurl = http://127.0.0.1:1/\nescalate_after = 1h\n\n"
                          "[channel:b]\ntype = webhook\nurl = http://127.0.0.1:1/\nescalate_to = nowhere\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [channel:a] escalate_to: escalate_after needs escalate_to too",
            f"{self.config_path}: [channel:b] escalate_after: escalate_to needs escalate_after too",
            f"{self.config_path}: [channel:b] escalate_to: names 'nowhere', which is not a channel"])

    def test_planned_maintenance_silences_what_matches_while_it_holds_and_silence_list_shows_it(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n"
                              "[maintenance:nightly]\nmatch = backup\ndaily = 08:30-09:15\n\n"
                              "[maintenance:weekend]\nmatch = key=nas\nweekly = Sat,Sun 22:00-02:00\n\n"
                              "[maintenance:move]\nmatch = nas\nfrom = 2027-02-01\nuntil = 2027-02-02 12:00\n\n"
                              "[maintenance:tokyo]\nmatch = tokyo\ndaily = 17:00-18:00\ntimezone = Asia/Tokyo\n")
            listed = self.run_at(T0, "silence", "list")
            self.run_at(T0 + 45 * 60, "alert", "--critical", "Backup failed", "--key", "backup")  # 08:45
            self.run_at(T0 + 60 * 60, "alert", "--critical", "Backup failed", "--key", "backup")  # 09:00
            self.run_at(T0 + 80 * 60, "alert", "--critical", "Backup failed", "--key", "backup")  # 09:20: over
        self.assertEqual(listed.stdout.decode().splitlines(), [
            "maintenance tokyo  tokyo  01-15 08:00 UTC to 01-15 09:00 UTC  active",
            "maintenance nightly  backup  01-15 08:30 UTC to 01-15 09:15 UTC  planned",
            "maintenance weekend  key=nas  01-16 22:00 UTC to 01-17 02:00 UTC  planned",
            "maintenance move  nas  02-01 00:00 UTC to 02-02 12:00 UTC  planned"])
        self.assertEqual([r.json()["kind"] for r in hook.requests], ["firing"])
        self.assertEqual(sqlite_rows(self.db, "SELECT d.outcome, d.error FROM alert_deliveries d JOIN alerts a ON "
                                              "a.id = d.alert_id WHERE d.channel = 'webhook' ORDER BY a.id"),
                         [("silenced", "maintenance nightly"), ("silenced", "maintenance nightly"), ("sent", None)])

    def test_a_maintenance_section_that_cannot_be_read_is_named(self):
        self.write_config("[maintenance:a]\nmatch = x\nweekly = Funday 02:00-04:00\n\n"
                          "[maintenance:b]\nmatch = x\ndaily = 25:00-26:00\n\n"
                          "[maintenance:c]\ndaily = 02:00-03:00\nweekly = Sun 02:00-03:00\n\n"
                          "[maintenance:d]\nmatch = x\nfrom = 2027-02-02\nuntil = 2027-02-01\ntimezone = Mars/Base\n"
                          "colour = red\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [f"{self.config_path}: {line}" for line in (
            "[maintenance:a] weekly: 'Funday' is not a list of days such as Sun or Sat,Sun",
            "[maintenance:b] daily: '25:00-26:00' is not a time range such as 02:00-04:00",
            "[maintenance:c] match: required: the key or title text it silences (key=K: one key)",
            "[maintenance:c] daily: give one of daily, weekly or from (with until)",
            "[maintenance:d] colour: unknown key",
            "[maintenance:d] timezone: 'Mars/Base' is not a time zone this machine knows",
            "[maintenance:d] until: must be after from")])

    def test_a_daily_window_opens_and_closes_on_the_wall_clock_on_the_days_clocks_change(self):
        """daily = 01:00-03:00 in Europe/Berlin: on 2025-10-26 both 02:30s are inside it (three hours), on
        2025-03-30 03:30 is outside (one hour); the same in the machine's local time with TZ set so."""
        import datetime

        def utc(text):
            return datetime.datetime.fromisoformat(text + "+00:00").timestamp()

        moments = {"autumn-first-0230": ("2025-10-26T00:30", "silenced"),
                   "autumn-second-0230": ("2025-10-26T01:30", "silenced"),
                   "autumn-0330": ("2025-10-26T02:30", "sent"),
                   "autumn-0030": ("2025-10-25T22:30", "sent"),
                   "spring-0130": ("2025-03-30T00:30", "silenced"),
                   "spring-0330": ("2025-03-30T01:30", "sent"),
                   "plain-day-0230": ("2025-03-29T01:30", "silenced")}
        for zone_key, machine in (("timezone = Europe/Berlin\n", "Asia/Tokyo"), ("", "Europe/Berlin")):
            with self.subTest(zone_key=zone_key, machine=machine), HTTPServer() as hook:
                self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n"
                                  f"[maintenance:night]\nmatch = backup\ndaily = 01:00-03:00\n{zone_key}")
                for key, (when, _) in moments.items():
                    title = f"backup {machine} {key}"
                    result = self.run_cli("alert", "--critical", title, "--key", title.replace(" ", "-"),
                                          env=self.cli_env(METASYSTEM_NOW=repr(utc(when)), TZ=machine))
                    self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""), key)
                rows = sqlite_rows(self.db, "SELECT a.title, d.outcome, d.error FROM alert_deliveries d JOIN alerts a "
                                            "ON a.id = d.alert_id WHERE d.channel = 'webhook' AND a.title LIKE ? "
                                            "ORDER BY a.id", (f"backup {machine} %",))
                self.assertEqual(rows, [(f"backup {machine} {key}", outcome,
                                         "maintenance night" if outcome == "silenced" else None)
                                        for key, (_, outcome) in moments.items()])
                self.assertEqual([r.json()["title"] for r in hook.requests],
                                 [f"backup {machine} {key}" for key, (_, outcome) in moments.items()
                                  if outcome == "sent"])

    def test_dates_at_the_edges_of_time_are_shown_or_refused_never_a_crash(self):
        """9999-12-31 23:59 west of UTC, or 0001-01-01 east of it, is past what can be shown: config --check
        names the key; within the range the window works in every command, whatever the machine's zone."""
        missing = os.path.join(self.tmp, "missing")
        edges = ("[maintenance:ever]\nmatch = backup\nfrom = 0001-01-01\nuntil = 9999-12-31 23:59\ntimezone = UTC\n\n"
                 "[maintenance:tokyo]\nmatch = tokyo\nfrom = 2027-01-15\nuntil = 9999-12-31 23:59\n"
                 "timezone = Asia/Tokyo\n\n"
                 f"[check:backup]\ntype = file_age\npath = {missing}\n")
        for machine, shown in (("Asia/Tokyo", "maintenance ever  backup  01-01 09:18 LMT to 12-31 23:59 UTC  active\n"
                                              "maintenance tokyo  tokyo  01-15 00:00 JST to 12-31 23:59 JST  active\n"),
                               ("America/New_York", "maintenance ever  backup  01-01 00:00 UTC to 12-31 18:59 EST  "
                                                    "active\nmaintenance tokyo  tokyo  01-14 10:00 EST to 12-31 "
                                                    "09:59 EST  active\n")):
            with self.subTest(machine=machine), HTTPServer() as hook:
                self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n{edges}")
                env = self.cli_env(METASYSTEM_NOW=repr(T0), TZ=machine)
                self.assertCleanExit(self.run_cli("config", "--check", env=env), 0,
                                     "configuration OK: 2 channels (log, webhook)\n")
                self.assertCleanExit(self.run_cli("silence", "list", env=env), 0, shown)
                self.assertCleanExit(self.run_cli("alert", "--critical", "Backup failed", "--key", "backup", env=env))
                self.assertCleanExit(self.run_cli("check", env=env), 2, f"METASYSTEM CRITICAL - backup CRITICAL: "
                                     f"{missing} does not exist\nCRITICAL backup: {missing} does not exist\n")
                self.assertEqual(hook.requests, [])  # both held by the maintenance that runs until 9999
        self.assertEqual(sqlite_rows(self.db, "SELECT DISTINCT outcome, error FROM alert_deliveries WHERE channel = "
                                              "'webhook'"), [("silenced", "maintenance ever")])
        past = ("[maintenance:west]\nmatch = x\nuntil = 9999-12-31 23:59\nfrom = 2027-01-01\n"
                "timezone = America/New_York\n\n[maintenance:east]\nmatch = x\nfrom = 0001-01-01\n"
                "until = 2027-01-01\ntimezone = Asia/Tokyo\n\n[maintenance:local]\nmatch = x\nfrom = 0001-01-01\n"
                "until = 9999-12-31 23:59\n")
        late, early = "is after the year 9999 in UTC: too late to be shown", "is before the year 1 in UTC: too early " \
                                                                           "to be shown"
        for machine, local in (("Asia/Tokyo", f"from: '0001-01-01' {early}"),
                               ("America/New_York", f"until: '9999-12-31 23:59' {late}")):
            with self.subTest(machine=machine):
                self.write_config(past + f"\n[check:backup]\ntype = file_age\npath = {missing}\n")
                env = self.cli_env(METASYSTEM_NOW=repr(T0), TZ=machine)
                problems = [f"{self.config_path}: [maintenance:{line}" for line in (
                    f"west] until: '9999-12-31 23:59' {late}", f"east] from: '0001-01-01' {early}", f"local] {local}")]
                self.assertCleanExit(self.run_cli("config", "--check", env=env), 1, "".join(p + "\n" for p in problems))
                said = "".join(f"{PROG}: error: {p}\n" for p in problems)
                for args in (("silence", "list"), ("alert", "--critical", "x")):
                    with self.subTest(args=args):  # the rest works; each problem said, and exit 1
                        result = self.run_cli(*args, env=env)
                        self.assertEqual(result.returncode, 1)
                        self.assertTrue(result.stderr.decode().endswith(said), result.stderr)
                shown = self.run_cli("config", env=env)
                self.assertEqual((shown.returncode, shown.stderr.decode()), (1, said))
                checked = self.run_cli("check", env=env)
                lines = checked.stdout.decode().splitlines()
                self.assertEqual((checked.returncode, lines[1:2]), (2, [f"CRITICAL backup: {missing} does not exist"]))
                self.assertTrue(lines[0].startswith(f"METASYSTEM CRITICAL - backup CRITICAL: {missing} does not "
                                                    f"exist; configuration UNKNOWN: 3 problems in {self.config_path}: "
                                                    f"[maintenance:west] until: '9999-12-31 23:59' {late}"), lines[0])
                self.assertTrue(lines[2].startswith(f"UNKNOWN configuration: 3 problems in {self.config_path}"))
                self.assertEqual(len(lines), 3)  # then, no channel but the log configured, the alerts themselves
                self.assertTrue(checked.stderr.decode().startswith(said), checked.stderr)
                self.assertNotIn("unexpected", checked.stderr.decode())

    def test_quiet_repeats_of_a_failing_check_are_a_count_not_history(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n"
                              f"[check:backup]\ntype = file_age\npath = {os.path.join(self.tmp, 'never-made')}\n")
            for minute in range(3):
                run = self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(T0 + 300 * minute), TZ="UTC"))
                self.assertEqual((run.returncode, run.stderr), (2, b""))
            listed = self.run_at(T0 + 900, "alerts", "--firing", "--json")
        self.assertEqual(len(hook.requests), 1)
        self.assertEqual(sqlite_rows(self.db, "SELECT kind, title FROM alerts"), [("firing", "check backup")])
        self.assertEqual(sqlite_rows(self.db, "SELECT channel, outcome FROM alert_deliveries ORDER BY channel"),
                         [("log", "sent"), ("webhook", "sent")])
        [entry] = json.loads(listed.stdout)["firing"]
        self.assertEqual((entry["key"], entry["failing_runs"]), ("backup", 3))
        self.assertEqual([alert["title"] for alert in mm.read_summary(self.db, now=lambda: T0 + 900)["alerts"]],
                         ["check backup"])


    def test_warning_then_critical_is_delivered_at_once_and_a_decrease_waits(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\nrepeat_interval_warning = 4h\n")
            for when, level in ((T0, "--warning"), (T0 + 300, "--critical"), (T0 + 600, "--warning"),
                                (T0 + 600 + 4 * 3600, "--warning")):
                self.run_at(when, "alert", level, "Disk filling", "--key", "disk")
        payloads = [r.json() for r in hook.requests]
        self.assertEqual([(p["kind"], p["severity"]) for p in payloads],
                         [("firing", "warning"), ("firing", "critical"), ("reminder", "warning")])
        self.assertEqual(payloads[1]["note"], "severity raised from warning to critical")

    def test_a_channel_that_failed_the_firing_gets_no_resolved_and_is_retried_next_run(self):
        with HTTPServer(Reply(404), Reply(404)) as slack, HTTPServer() as hook:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\nwebhook_url = {hook.url()}\n")
            first = self.run_at(T0, "alert", "--critical", "Disk", "--key", "disk")
            self.run_at(T0 + 300, "alert", "--resolve", "disk")
            self.run_at(T0 + 600, "alert", "--resolve", "disk")
            self.assertEqual((first.returncode, len(slack.requests)), (3, 1))
            self.assertEqual(self.kinds(hook), ["firing", "resolved"])
            self.run_at(T0 + 900, "alert", "--critical", "Disk", "--key", "disk")  # fires again; slack fails
            self.run_at(T0 + 1200, "alert", "--critical", "Disk", "--key", "disk")  # slack recovers
            self.run_at(T0 + 1500, "alert", "--critical", "Disk", "--key", "disk")  # quiet
        self.assertEqual([r.json()["text"] for r in slack.requests], ["[CRITICAL] Disk"] * 3)
        self.assertEqual(self.kinds(hook), ["firing", "resolved", "firing"])

    def test_fire_after_three_in_a_row_ignores_a_check_that_fails_every_other_run(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\nfire_after = 3\n")
            for n, failing in enumerate((True, False, True, False, True, False)):
                self.run_at(T0 + 300 * n, "alert", *(("--critical", "Flaky", "--key", "flaky") if failing
                                                      else ("--resolve", "flaky")))
        self.assertEqual(hook.requests, [])
        self.assertEqual(sqlite_rows(self.db, "SELECT state, recent, flips FROM alert_states"), [("ok", "FPFPFP", 0)])

    def test_three_within_five_catches_it(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\nfire_after = 3 within 5\n")
            for n, failing in enumerate((True, False, True, False, True)):
                self.run_at(T0 + 300 * n, "alert", *(("--critical", "Flaky", "--key", "flaky") if failing
                                                      else ("--resolve", "flaky")))
                self.assertEqual(len(hook.requests), 1 if n == 4 else 0)
        self.assertEqual(self.kinds(hook), ["firing"])
        self.assertEqual(sqlite_rows(self.db, "SELECT state, flips FROM alert_states"), [("firing", 1)])

    def test_quiet_hours_hold_a_warning_for_one_catch_up_and_let_a_critical_through(self):
        night = T0 + 15 * 3600  # 23:00 UTC
        morning = T0 + 23.5 * 3600 + 60  # 07:31 UTC: the quiet hours are over
        with HTTPServer() as hook:
            self.write_config(f"[channel:night]\ntype = webhook\nurl = {hook.url()}\n"
                              "quiet_hours = 22:00-07:30\nquiet_hours_bypass = critical\n")
            held = self.run_at(night, "alert", "--warning", "Slow sync", "--key", "sync", "-v")
            self.run_at(night, "alert", "--warning", "Backup took long")
            self.run_at(night + 300, "alert", "--warning", "Slow sync", "--key", "sync")  # not held twice
            self.run_at(night + 300, "alert", "--critical", "Disk full", "--key", "disk")  # bypasses them
            self.assertEqual([r.json()["title"] for r in hook.requests], ["Disk full"])
            self.run_at(morning, "alert", "--warning", "Slow sync", "--key", "sync")
            self.run_at(morning + 300, "alert", "--warning", "Slow sync", "--key", "sync")
        self.assertEqual(sqlite_rows(self.db, "SELECT outcome FROM alert_deliveries d JOIN alerts a "
                                              "ON a.id = d.alert_id WHERE channel = 'night' ORDER BY a.id LIMIT 2"),
                         [("held",), ("held",)])
        self.assertEqual(held.returncode, 0)
        catch_up = hook.requests[1].json()
        self.assertEqual((catch_up["kind"], catch_up["title"], catch_up["severity"]),
                         ("catchup", "2 notifications held during quiet hours", "warning"))
        self.assertEqual(catch_up["message"].splitlines(),
                         ["23:00 FIRING [WARNING] Slow sync", "23:00 ALERT [WARNING] Backup took long"])
        self.assertEqual(len(hook.requests), 2)  # the held FIRING counts as delivered: no second one


class LifecycleInProcess(AlertTestCase):
    def test_resolve_after_needs_consecutive_passes_and_flips_are_counted(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\nresolve_after = 2\n")
            for failing in (True, False, True, False, False, True, False, False):
                alerts.fire("k", "K") if failing else alerts.resolve("k")
        self.assertEqual([r.json()["kind"] for r in hook.requests], ["firing", "resolved", "firing", "resolved"])
        self.assertEqual(sqlite_rows(self.db, "SELECT state, flips FROM alert_states"), [("ok", 4)])

    def test_never_a_resolved_for_a_firing_that_was_never_delivered(self):
        with HTTPServer() as hook:
            alerts = self.system(f"[alerting]\nwebhook_url = {hook.url()}\n")
            alerts.add_silence("key=disk", 3600)
            alerts.fire("disk", "Disk")
            alerts.resolve("disk")
            report = alerts.resolve("disk")
        self.assertEqual((hook.requests, dict(report)), ([], {}))

    def test_send_resolved_false_turns_it_off_for_one_channel(self):
        with HTTPServer() as hook, HTTPServer() as other:
            alerts = self.system(f"[channel:a]\ntype = webhook\nurl = {hook.url()}\nsend_resolved = false\n\n"
                                 f"[channel:b]\ntype = webhook\nurl = {other.url()}\n")
            alerts.fire("k", "K")
            alerts.resolve("k")
            alerts.resolve("k")
        self.assertEqual([r.json()["kind"] for r in hook.requests], ["firing"])
        self.assertEqual([r.json()["kind"] for r in other.requests], ["firing", "resolved"])

    def test_a_failing_channel_falls_back_and_its_failure_stays_in_history(self):
        with HTTPServer(default=Reply(404, "gone")) as slack, SMTPServer() as smtp:
            alerts = self.system(f"[channel:slack]\ntype = slack\nurl = {slack.url('/s')}\nfallback = mail\n\n"
                                 f"[channel:mail]\ntype = email\nto = me@example.com\nsmtp_host = 127.0.0.1\n"
                                 f"smtp_port = {smtp.port}\nsecurity = none\nmin_severity = critical\n")
            report = alerts.fire("sync", "Slow sync", severity="warning")
            alerts.resolve("sync")
            alerts.resolve("sync")
        self.assertEqual({k: (d.outcome, d.error) for k, d in report.outcomes.items()},
                         {"log": ("sent", None), "slack": ("failed", "HTTP 404: gone"),
                          "mail": ("sent", "fallback for slack")})
        self.assertEqual([m.message()["Subject"] for m in smtp.mails],
                         ["[WARNING] Slow sync", "[RESOLVED] Slow sync"])
        self.assertIn("WARNING channel slack failed: trying its fallback mail", self.logged)

    def test_one_shot_alerts_fall_back_too(self):
        with HTTPServer(default=Reply(404)) as primary, HTTPServer() as backup:
            alerts = self.system(f"[channel:a]\ntype = webhook\nurl = {primary.url()}\nfallback = b\n\n"
                                 f"[channel:b]\ntype = webhook\nurl = {backup.url()}\nmin_severity = critical\n")
            report = alerts.send_warning_alert("Slow")
        self.assertEqual(report, {"log": True, "a": False, "b": True})
        self.assertEqual(report.exit_code(), 3)
        self.assertEqual(len(backup.requests), 1)


class LifecycleSettings(AlertTestCase):
    def test_bad_lifecycle_values_are_problems_with_section_and_key(self):
        self.write_config("[alerting]\nfire_after = 3 within 2\nresolve_after = 0\nrepeat_interval_info = soon\n\n"
                          "[channel:a]\ntype = log\nquiet_hours = 22:00-25:00\nquiet_hours_bypass = loud\n"
                          "fallback = nowhere\n")
        settings = mm.alerting_settings(mm.load_config(self.config_path), self.config_path)
        self.assertEqual([(section, key) for section, key, _ in settings.problems],
                         [("channel:a", "quiet_hours"), ("channel:a", "quiet_hours_bypass"),
                          ("channel:a", "fallback"), ("alerting", "repeat_interval_info"),
                          ("alerting", "fire_after"), ("alerting", "resolve_after")])

    def test_quiet_hours_across_midnight(self):
        spec = mm.ChannelSpec("x", "log", "", {}, {}, {}, "info", 10, 20, quiet_hours=mm.parse_quiet_hours("22:00-07:30"),
                              quiet_bypass="critical")
        self.assertEqual([spec.is_quiet(m, "warning") for m in (21 * 60 + 59, 22 * 60, 0, 7 * 60 + 29, 7 * 60 + 30)],
                         [False, True, True, True, False])
        self.assertFalse(spec.is_quiet(23 * 60, "critical"))


if __name__ == "__main__":
    unittest.main()
