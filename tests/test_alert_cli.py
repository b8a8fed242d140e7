"""The alert, alert-test, alerts and config commands, run as cron runs them: real subprocesses."""

import json
import os
import re
import subprocess
import sys
import unittest
from typing import Set, Tuple

import metasystem_monitor as mm

from .servers import HTTPServer, Reply, SMTPServer
from .support import REPO, SCRIPT, SUBPROCESS_TIMEOUT_S, AlertTestCase, file_bytes, sqlite_rows

PROG = "metasystem_monitor.py"


class AlertCommand(AlertTestCase):
    def alert(self, *args, env=None):
        return self.run_cli("alert", *args, env=env or self.cli_env())

    def test_delivered_is_silent_with_exit_0(self):
        with HTTPServer() as slack:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\n")
            result = self.alert("--critical", "Backup failed", "rsync exited with 23", "--detail", "host=nas")
        self.assertCleanExit(result)
        self.assertEqual(slack.requests[0].json()["text"], "[CRITICAL] Backup failed")
        [datagram] = self.syslog.pending()
        self.assertTrue(datagram.endswith(b"]: [CRITICAL] Backup failed | rsync exited with 23 | host: nas"))

    def test_one_channel_failing_is_exit_3_and_all_failing_is_exit_4(self):
        with HTTPServer(default=Reply(404, "no_team")) as slack, HTTPServer() as hook:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\nwebhook_url = {hook.url()}\n")
            partial = self.alert("--warning", "Slow")
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\n")
            none = self.alert("--warning", "Slower")
        self.assertEqual((partial.returncode, partial.stdout), (3, b""))
        self.assertEqual(partial.stderr.decode(),
                         f"{PROG}: warning: channel slack failed after 1 attempt: HTTP 404: no_team\n")
        self.assertEqual((none.returncode, none.stdout), (4, b""))
        self.assertEqual(none.stderr.decode(),
                         f"{PROG}: warning: channel slack failed after 1 attempt: HTTP 404: no_team\n"
                         f"{PROG}: warning: [WARNING] Slower\n"  # no channel has it: stderr, which cron mails
                         f"{PROG}: error: no channel delivered the alert\n")

    def test_nothing_configured_is_exit_0_said_on_stderr_unless_quiet(self):
        self.write_config("")
        said = self.alert("--info", "Hello")
        quiet = self.run_cli("-q", "alert", "--info", "Hello again", env=self.cli_env())
        self.assertEqual((said.returncode, said.stdout), (0, b""))
        self.assertEqual(said.stderr.decode(), f"{PROG}: warning: no alert channel is configured: "
                                               "the alert went to the log only (see alerting-config.example.ini)\n")
        self.assertCleanExit(quiet)
        self.assertEqual(len(self.syslog.pending()), 2)

    def test_a_disabled_channel_is_silent_and_config_says_it_is_disabled(self):
        with HTTPServer() as hook:
            self.write_config(f"[channel:hook]\ntype = webhook\nurl = {hook.url('/h')}\n\n"
                              "[channel:chat]\ntype = slack\nurl_env = MM_UNSET_FOR_THIS_TEST\nenabled = false\n\n"
                              "[channel:old]\ntype = discord\nurl = https://discord.invalid/x\nenabled = no\n")
            result = self.alert("--warning", "Disk filling")
            named = self.alert("--warning", "Disk still filling", "--channel", "old")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""))
        self.assertEqual(len(hook.requests), 1)
        self.assertEqual((named.returncode, named.stderr.decode()),  # asked for, it did not get the alert
                         (4, f"{PROG}: warning: [WARNING] Disk still filling\n"
                             f"{PROG}: warning: channel old skipped (disabled)\n"
                             f"{PROG}: error: no channel delivered the alert\n"))
        self.assertEqual(sqlite_rows(self.db, "SELECT a.title, d.channel, d.outcome, d.error FROM alerts a JOIN "
                                              "alert_deliveries d ON d.alert_id = a.id WHERE d.channel != 'log' "
                                              "ORDER BY a.id"),
                         [("Disk filling", "hook", "sent", None),
                          ("Disk still filling", "old", "not_configured", "disabled")])
        shown = self.run_cli("config", env=self.cli_env()).stdout.decode()
        self.assertIn("[channel:chat]\ntype = slack\n# disabled\n", shown)
        self.assertIn("[channel:old]\ntype = discord\nurl = https://discord.invalid/***  # from file\n# disabled\n",
                      shown)

    def test_a_channel_asked_for_but_not_configured(self):
        self.write_config("")
        result = self.alert("--critical", "Disk", "--channel", "pager", "-q")
        self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                         (4, b"", f"{PROG}: critical: [CRITICAL] Disk\n{PROG}: error: no channel delivered the alert\n"))
        self.assertEqual(sqlite_rows(self.db, "SELECT channel, outcome FROM alert_deliveries"),
                         [("pager", "not_configured")])

    def test_a_bad_channel_costs_only_itself_the_others_deliver_and_the_run_exits_1(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n\n[channel:x]\ntype = victorops\n")
            result = self.alert("--critical", "Disk")
        self.assertEqual((result.returncode, result.stdout), (1, b""))
        self.assertEqual(result.stderr.decode().splitlines(), [
            f"{PROG}: error: {self.config_path}: [channel:x] type: unknown channel type 'victorops'; one of "
            "alertmanager, discord, email, gotify, log, matrix, mattermost, ntfy, opsgenie, pagerduty, pushover, "
            "rocketchat, slack, teams, telegram, webhook"])
        self.assertEqual([r.json()["title"] for r in hook.requests], ["Disk"])

    def test_a_broken_store_still_lets_the_alert_out_and_says_so(self):
        with open(self.db, "wb") as handle:
            handle.write(b"not a database, and it must stay this way\n" * 100)
        before = file_bytes(self.db)
        with HTTPServer() as slack:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\n")
            result = self.alert("--critical", "Disk full")
        self.assertEqual((result.returncode, result.stdout), (1, b""))
        self.assertEqual(result.stderr.decode().splitlines(), [
            f"{PROG}: error: store {self.db} is not a SQLite database: sending without deduplication or history"])
        self.assertEqual(len(slack.requests), 1)
        self.assertEqual(len(self.syslog.pending()), 1)
        self.assertEqual(file_bytes(self.db), before)

    def test_usage_errors_are_exit_2(self):
        self.write_config("")
        for args in (("Disk",), ("--info", "--critical", "Disk"), ("--info", "Disk", "--detail", "novalue")):
            with self.subTest(args=args):
                result = self.alert(*args)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.decode().splitlines()), 1, result.stderr)

    def test_dedup_holds_between_separate_processes(self):
        with HTTPServer() as slack, HTTPServer() as hook:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\nwebhook_url = {hook.url()}\n")
            runs = [self.alert("--critical", "Disk full", f"run {n}") for n in range(3)]
        self.assertEqual([r.returncode for r in runs], [0, 0, 0])
        self.assertEqual((len(slack.requests), len(hook.requests)), (1, 1))
        self.assertEqual(sqlite_rows(self.db, "SELECT channel, outcome, count(*) FROM alert_deliveries "
                                              "GROUP BY channel, outcome ORDER BY channel, outcome"),
                         [("log", "deduplicated", 2), ("log", "sent", 1), ("slack", "deduplicated", 2),
                          ("slack", "sent", 1), ("webhook", "deduplicated", 2), ("webhook", "sent", 1)])

    def test_processes_started_together_deliver_once_per_channel(self):
        with HTTPServer() as slack, HTTPServer() as hook:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\nwebhook_url = {hook.url()}\n")
            children = [subprocess.Popen([sys.executable, SCRIPT, "alert", "--critical", "Disk full"],
                                         env=self.cli_env(), cwd=self.tmp, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE) for _ in range(4)]
            outputs = [child.communicate(timeout=SUBPROCESS_TIMEOUT_S) for child in children]
        self.assertEqual([c.returncode for c in children], [0] * 4, outputs)
        self.assertEqual((len(slack.requests), len(hook.requests)), (1, 1))
        self.assertEqual(len(self.syslog.pending()), 1)

    def test_dry_run_prints_each_payload_masked_and_sends_nothing(self):
        with HTTPServer() as slack:
            url = slack.url("/services/T0001/B0002/SECRETSECRETSECRET")
            self.write_config(f"[alerting]\nslack_webhook_url = {url}\n")
            result = self.alert("--warning", "Disk", "90% used", "--dry-run")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        out = result.stdout.decode()
        self.assertNotIn("SECRET", out)
        blocks = out.split("--- ")
        self.assertEqual(blocks[1].splitlines()[0], f"slack: slack POST http://127.0.0.1:{slack.port}/***")
        self.assertEqual(json.loads(blocks[1].split("\n", 1)[1])["text"], "[WARNING] Disk")
        self.assertEqual(blocks[2], f"log: log to syslog at {self.syslog_path}\n[WARNING] Disk | 90% used\n")
        self.assertEqual(slack.requests, [])
        self.assertFalse(os.path.exists(self.db))


class AlertTestCommand(AlertTestCase):
    def test_one_line_per_channel_and_no_dedup(self):
        with HTTPServer() as slack, HTTPServer(default=Reply(404, "Unknown Webhook")) as discord:
            self.write_config(f"[alerting]\nslack_webhook_url = {slack.url('/s')}\n"
                              f"discord_webhook_url = {discord.url('/d')}\n")
            first = self.run_cli("alert-test", env=self.cli_env())
            second = self.run_cli("alert-test", "--channel", "slack", env=self.cli_env())
        lines = first.stdout.decode().splitlines()
        self.assertEqual(first.returncode, 3)
        self.assertRegex(lines[0], r"^slack: sent in \d+ ms$")
        self.assertRegex(lines[2], r"^log: sent in \d+ ms$")
        self.assertRegex(lines[1], r"^discord: failed after 1 attempt in \d+ ms: HTTP 404: Unknown Webhook$")
        self.assertEqual(len(lines), 3)
        self.assertEqual(second.returncode, 0)
        self.assertRegex(second.stdout.decode(), r"^slack: sent in \d+ ms\n$")
        self.assertEqual(len(slack.requests), 2)
        self.assertTrue(slack.requests[0].json()["text"].startswith("[INFO] Test alert from metasystem-monitor on "))
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alert_marks"), [(0,)])


    def test_a_test_reaches_every_enabled_channel_whatever_its_routing_and_says_why_others_were_skipped(self):
        with HTTPServer() as pager, HTTPServer() as hook:
            self.write_config(f"[channel:pager]\ntype = slack\nurl = {pager.url('/p')}\nmin_severity = critical\n"
                              "quiet_hours = 00:00-23:59\n\n"
                              f"[channel:hook]\ntype = webhook\nurl = {hook.url('/h')}\n\n"
                              "[channel:old]\ntype = discord\nurl = https://discord.invalid/x\nenabled = false\n\n"
                              "[channel:unset]\ntype = ntfy\nurl_env = MM_UNSET_FOR_THIS_TEST\n")
            result = self.run_cli("alert-test", env=self.cli_env())
        self.assertEqual((result.returncode, result.stderr.decode()),  # a channel that cannot be used failed
                         (3, f"{PROG}: warning: channel unset skipped ($MM_UNSET_FOR_THIS_TEST is not set)\n"
                             f"{PROG}: error: {self.config_path}: [channel:unset] channel unset cannot be used here: "
                             "$MM_UNSET_FOR_THIS_TEST is not set\n"))
        lines = result.stdout.decode().splitlines()
        self.assertEqual([re.sub(r" in \d+ ms", "", line) for line in lines],
                         ["log: sent", "pager: sent", "hook: sent", "old: skipped (disabled)",
                          "unset: skipped ($MM_UNSET_FOR_THIS_TEST is not set)"])
        self.assertEqual((len(pager.requests), len(hook.requests)), (1, 1))
        self.assertTrue(pager.requests[0].json()["text"].startswith("[INFO] Test alert from metasystem-monitor"))


class AlertsCommand(AlertTestCase):
    def test_history_as_text_and_json(self):
        with HTTPServer(Reply(404, "no such hook")) as hook:  # permanent: one attempt, whatever the timing
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            self.run_cli("alert", "--warning", "Slow sync", "took 31 s", env=self.cli_env())
        text = self.run_cli("alerts", env=self.cli_env())
        as_json = self.run_cli("alerts", "--json", "--hours", "1", env=self.cli_env())
        self.assertEqual(text.returncode, 0)
        self.assertRegex(text.stdout.decode(), r"^\d\d-\d\d \d\d:\d\d UTC  warning   Slow sync  log=sent "
                                               r"webhook=failed \(HTTP 404: no such hook\)\n$")
        document = json.loads(as_json.stdout)
        self.assertEqual(document["hours"], 1.0)
        [entry] = document["alerts"]
        self.assertEqual((entry["title"], entry["message"], entry["severity"], entry["kind"]),
                         ("Slow sync", "took 31 s", "warning", "alert"))
        webhook = entry["channels"]["webhook"]
        self.assertEqual((webhook["outcome"], webhook["http_status"], webhook["error_class"], webhook["attempts"],
                          webhook["error"]), ("failed", 404, "http", 1, "HTTP 404: no such hook"))

    def test_no_store_yet_is_an_empty_history(self):
        self.write_config("")
        result = self.run_cli("alerts", "--json", env=self.cli_env())
        self.assertCleanExit(result, 0, json.dumps({"alerts": [], "hours": 24.0}, indent=2) + "\n")
        self.assertFalse(os.path.exists(self.db))



def undocumented(example: str) -> Tuple[Set[str], Set[str]]:
    """(keys, types) the registries and key lists know of that the example file never shows."""
    with open(example, encoding="utf-8") as handle:
        text = handle.read()
    written = set(re.findall(r"^[#; ]*([a-z_]+) = ", text, re.MULTILINE))
    expected = set(mm.ALERTING_KEYS) | set(mm.SEED_CHANNEL_KEYS) | set(mm.STORAGE_KEYS) | set(mm.SERVE_KEYS)
    expected |= set(mm.COLLECT_KEYS) | set(mm.DASHBOARD_KEYS) | set(mm.CHECK_RUN_KEYS) | set(mm.JOB_KEYS)
    expected |= set(mm.MAINTENANCE_KEYS)
    expected |= set(mm.CHANNEL_COMMON_KEYS) - {"timeout", "channel_budget"}
    for channel in mm.CHANNEL_TYPES.values():
        expected |= set(channel.keys) | set(channel.secrets)
        expected |= {f"{key}{suffix}" for key in channel.secrets for suffix in ("_env", "_file")} & written
    expected |= set(mm.CHECK_COMMON_KEYS) | {key for check in mm.CHECK_TYPES.values() for key in check.keys}
    expected |= {key for check in mm.CHECK_TYPES.values() for key in check.secrets}
    kinds = set(mm.CHANNEL_TYPES) | set(mm.CHECK_TYPES)
    return expected - written, {kind for kind in kinds if f"type = {kind}\n" not in text}

class ConfigCommand(AlertTestCase):
    def test_config_prints_the_effective_configuration_masked(self):
        self.write_config("[alerting]\nslack_webhook_url = https://hooks.slack.com/services/T0/B0/XYZSECRET\n"
                          "dedup_window = 2h\nfire_after = 3 within 5\n\n[channel:phone]\ntype = ntfy\n"
                          "url_env = MM_NTFY_URL\nmin_severity = critical\nquiet_hours = 22:00-07:30\n"
                          "quiet_hours_bypass = critical\nfallback = slack\nsend_resolved = no\n", log_channel=False)
        result = self.run_cli("config", env=self.cli_env(MM_NTFY_URL="https://ntfy.sh/topic-0123456789"))
        self.assertCleanExit(result, 0, "\n".join([
            f"# {self.config_path}", "[alerting]", "dedup_window = 2h", "timeout = 10s", "channel_budget = 20s",
            "run_budget = 30s", "repeat_interval_critical = 1h", "repeat_interval_warning = 4h", "repeat_interval_info = never",
            "fire_after = 3 within 5", "resolve_after = 2", "max_messages_per_run = 5", "",
            "[channel:log]", "type = log", "# always on: the record of last resort", "",
            "[channel:phone]", "type = ntfy", "url = https://ntfy.sh/***  # from $MM_NTFY_URL",
            "min_severity = critical", "quiet_hours = 22:00-07:30", "quiet_hours_bypass = critical", "fallback = slack",
            "send_resolved = false", "",
            "[channel:slack]  # from [alerting]", "type = slack", "url = https://hooks.slack.com/***  # from file",
        ]) + "\n")

    def test_check_lists_every_problem_with_section_and_key(self):
        self.write_config("[alerting]\nwebhook_url = not-a-url\nrepeat = 5\ntimeout = soon\n\n"
                          "[channel:a]\ntype = carrier-pigeon\n\n[channel:b]\ntype = slack\n\n"
                          "[channel:c]\ntype = email\nto = -oQ/tmp\n\n[alert]\nx = 1\n", log_channel=False)
        result = self.run_cli("config", "--check", env=self.cli_env())
        self.assertEqual((result.returncode, result.stderr), (1, b""))
        path = self.config_path
        self.assertEqual(result.stdout.decode().splitlines(), [
            f"{path}: [alert] unknown section",
            f"{path}: [alerting] timeout: 'soon' is not a duration such as 90s, 5m, 2h or 7d",
            f"{path}: [alerting] repeat: unknown key",
            f"{path}: [alerting] webhook_url: not an http or https URL",
            f"{path}: [channel:a] type: unknown channel type 'carrier-pigeon'; one of "
            "alertmanager, discord, email, gotify, log, matrix, mattermost, ntfy, opsgenie, pagerduty, pushover, "
            "rocketchat, slack, teams, telegram, webhook",
            f"{path}: [channel:b] url: required for a slack channel",
            f"{path}: [channel:c] to: '-oQ/tmp' is not a mail address",
        ])

    def test_check_lists_every_line_it_cannot_read_and_reads_the_rest(self):
        self.write_config("[alerting\nx = 1\n[alerting]\ntimeout = 5s\nno value here\ntimeout = 7s\n"
                          "[channel:a]\ntype = log\n[channel:a]\nTYPE = log\n", log_channel=False)
        result = self.run_cli("config", "--check", env=self.cli_env())
        self.assertCleanExit(result, 1, "".join(f"{self.config_path}: line {line}\n" for line in (
            "1: '[alerting' stands before any [section]", "2: 'x = 1' stands before any [section]",
            "5: 'no value here' is not KEY = VALUE", "6: key 'timeout' is given a second time in its section",
            "9: section [channel:a] is given a second time")))
        shown = self.run_cli("config", env=self.cli_env())
        self.assertEqual(shown.returncode, 1)
        self.assertIn("timeout = 7s\n", shown.stdout.decode())

    def test_check_fails_for_an_enabled_channel_that_cannot_be_used_here(self):
        missing = os.path.join(self.tmp, "no-such-url-file")
        self.write_config("[channel:ops]\ntype = slack\nurl_env = MM_UNSET_FOR_TEST\n\n"
                          f"[channel:hook]\ntype = webhook\nurl_file = {missing}\n\n"
                          f"[channel:off]\ntype = webhook\nurl_file = {missing}\nenabled = false\n")
        result = self.run_cli("config", "--check", env=self.cli_env())
        self.assertCleanExit(result, 1, f"{self.config_path}: [channel:hook] channel hook cannot be used here: "
                                        f"{missing} cannot be read (No such file or directory)\n"
                                        f"{self.config_path}: [channel:ops] channel ops cannot be used here: "
                                        "$MM_UNSET_FOR_TEST is not set\n")
        self.write_config("[channel:ops]\ntype = slack\nurl_env = MM_SET_FOR_TEST\n")
        result = self.run_cli("config", "--check", env=self.cli_env(MM_SET_FOR_TEST="https://hooks.slack.invalid/x"))
        self.assertCleanExit(result, 0, "configuration OK: 2 channels (log, ops)\n")

    def test_a_config_others_can_read_that_holds_a_secret_draws_a_warning(self):
        text = "[alerting]\nslack_webhook_url = https://hooks.slack.com/services/T0/B0/XYZSECRET\n"
        self.write_config(text, mode=0o644)
        shared = self.run_cli("config", "--check", env=self.cli_env())
        self.write_config(text, mode=0o600)
        private = self.run_cli("config", "--check", env=self.cli_env())
        self.write_config("[channel:s]\ntype = slack\nurl_env = MM_X\n", mode=0o644)
        no_secret_inside = self.run_cli("config", "--check", env=self.cli_env(MM_X="https://hooks.slack.invalid/x"))
        self.assertEqual(shared.stderr.decode(),
                         f"{PROG}: warning: {self.config_path} holds secrets ([alerting] slack_webhook_url) "
                         f"and other users can read it: chmod 600 {self.config_path}\n")
        self.assertEqual((private.returncode, private.stderr), (0, b""))
        self.assertEqual((no_secret_inside.returncode, no_secret_inside.stderr), (0, b""))

    def test_the_example_file_is_valid_and_documents_every_key(self):
        example = os.path.join(REPO, "alerting-config.example.ini")
        result = self.run_cli("--config", example, "config", "--check", env=self.child_env())
        self.assertCleanExit(result, 0, "configuration OK: 1 channel (log)\n")
        self.assertEqual(undocumented(example), (set(), set()))


class SecretsNeverShow(AlertTestCase):
    """A configuration full of secrets, driven through failures: no secret in any output or in the store."""

    SECRETS = ("T0SLACKSECRET", "B0SLACKSECRET", "slack-token-0123456789", "9876543210987", "discord-token-ABCDEF",
               "sig-value-31415926", "hmac-shared-key-27182818", "smtp-password-1618", "424242:telegram-bot-token",
               "ntfy-topic-0987654321", "ntfy-token-112358", "am-password-7777", "pd-routing-key-5555",
               "push-password-4444")

    def test_secrets_are_masked_everywhere(self):
        with HTTPServer(default=Reply(403, "invalid_token for", echo_path=True)) as server, SMTPServer(auth=True, accept_login=False,
                                                                                   starttls=True) as smtp:
            base = server.url("")
            self.write_config(
                f"[alerting]\nchannel_budget = 1s\nslack_webhook_url = {base}/services/T0SLACKSECRET/B0SLACKSECRET/slack-token-0123456789\n"
                f"discord_webhook_url = {base}/api/webhooks/9876543210987/discord-token-ABCDEF\n\n"
                f"[channel:hook]\ntype = webhook\nurl = {base}/hook?sig=sig-value-31415926\n"
                f"secret = hmac-shared-key-27182818\n\n"
                f"[channel:mail]\ntype = email\nto = ops@example.com\nsmtp_host = 127.0.0.1\n"
                f"smtp_port = {smtp.port}\nusername = mm\npassword = smtp-password-1618\ntls_verify = false\n\n"
                f"[channel:tg]\ntype = telegram\ntoken = 424242:telegram-bot-token\nchat_id = 1\napi_url = {base}\n\n"
                f"[channel:phone]\ntype = ntfy\nurl = {base}/ntfy-topic-0987654321\ntoken = ntfy-token-112358\n\n"
                f"[channel:gone]\ntype = webhook\nurl = http://127.0.0.1:1/hook?token=sig-value-31415926\n\n"
                f"[channel:am]\ntype = alertmanager\nurl = {base.replace('//', '//am:am-password-7777@')}\n\n"
                f"[channel:pd]\ntype = pagerduty\nurl = {base}/v2/enqueue\nrouting_key = pd-routing-key-5555\n")
            env = self.cli_env()
            results = [
                self.run_cli("-v", "alert", "--critical", "Disk", "full", env=env),
                self.run_cli("-v", "alert", "--critical", "Disk", "--dry-run", env=env),
                self.run_cli("-v", "alert-test", env=env),
                self.run_cli("alerts", "--json", env=env),
                self.run_cli("alerts", env=env),
                self.run_cli("config", env=env),
                self.run_cli("config", "--check", env=env),
                self.run_cli("push", "--gateway", base.replace("//", "//job:push-password-4444@"), env=env),
            ]
            server.default = Reply(200, "ok")  # and every channel once more, succeeding where 200 "ok" is success
            results.append(self.run_cli("-v", "alert-test", env=env))
            self.assertGreater(len(server.requests), 5)
            results += [self.run_cli("export", env=env), self.run_cli("export", "--format", "openmetrics", env=env),
                        self.run_cli("--summary", env=env, module="monitoring_dashboard"),
                        self.run_cli("--once", env=env, module="monitoring_dashboard")]
            page = mm.status_page(mm.read_summary(self.db)).encode()
        self.assertEqual(results[0].returncode, 4, results[0].stderr)
        self.assertIn(f"hook: webhook POST {base}/***?***".encode(), results[1].stdout)
        self.assertIn(b"sent", results[8].stdout)  # the second alert-test: delivered somewhere
        self.assertIn(b"failed: HTTP 403: invalid_token for /metrics/job/metasystem/instance/", results[7].stderr)
        seen = b"".join(r.stdout + r.stderr for r in results) + file_bytes(self.db) + page
        seen += b"".join(self.syslog.pending())
        for name in (self.db + "-wal",):
            if os.path.exists(name):
                seen += file_bytes(name)
        for secret in self.SECRETS:
            self.assertFalse(secret.encode() in seen, f"{secret} was shown or stored")
        self.assertIn(b"channel gone failed after", results[0].stderr)
        self.assertIn(b"535", results[0].stderr)
        self.assertIn(b"channel slack failed after 1 attempt: HTTP 403: invalid_token for /services/***/***/***\n",
                      results[0].stderr)


if __name__ == "__main__":
    unittest.main()
