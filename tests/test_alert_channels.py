"""Each channel against a real local server: payload shapes, size limits, headers, email safety, syslog."""

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import stat
import sys
import time
import unittest

import metasystem_monitor as mm

from .servers import HTTPServer, Reply, SMTPServer
from .support import REAL_SLEEP, AlertTestCase, forbid_real_sleep

setUpModule, tearDownModule = forbid_real_sleep()

LONG = "x" * 10_000


class HttpChannels(AlertTestCase):
    def send(self, section, server, title="Disk full", message="only 1 GB left", details=None,
             severity=mm.AlertSeverity.CRITICAL):
        alerts = self.system(section.format(url=server.url("")))
        alert = alerts.create_alert(title, message, severity, channels=["it"], details=details)
        return alerts.send_alert(alert).outcomes["it"]

    def test_slack_text_always_an_attachment_colored_and_success_only_on_ok(self):
        with HTTPServer(Reply(200, "not ok"), Reply(200, "ok")) as slack:
            first = self.send("[channel:it]\ntype = slack\nurl = {url}/services/T1/B1/x\n", slack)
            self.clock.advance(3600)
            second = self.send("[channel:it]\ntype = slack\nurl = {url}/services/T1/B1/x\n", slack,
                               title="Disk <full> & more")
        self.assertEqual((first.outcome, first.error), ("failed", "HTTP 200: not ok"))
        self.assertEqual(second.outcome, "sent")
        payload = slack.requests[1].json()
        self.assertEqual(payload["text"], "[CRITICAL] Disk &lt;full&gt; &amp; more")
        [attachment] = payload["attachments"]
        self.assertEqual(attachment["color"], "#d00000")
        self.assertEqual(attachment["fallback"], "[CRITICAL] Disk <full> & more")
        self.assertEqual(attachment["blocks"][0]["text"]["type"], "mrkdwn")
        self.assertTrue(attachment["blocks"][0]["text"]["text"].startswith("only 1 GB left\n\nhost: "))
        self.assertEqual(slack.requests[1].headers["Content-Type"], "application/json")

    def test_a_host_detail_is_shown_once_and_discord_carries_the_reminder_and_resolved_notes(self):
        with HTTPServer(default=Reply(200, "ok")) as slack, HTTPServer(default=Reply(204, "")) as discord:
            alerts = self.system(f"[alerting]\nrepeat_interval_critical = 1h\n\n"
                                 f"[channel:chat]\ntype = slack\nurl = {slack.url('/s')}\n\n"
                                 f"[channel:it]\ntype = discord\nurl = {discord.url('/d')}\n")
            since = self.clock.time()
            alerts.fire("backup", "Backup failed", "rsync exited 23", "critical", details={"host": "nas"})
            self.clock.advance(3600)
            alerts.fire("backup", "Backup failed", "rsync exited 23", "critical", details={"host": "nas"})
            self.clock.advance(600)
            alerts.resolve("backup", after=1)
        here = socket.gethostname()
        body = slack.requests[0].json()["attachments"][0]["blocks"][0]["text"]["text"]
        self.assertEqual(body, f"rsync exited 23\n\nhost: nas\n\nsent from: {here}\ntime: {mm.iso_time(since)}")
        self.assertEqual([request.json()["embeds"][0]["description"] for request in discord.requests], [
            "rsync exited 23",
            f"still firing since {mm.iso_time(since)}, reminder #1\nrsync exited 23",
            f"resolved after 1h 10m (firing since {mm.iso_time(since)})\nrsync exited 23",
        ])
        self.assertEqual(discord.requests[0].json()["embeds"][0]["fields"],
                         [{"name": "host", "value": "nas", "inline": True}])

    def test_slack_cuts_long_text_to_3000_with_a_marker(self):
        with HTTPServer() as slack:
            self.send("[channel:it]\ntype = slack\nurl = {url}/s\n", slack, title=LONG, message="<" * 10_000)
        payload = slack.requests[0].json()
        section = payload["attachments"][0]["blocks"][0]["text"]["text"]
        self.assertEqual(len(payload["text"]), 3000)
        self.assertTrue(payload["text"].endswith(mm.TRUNCATION_MARKER))
        self.assertLessEqual(len(section), 3000)
        self.assertTrue(section.endswith("&lt;" + mm.TRUNCATION_MARKER), section[-30:])

    def test_discord_waits_for_confirmation_pings_nobody_and_keeps_every_limit(self):
        details = {f"field{n:02d}": LONG for n in range(30)}
        with HTTPServer() as discord:
            delivery = self.send("[channel:it]\ntype = discord\nurl = {url}/api/webhooks/1/tok?thread_id=9\n",
                                 discord, title="@everyone " + LONG, message=LONG, details=details)
        self.assertEqual(delivery.outcome, "sent")
        request = discord.requests[0]
        self.assertEqual(request.path, "/api/webhooks/1/tok?thread_id=9&wait=true")
        self.assertEqual(request.headers["User-Agent"], mm.USER_AGENT)
        payload = request.json()
        self.assertEqual(payload["allowed_mentions"], {"parse": []})
        [embed] = payload["embeds"]
        self.assertIsInstance(embed["color"], int)
        self.assertEqual(embed["color"], 0xD00000)
        self.assertEqual(len(payload["content"]), 2000)
        self.assertEqual(len(embed["title"]), 256)
        self.assertEqual([f["name"] for f in embed["fields"]], ["field00", "field01"])  # what fits in 6000
        self.assertEqual(len(embed["description"]), 4096)
        self.assertTrue(all(len(f["value"]) <= 1024 and len(f["name"]) <= 256 for f in embed["fields"]))
        total = len(embed["title"]) + len(embed["description"]) + len(embed["footer"]["text"]) + sum(
            len(f["name"]) + len(f["value"]) for f in embed["fields"])
        self.assertLessEqual(total, 6000)
        self.assertLessEqual(len(embed["description"]), 4096)
        for text in (payload["content"], embed["title"], embed["description"], embed["fields"][0]["value"]):
            self.assertTrue(text.endswith(mm.TRUNCATION_MARKER))

    def test_discord_204_is_success_and_a_429_body_retry_after_is_honoured(self):
        limited = Reply(429, json.dumps({"message": "rate limited", "retry_after": 2.5, "global": False}))
        with HTTPServer(limited, Reply(204)) as discord:
            delivery = self.send("[channel:it]\ntype = discord\nurl = {url}/api/webhooks/1/tok\n", discord)
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.http_status), ("sent", 2, 204))
        self.assertGreaterEqual(self.clock.slept[0], 2.5)

    def test_webhook_body_reads_as_alertmanager_and_is_signed(self):
        secret = "whsec_" + base64.b64encode(b"shared secret bytes").decode()
        with HTTPServer() as hook:
            self.send(f"[channel:it]\ntype = webhook\nurl = {{url}}/hook\nsecret = {secret}\n", hook,
                      details={"free_gb": 2.5})
        request = hook.requests[0]
        payload = request.json()
        self.assertEqual(payload["version"], "4")
        self.assertEqual(payload["status"], "firing")
        [alert] = payload["alerts"]
        self.assertEqual(alert["labels"], {"alertname": "Disk full", "severity": "critical",
                                           "instance": socket.gethostname(), "source": "metasystem"})
        self.assertEqual(alert["annotations"], {"summary": "Disk full", "description": "only 1 GB left"})
        self.assertEqual(alert["startsAt"], mm.iso_time(self.clock.now))
        self.assertEqual((payload["severity"], payload["dedup_key"], payload["details"]),
                         ("critical", "critical:Disk full", {"free_gb": 2.5}))
        signed = (f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode()
                  + request.body)
        expected = base64.b64encode(hmac.new(b"shared secret bytes", signed, hashlib.sha256).digest()).decode()
        self.assertEqual(request.headers["webhook-signature"], f"v1,{expected}")
        self.assertEqual(request.headers["webhook-timestamp"], str(int(self.clock.now)))

    def test_a_whsec_secret_that_is_not_strict_base64_is_a_problem_naming_the_key_never_the_value(self):
        with open(os.path.join(self.tmp, "secret"), "w", encoding="utf-8") as handle:
            handle.write("whsec_c2VjcmV0-_x\n")  # URL-safe characters: not the standard alphabet
        os.chmod(os.path.join(self.tmp, "secret"), 0o600)
        cases = {"secret = whsec_abc": "is base64 after the prefix, and this one is not",  # 'Incorrect padding'
                 "secret = whsec_c2VjcmV0 ZXQ=": "is base64 after the prefix, and this one is not",
                 "secret = whsec_s\u00e9cret==": "is base64 after the prefix, and this one is not",
                 "secret = whsec_": "holds no key after the prefix",
                 f"secret_file = {self.tmp}/secret": "is base64 after the prefix, and this one is not",
                 "secret_env = MM_TEST_WHSEC": "is base64 after the prefix, and this one is not"}  # whsec_==
        with HTTPServer() as hook:
            for line, why in cases.items():
                with self.subTest(line=line):
                    self.write_config(f"[channel:it]\ntype = webhook\nurl = {hook.url('/h')}\n{line}\n")
                    problem = f"{self.config_path}: [channel:it] secret: a whsec_ secret {why}"
                    checked = self.run_cli("config", "--check", env=self.cli_env(MM_TEST_WHSEC="whsec_=="))
                    self.assertEqual((checked.returncode, checked.stdout.decode(), checked.stderr),
                                     (1, problem + "\n", b""))
                    sent = self.run_cli("alert", "--warning", "Disk", env=self.cli_env(MM_TEST_WHSEC="whsec_=="))
                    # the channel with the problem is left out, the rest works, the problem is said last
                    self.assertEqual((sent.returncode, sent.stdout, sent.stderr.decode().splitlines()[-1]),
                                     (1, b"", f"metasystem_monitor.py: error: {problem}"))
            self.write_config(f"[channel:it]\ntype = webhook\nurl = {hook.url('/h')}\nsecret = whsec_YWJj\n")
            self.assertEqual(self.run_cli("config", "--check", env=self.cli_env()).returncode, 0)
        self.assertEqual(hook.requests, [])

    def test_a_secret_with_a_control_character_is_a_problem_before_a_header_refuses_it_quoting_the_secret(self):
        files = {"line": "tk_sec\nret_value", "nel": "tk_sec\x85ret_value", "soh": "http://127.0.0.1:1/hook\x01x"}
        for name, text in files.items():
            with open(os.path.join(self.tmp, name), "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(os.path.join(self.tmp, name), 0o600)
        with HTTPServer() as server:
            cases = {f"type = ntfy\nurl = {server.url('/t')}\ntoken_file = {self.tmp}/line": "token",
                     f"type = gotify\nurl = {server.url('/g')}\ntoken_file = {self.tmp}/nel": "token",
                     f"type = opsgenie\napi_url = {server.url('')}\napi_key = tk_sec\n  ret_value": "api_key",
                     f"type = slack\nurl_file = {self.tmp}/soh": "url"}
            for section, key in cases.items():
                with self.subTest(section=section):
                    self.write_config(f"[channel:it]\n{section}\n")
                    problem = (f"{self.config_path}: [channel:it] {key}: holds a control character or line break: "
                               "no URL, token or key has one")
                    checked = self.run_cli("config", "--check", env=self.cli_env())
                    self.assertEqual((checked.returncode, checked.stdout.decode(), checked.stderr),
                                     (1, problem + "\n", b""))
                    sent = self.run_cli("alert", "--warning", "Disk", env=self.cli_env())
                    # the channel with the problem is left out, the rest works, the problem is said last
                    self.assertEqual((sent.returncode, sent.stdout, sent.stderr.decode().splitlines()[-1]),
                                     (1, b"", f"metasystem_monitor.py: error: {problem}"))
        self.assertEqual(server.requests, [])

    def test_webhook_retries_carry_the_same_id_so_a_receiver_can_dedup(self):
        with HTTPServer(Reply(503), Reply(200)) as hook:
            self.send("[channel:it]\ntype = webhook\nurl = {url}/hook\nsecret = plain-secret\n", hook)
        ids = [r.headers["webhook-id"] for r in hook.requests]
        self.assertEqual(len(ids), 2)
        self.assertEqual(ids[0], ids[1])

    def test_ntfy_headers_utf8_title_and_body_limit(self):
        with HTTPServer() as ntfy:
            self.send("[channel:it]\ntype = ntfy\nurl = {url}/mytopic-0123\ntoken = tk_secret_token\n", ntfy,
                      title="Température élevée", message="é" * 5000, severity=mm.AlertSeverity.WARNING)
        request = ntfy.requests[0]
        self.assertEqual(request.path, "/mytopic-0123")
        expected_title = "=?UTF-8?B?" + base64.b64encode("[WARNING] Température élevée".encode()).decode() + "?="
        self.assertEqual(request.headers["Title"], expected_title)
        self.assertEqual((request.headers["Priority"], request.headers["Tags"]), ("4", "warning"))
        self.assertEqual(request.headers["Authorization"], "Bearer tk_secret_token")
        self.assertLessEqual(len(request.body), 4096)
        self.assertTrue(request.body.decode("utf-8").endswith(mm.TRUNCATION_MARKER))

    def test_telegram_token_in_path_text_limit_and_ok_false(self):
        failure = Reply(400, json.dumps({"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}))
        with HTTPServer(Reply(200, '{"ok":true,"result":{}}'), failure) as telegram:
            section = "[channel:it]\ntype = telegram\ntoken = 123456:ABC-secret\nchat_id = -100200\napi_url = {url}\n"
            sent = self.send(section, telegram, message=LONG)
            self.clock.advance(3600)
            failed = self.send(section, telegram)
        self.assertEqual(telegram.requests[0].path, "/bot123456:ABC-secret/sendMessage")
        payload = telegram.requests[0].json()
        self.assertEqual(payload["chat_id"], "-100200")
        self.assertEqual(len(payload["text"]), 4096)
        self.assertTrue(payload["text"].startswith("[CRITICAL] Disk full\n\nxxx"))
        self.assertEqual(sent.outcome, "sent")
        self.assertEqual((failed.outcome, failed.attempts), ("failed", 1))
        self.assertNotIn("123456:ABC-secret", failed.error)

    def test_telegram_429_parameters_retry_after(self):
        limited = Reply(429, json.dumps({"ok": False, "error_code": 429, "parameters": {"retry_after": 3}}))
        with HTTPServer(limited, Reply(200, '{"ok":true}')) as telegram:
            delivery = self.send("[channel:it]\ntype = telegram\ntoken = 1:x\nchat_id = 5\napi_url = {url}\n",
                                 telegram)
        self.assertEqual((delivery.outcome, delivery.attempts), ("sent", 2))
        self.assertGreaterEqual(self.clock.slept[0], 3.0)

    def test_every_request_names_the_program_and_version(self):
        sections = {"slack": "url = {url}/s", "discord": "url = {url}/d", "webhook": "url = {url}/w",
                    "ntfy": "url = {url}/n", "telegram": "token = 1:x\nchat_id = 5\napi_url = {url}"}
        with HTTPServer(default=Reply(200, '{"ok":true}')) as server:
            for kind, keys in sections.items():
                self.clock.advance(3600)
                self.send(f"[channel:it]\ntype = {kind}\n{keys}\n", server)
        self.assertEqual(len(server.requests), 5)
        self.assertEqual({r.headers["User-Agent"] for r in server.requests}, {f"metasystem-monitor/{mm.__version__} (Python urllib)"})


class EmailBySmtp(AlertTestCase):
    def section(self, server, extra=""):
        return (f"[channel:it]\ntype = email\nto = ops@example.com, me@example.com\nfrom = mm@example.com\n"
                f"smtp_host = 127.0.0.1\nsmtp_port = {server.port}\n{extra}")

    def test_a_header_injection_in_the_title_yields_one_subject_and_no_bcc(self):
        with SMTPServer() as smtp:
            alerts = self.system(self.section(smtp, "security = none\n"))
            delivery = alerts.send_critical_alert("Disk\r\nBcc: x@example.com", "body", channels=["it"])
        self.assertEqual(delivery.outcomes["it"].outcome, "sent")
        [mail] = smtp.mails
        self.assertEqual(mail.recipients, ["ops@example.com", "me@example.com"])
        headers = [line.split(b":")[0] for line in mail.data.split(b"\r\n\r\n")[0].split(b"\r\n")]
        self.assertEqual(headers.count(b"Subject"), 1)
        self.assertNotIn(b"Bcc", headers)
        self.assertEqual(mail.message()["Subject"], "[CRITICAL] Disk  Bcc: x@example.com")
        self.assertEqual(mail.message()["From"], "mm@example.com")

    def test_the_date_header_is_the_machines_local_time_with_its_offset(self):
        with SMTPServer() as smtp:
            self.write_config(self.section(smtp, "security = none\n"))
            result = self.run_cli("alert", "--warning", "Disk", env=self.cli_env(TZ="Asia/Tokyo",
                                                                                METASYSTEM_NOW="1800000000"))
        self.assertEqual(result.returncode, 0, result.stderr)
        [mail] = smtp.mails
        self.assertEqual(mail.message()["Date"], "Fri, 15 Jan 2027 17:00:00 +0900")  # 08:00 UTC, as Tokyo reads it

    def test_starttls_refuses_a_self_signed_server_by_default(self):
        with SMTPServer(starttls=True) as smtp:
            alerts = self.system(self.section(smtp))
            delivery = alerts.send_critical_alert("Disk", channels=["it"]).outcomes["it"]
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.error_class), ("failed", 1, "tls"))
        self.assertIn("CERTIFICATE_VERIFY_FAILED", delivery.error)
        self.assertEqual(smtp.mails, [])

    def test_starttls_with_tls_verify_false_sends_logs_in_and_warns(self):
        with SMTPServer(starttls=True, auth=True) as smtp:
            alerts = self.system(self.section(smtp, "tls_verify = false\nusername = mm\npassword = s3cret-pw\n"))
            delivery = alerts.send_critical_alert("Disk", channels=["it"]).outcomes["it"]
        self.assertEqual(delivery.outcome, "sent")
        [mail] = smtp.mails
        self.assertEqual((mail.tls, mail.login), (True, ("mm", "s3cret-pw")))
        self.assertIn("WARNING channel it: TLS certificates are not verified (tls_verify = false)", self.logged)

    def test_implicit_tls(self):
        with SMTPServer(implicit_tls=True) as smtp:
            alerts = self.system(self.section(smtp, "security = ssl\ntls_verify = false\n"))
            delivery = alerts.send_critical_alert("Disk", channels=["it"]).outcomes["it"]
        self.assertEqual(delivery.outcome, "sent")
        self.assertTrue(smtp.mails[0].tls)

    def test_a_refused_login_is_permanent(self):
        with SMTPServer(starttls=True, auth=True, accept_login=False) as smtp:
            alerts = self.system(self.section(smtp, "tls_verify = false\nusername = mm\npassword = wrong-pw\n"))
            delivery = alerts.send_critical_alert("Disk", channels=["it"]).outcomes["it"]
        self.assertEqual((delivery.outcome, delivery.attempts, delivery.error_class), ("failed", 1, "smtp"))
        self.assertIn("535", delivery.error)

    def test_no_login_over_plaintext_unless_allowed(self):
        with SMTPServer(auth=True) as smtp:
            with self.assertRaises(mm.ConfigError) as caught:
                self.system(self.section(smtp, "security = none\nusername = mm\npassword = pw\n"))
            self.assertIn("[channel:it] username: login over a connection without TLS sends the password in clear",
                          str(caught.exception))
            alerts = self.system(self.section(smtp, "security = none\nusername = mm\npassword = pw\n"
                                                    "allow_insecure_auth = true\n"))
            delivery = alerts.send_critical_alert("Disk", channels=["it"]).outcomes["it"]
        self.assertEqual(delivery.outcome, "sent")
        self.assertEqual(smtp.mails[0].login, ("mm", "pw"))


class EmailByCommand(AlertTestCase):
    """The ``mail`` and ``sendmail`` paths, with a real program that records its argv and stdin."""

    def setUp(self):
        super().setUp()
        # subprocess.run(timeout=...) waits for the child by polling with time.sleep on Python 3.9.
        forbidden, time.sleep = time.sleep, REAL_SLEEP
        self.addCleanup(setattr, time, "sleep", forbidden)

    def fake_program(self, name="fake-mail"):
        """A program that writes its arguments and stdin to a JSON file, in a folder put first on PATH."""
        folder = os.path.join(self.tmp, "bin")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        self.record = os.path.join(self.tmp, "fake-mail.json")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"#!{sys.executable}\nimport json, sys\n"
                         f"with open({self.record!r}, 'w') as record:\n"
                         f"    json.dump({{'argv': sys.argv[1:], 'stdin': sys.stdin.buffer.read().decode()}}, record)\n")
        os.chmod(path, stat.S_IRWXU)
        saved = os.environ["PATH"]
        self.addCleanup(os.environ.__setitem__, "PATH", saved)
        os.environ["PATH"] = folder + os.pathsep + saved
        return path

    def recorded(self):
        with open(self.record, encoding="utf-8") as handle:
            return json.load(handle)

    def test_mail_gets_an_argv_list_with_dashes_and_a_neutralised_body(self):
        self.fake_program("mail")  # found on PATH, as the original design's `mail` is
        alerts = self.system("[alerting]\nemail_to = root, ops@example.com\n")
        message = "line one\n~! rm -rf /\n~r /etc/shadow"
        delivery = alerts.send_critical_alert("Disk\nfull", message, channels=[mm.AlertChannel.EMAIL])
        self.assertEqual(delivery, {"email": True}, delivery.outcomes)
        record = self.recorded()
        self.assertEqual(record["argv"], ["-s", "[CRITICAL] Disk full", "--", "root", "ops@example.com"])
        self.assertEqual(record["stdin"].split("\n")[:3], ["line one", " ~! rm -rf /", " ~r /etc/shadow"])

    def test_recipients_that_look_like_options_or_pipes_are_refused_at_load(self):
        for recipient in ("-oQ/tmp/x", "|/bin/sh", "a b@example.com"):
            with self.subTest(recipient=recipient):
                with self.assertRaises(mm.ConfigError) as caught:
                    self.system(f"[alerting]\nemail_to = ok@example.com, {recipient}\n")
                self.assertIn(f"[alerting] email_to: '{recipient}' is not a mail address", str(caught.exception))

    def test_sendmail_gets_the_whole_message_on_stdin(self):
        program = self.fake_program()
        alerts = self.system(f"[channel:it]\ntype = email\nmethod = sendmail\nto = ops@example.com\n"
                             f"command = {program}\n")
        self.assertEqual(alerts.send_warning_alert("Slow", "took 31 s", channels=["it"]), {"it": True})
        record = self.recorded()
        self.assertEqual(record["argv"], ["-t", "-oi"])
        self.assertIn("Subject: [WARNING] Slow\n", record["stdin"])
        self.assertIn("To: ops@example.com\n", record["stdin"])

    def test_a_failing_command_is_one_line_with_its_exit_code(self):
        path = os.path.join(self.tmp, "broken-mail")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"#!{sys.executable}\nimport sys\nsys.stderr.write('relay refused\\nsecond line\\n')\n"
                         "sys.exit(75)\n")
        os.chmod(path, stat.S_IRWXU)
        alerts = self.system(f"[channel:it]\ntype = email\nmethod = mail\nto = root\ncommand = {path}\n")
        delivery = alerts.send_critical_alert("Disk", channels=["it"]).outcomes["it"]
        self.assertEqual((delivery.outcome, delivery.error_class, delivery.attempts), ("failed", "command", 1))
        self.assertEqual(delivery.error, "broken-mail exited with 75: relay refused second line")


class LogChannel(AlertTestCase):
    def test_syslog_priorities_per_severity(self):
        alerts = self.system("[channel:extra]\ntype = log\nenabled = false\n")
        alerts.send_critical_alert("Disk", "full", details={"free_gb": 1})
        alerts.send_warning_alert("Slow", "31 s")
        alerts.send_info_alert("Done", "")
        pid = os.getpid()
        self.assertEqual(self.syslog.pending(), [
            f"<10>metasystem[{pid}]: [CRITICAL] Disk | full | free_gb: 1".encode(),
            f"<12>metasystem[{pid}]: [WARNING] Slow | 31 s".encode(),
            f"<14>metasystem[{pid}]: [INFO] Done".encode(),
        ])

    def test_without_a_socket_the_logger_gets_it(self):
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write("[channel:log]\ntype = log\naddress = none\n")
        alerts = mm.AlertingSystem(self.config_path, db_path=self.db, now=self.clock.time)
        self.addCleanup(alerts.close)
        with self.assertLogs("metasystem.alert", "INFO") as logs:
            alerts.send_warning_alert("Slow\r\nsync", "line1\nline2")
        self.assertEqual(logs.output, ["WARNING:metasystem.alert:[WARNING] Slow  sync | line1 line2"])


# Every character str.splitlines() breaks a line on, and the C1 controls: each one a header, a subject or a
# log line must not carry (the email package refuses U+2028 and NEL in a header: "may not contain linefeed").
LINE_BREAKERS = sorted({chr(code) for code in range(0x3000) if len(f"a{chr(code)}b".splitlines()) > 1}
                       | {chr(code) for code in range(0x80, 0xA0)})


class LineBreaksInHeadersAndLogLines(AlertTestCase):
    """A title holding any line break (U+2028, NEL, VT, FS ... not only CR and LF) is one line wherever a
    line is all there is: the email Subject, mail's -s argument, ntfy's Title, the syslog line."""

    def test_one_line_leaves_nothing_splitlines_would_break_on(self):
        self.assertEqual(LINE_BREAKERS, ["\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e"]
                         + [chr(code) for code in range(0x80, 0xA0)] + ["\u2028", "\u2029"])
        text = "a" + "b".join(LINE_BREAKERS) + "z"
        flat = mm._one_line(text)
        self.assertEqual(flat, "a" + "b".join(" " * len(LINE_BREAKERS)) + "z")
        self.assertEqual(flat.splitlines(), [flat])

    def test_smtp_sends_each_title_with_one_subject_line(self):
        with SMTPServer() as smtp:
            alerts = self.system("[channel:it]\ntype = email\nto = ops@example.com\nfrom = mm@example.com\n"
                                 f"smtp_host = 127.0.0.1\nsmtp_port = {smtp.port}\nsecurity = none\n")
            for number, breaker in enumerate(LINE_BREAKERS):
                delivery = alerts.send_critical_alert(f"Disk {number}{breaker}Bcc: x@example.com", "full",
                                                      channels=["it"])
                self.assertEqual(delivery.outcomes["it"].outcome, "sent", (breaker, delivery.outcomes["it"]))
        self.assertEqual(len(smtp.mails), len(LINE_BREAKERS))
        for number, mail in enumerate(smtp.mails):
            head = mail.data.split(b"\r\n\r\n")[0].decode("ascii")
            self.assertEqual([line.split(":")[0] for line in head.split("\r\n") if line[:1] not in " \t"],
                             ["Subject", "From", "To", "Date", "Message-ID", "X-Metasystem-Severity", "Content-Type",
                              "Content-Transfer-Encoding", "MIME-Version"])
            self.assertEqual(mail.message()["Subject"], f"[CRITICAL] Disk {number} Bcc: x@example.com")

    def test_dry_run_shows_the_subject_on_one_line(self):
        self.write_config("[channel:it]\ntype = email\nto = ops@example.com\nsmtp_host = 127.0.0.1\n")
        for breaker in ("\u2028", "\x85", "\x1c"):
            with self.subTest(breaker=repr(breaker)):
                result = self.run_cli("alert", "--critical", f"Disk{breaker}full", "--dry-run", "--channel", "it",
                                      env=self.cli_env(METASYSTEM_NOW="1800000000"))
                self.assertEqual((result.returncode, result.stderr.decode()), (0, ""))
                self.assertIn("\nSubject: [CRITICAL] Disk full\n", result.stdout.decode())

    def test_ntfy_title_mail_argument_and_syslog_line_are_one_line(self):
        title = "Disk" + "".join(LINE_BREAKERS) + "full"
        with HTTPServer() as ntfy:
            alerts = self.system(f"[channel:it]\ntype = ntfy\nurl = {ntfy.url('/t')}\n\n"
                                 "[channel:mailer]\ntype = email\nmethod = mail\nto = root\ncommand = /bin/true\n")
            delivery = alerts.send_critical_alert(title, "m")
        self.assertEqual({name: d.outcome for name, d in delivery.outcomes.items()},
                         {"it": "sent", "mailer": "sent", "log": "sent"})
        spaces = " " * len(LINE_BREAKERS)
        self.assertEqual(ntfy.requests[0].headers["Title"], f"[CRITICAL] Disk{spaces}full")
        [line] = self.syslog.pending()
        self.assertEqual(line, f"<10>metasystem[{os.getpid()}]: [CRITICAL] Disk{spaces}full | m".encode())
        argv = alerts.channels["mailer"]._mail_argv(alerts.create_alert(title, "m", mm.AlertSeverity.CRITICAL))
        self.assertEqual(argv, ["/bin/true", "-s", f"[CRITICAL] Disk{spaces}full", "--", "root"])

    def test_a_log_line_on_stderr_stays_one_line_whatever_it_quotes(self):
        self.write_config("[channel:log]\ntype = log\naddress = /nonexistent\u2028forged: line\n", log_channel=False)
        result = self.run_cli("alert", "-v", "--info", "Disk", env=self.cli_env(METASYSTEM_NOW="1800000000"))
        self.assertEqual((result.returncode, result.stdout), (0, b""))
        lines = result.stderr.decode().splitlines()
        self.assertEqual([line for line in lines if not line.startswith("metasystem_monitor.py: ")], [])
        self.assertIn("metasystem_monitor.py: info: syslog at /nonexistent forged: line refused the alert "
                      "(No such file or directory); using the logger", lines)


if __name__ == "__main__":
    unittest.main()


class MoreChannels(AlertTestCase):
    """Teams, Matrix, Gotify, Pushover, Mattermost, Rocket.Chat and Opsgenie: each one class, its real
    payload checked on the wire by a local server answering as the service does."""

    def fire_and_resolve(self, section):
        alerts = self.system(section)
        self.t0 = self.clock.time()
        fired = alerts.fire("backup", "Backup failed", "rsync exited 23", "critical", details={"host": "nas"})
        self.clock.advance(600)
        resolved = alerts.resolve("backup", after=1)
        return fired.outcomes["it"], resolved.outcomes["it"]

    def test_teams_posts_one_adaptive_card(self):
        with HTTPServer(default=Reply(202, "")) as teams:
            fired, resolved = self.fire_and_resolve(f"[channel:it]\ntype = teams\nurl = {teams.url('/workflows/x')}\n")
        self.assertEqual((fired.outcome, resolved.outcome), ("sent", "sent"))
        first = teams.requests[0]
        self.assertEqual((first.method, first.path, first.headers["Content-Type"]),
                         ("POST", "/workflows/x", "application/json"))
        [attachment] = first.json()["attachments"]
        self.assertEqual((first.json()["type"], attachment["contentType"], attachment["contentUrl"]),
                         ("message", "application/vnd.microsoft.card.adaptive", None))
        card = attachment["content"]
        self.assertEqual((card["type"], card["version"], card["$schema"]),
                         ("AdaptiveCard", "1.2", "http://adaptivecards.io/schemas/adaptive-card.json"))
        self.assertEqual(card["body"][0], {"type": "TextBlock", "text": "[CRITICAL] Backup failed", "weight": "bolder",
                                           "size": "medium", "color": "attention", "wrap": True})
        self.assertEqual(card["body"][1]["text"], f"rsync exited 23\n\nhost: nas\n\nsent from: {socket.gethostname()}"
                                                  f"\ntime: {mm.iso_time(self.t0)}")
        self.assertEqual(teams.requests[1].json()["attachments"][0]["content"]["body"][0]["color"], "good")

    def test_teams_keeps_a_card_under_its_size_limit(self):
        with HTTPServer(default=Reply(202, "")) as teams:
            alerts = self.system(f"[channel:it]\ntype = teams\nurl = {teams.url('/w')}\n")
            alerts.send_alert(alerts.create_alert("Big", "é\"" * 40_000, mm.AlertSeverity.WARNING, channels=["it"]))
        body = teams.requests[0].body
        self.assertLessEqual(len(body), mm.TEAMS_CARD_BYTES)
        self.assertGreater(len(body), mm.TEAMS_CARD_BYTES - 100)
        self.assertTrue(teams.requests[0].json()["attachments"][0]["content"]["body"][1]["text"]
                        .endswith(mm.TRUNCATION_MARKER))

    def test_matrix_puts_a_notice_with_the_alert_as_its_transaction(self):
        replies = [Reply(429, '{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500}'),
                   Reply(200, '{"event_id":"$one"}'), Reply(200, '{"event_id":"$two"}')]
        with HTTPServer(*replies) as matrix:
            fired, resolved = self.fire_and_resolve(
                f"[channel:it]\ntype = matrix\nhomeserver = {matrix.url('')}\nroom_id = !room:example.org\n"
                "token = syt_secret_token\n")
        self.assertEqual((fired.outcome, fired.attempts, resolved.outcome), ("sent", 2, "sent"))
        self.assertEqual(self.clock.slept, [1.5])
        first, retried, closed = matrix.requests
        path = re.fullmatch(r"/_matrix/client/v3/rooms/%21room%3Aexample\.org/send/m\.room\.message/([0-9a-f]+)",
                            first.path)
        self.assertIsNotNone(path, first.path)
        self.assertEqual((first.method, retried.path), ("PUT", first.path))  # the same transaction: never twice
        self.assertNotEqual(closed.path, first.path)
        self.assertEqual(first.headers["Authorization"], "Bearer syt_secret_token")
        document = first.json()
        self.assertEqual((document["msgtype"], document["format"]), ("m.notice", "org.matrix.custom.html"))
        self.assertTrue(document["body"].startswith("[CRITICAL] Backup failed\n\nrsync exited 23\n"))
        self.assertTrue(document["formatted_body"].startswith("<strong>[CRITICAL] Backup failed</strong><br>rsync "
                                                              "exited 23<br>"))

    def test_gotify_posts_the_message_with_its_token_and_priority(self):
        with HTTPServer(default=Reply(200, '{"id": 1}')) as gotify:
            fired, resolved = self.fire_and_resolve(f"[channel:it]\ntype = gotify\nurl = {gotify.url('/g/')}\n"
                                                    "token = AppToken123\n")
        self.assertEqual((fired.outcome, resolved.outcome), ("sent", "sent"))
        first, second = gotify.requests
        self.assertEqual((first.path, first.headers["X-Gotify-Key"]), ("/g/message", "AppToken123"))
        self.assertEqual({key: first.json()[key] for key in ("title", "priority", "extras")},
                         {"title": "[CRITICAL] Backup failed", "priority": 8,
                          "extras": {"client::display": {"contentType": "text/plain"}}})
        self.assertEqual((second.json()["title"], second.json()["priority"]), ("[RESOLVED] Backup failed", 2))

    def test_pushover_posts_a_form_and_a_refused_user_is_permanent(self):
        from urllib.parse import parse_qs

        with HTTPServer(Reply(200, '{"status":1,"request":"r1"}'),
                        Reply(400, '{"user":"invalid","errors":["user identifier is invalid"],"status":0}')) as push:
            fired, resolved = self.fire_and_resolve(
                f"[channel:it]\ntype = pushover\napi_url = {push.url('/1/messages.json')}\ntoken = apptoken\n"
                "user = userkey\ndevice = phone\n")
        self.assertEqual((fired.outcome, resolved.outcome, resolved.attempts), ("sent", "failed", 1))
        first = push.requests[0]
        self.assertEqual((first.path, first.headers["Content-Type"]),
                         ("/1/messages.json", "application/x-www-form-urlencoded"))
        form = {key: values[0] for key, values in parse_qs(first.body.decode()).items()}
        self.assertEqual({key: form[key] for key in ("token", "user", "title", "priority", "timestamp", "device")},
                         {"token": "apptoken", "user": "userkey", "title": "[CRITICAL] Backup failed", "priority": "1",
                          "timestamp": str(int(self.t0)), "device": "phone"})
        self.assertTrue(form["message"].startswith("rsync exited 23\n"))
        self.assertIn("user identifier is invalid", resolved.error)

    def test_mattermost_and_rocketchat_webhooks(self):
        with HTTPServer(default=Reply(200, "ok")) as mattermost, \
                HTTPServer(Reply(200, '{"success":false,"error":"no"}'), Reply(200, '{"success":true}')) as rocket:
            alerts = self.system(f"[channel:mm]\ntype = mattermost\nurl = {mattermost.url('/hooks/k')}\n"
                                 f"channel = ops\n\n[channel:rc]\ntype = rocketchat\nurl = {rocket.url('/hooks/i/t')}\n"
                                 "alias = metasystem\n")
            first = alerts.send_critical_alert("Disk full", "1 GB left")
            self.clock.advance(7200)
            second = alerts.send_critical_alert("Disk full", "1 GB left")
        self.assertEqual((first.outcomes["mm"].outcome, first.outcomes["rc"].outcome, second.outcomes["rc"].outcome),
                         ("sent", "failed", "sent"))
        text = mattermost.requests[0].json()
        self.assertEqual(text["channel"], "ops")
        self.assertTrue(text["text"].startswith("**[CRITICAL] Disk full**\n\n1 GB left\n"))
        posted = rocket.requests[1].json()
        self.assertEqual((posted["text"], posted["alias"], posted["attachments"][0]["title"],
                          posted["attachments"][0]["color"]), ("[CRITICAL] Disk full", "metasystem", "Disk full",
                                                               "#d00000"))

    def test_mattermost_and_rocketchat_show_the_alerts_text_literally(self):
        title = "@channel <!here> see [docs](http://evil.example) *now*"
        message = ("@all ![img](http://evil.example/i.png) <@U123> <http://evil.example|click> _urgent_\n"
                   "# no heading\n- no list\n3. no item\ndisk_avail_kb \\ `x` ~~y~~ a|b #chan ||spoiler||")
        with HTTPServer(default=Reply(200, "ok")) as mattermost, \
                HTTPServer(default=Reply(200, '{"success":true}')) as rocket:
            alerts = self.system(f"[channel:mm]\ntype = mattermost\nurl = {mattermost.url('/hooks/k')}\n\n"
                                 f"[channel:rc]\ntype = rocketchat\nurl = {rocket.url('/hooks/i/t')}\n")
            sent = alerts.send_critical_alert(title, message, details={"by": "@here"})
        self.assertEqual((sent.outcomes["mm"].outcome, sent.outcomes["rc"].outcome), ("sent", "sent"))
        j, host, at = "\u2060", socket.gethostname(), mm.iso_time(self.clock.time())
        tail = f"\n\nby: @{j}here\n\nhost: {host}\ntime: {at}"
        self.assertEqual(mattermost.requests[0].json()["text"],
                         f"**[CRITICAL] @{j}channel <{j}!here> see [docs]{j}(http://evil.example) \\*now\\***\n\n"
                         f"@{j}all ![img]{j}(http://evil.example/i.png) <{j}@{j}U123> <{j}http://evil.example\\|click> "
                         f"\\_urgent\\_\n\\# no heading\n\\- no list\n3\\. no item\n"
                         f"disk_avail_kb \\\\ \\`x\\` \\~\\~y\\~\\~ a\\|b #chan \\|\\|spoiler\\|\\|" + tail)
        posted = rocket.requests[0].json()
        self.assertEqual(posted["text"], f"[CRITICAL] @{j}channel <{j}!here> see [docs]{j}(http://evil.example) "
                                         "\uff0anow\uff0a")
        [attachment] = posted["attachments"]
        self.assertEqual((attachment["title"], attachment["mrkdwn_in"]),
                         (f"@{j}channel <{j}!here> see [docs](http://evil.example) *now*", []))
        self.assertEqual(attachment["text"], message.replace("@", "@" + j).replace("<", "<" + j) + tail)
        for shown in (mattermost.requests[0].json()["text"], posted["text"], attachment["title"], attachment["text"]):
            for mention in ("@channel", "@here", "@all", "@U123", "<!", "<@", "<http"):
                self.assertNotIn(mention, shown)
        for markdown in (mattermost.requests[0].json()["text"], posted["text"]):  # the attachment is plain text
            for markup in ("](", "*now*", "_urgent_", "`x`", "~~y~~", "||spoiler||"):
                self.assertNotIn(markup, markdown)

    def test_matrix_and_telegram_mention_no_one_either(self):
        with HTTPServer(default=Reply(200, '{"event_id":"$e"}')) as matrix, \
                HTTPServer(default=Reply(200, '{"ok":true,"result":{}}')) as telegram:
            alerts = self.system(f"[channel:mx]\ntype = matrix\nhomeserver = {matrix.url('')}\n"
                                 "room_id = !r:example.org\ntoken = syt_token\n\n[channel:tg]\ntype = telegram\n"
                                 f"token = 1:secret\nchat_id = 5\napi_url = {telegram.url('')}\n")
            sent = alerts.send_critical_alert("@room look", "ping @admin and <b>@all</b>")
        self.assertEqual((sent.outcomes["mx"].outcome, sent.outcomes["tg"].outcome), ("sent", "sent"))
        j, host, at = "\u2060", socket.gethostname(), mm.iso_time(self.clock.time())
        text = f"[CRITICAL] @{j}room look\n\nping @{j}admin and <{j}b>@{j}all<{j}/b>\n\nhost: {host}\ntime: {at}"
        event = matrix.requests[0].json()
        self.assertEqual((event["body"], event.get("m.mentions")), (text, {}))
        self.assertTrue(event["formatted_body"].startswith(f"<strong>[CRITICAL] @{j}room look</strong><br>ping "
                                                           f"@{j}admin and &lt;{j}b&gt;@{j}all&lt;{j}/b&gt;<br>"))
        self.assertEqual(telegram.requests[0].json()["text"], text)

    def test_opsgenie_creates_with_the_key_as_alias_and_closes_by_it(self):
        with HTTPServer(default=Reply(202, '{"result":"Request will be processed","requestId":"x"}')) as genie:
            fired, resolved = self.fire_and_resolve(
                f"[channel:it]\ntype = opsgenie\napi_url = {genie.url('')}\napi_key = genie-secret\n")
        self.assertEqual((fired.outcome, resolved.outcome), ("sent", "sent"))
        create, close = genie.requests
        self.assertEqual((create.method, create.path, create.headers["Authorization"]),
                         ("POST", "/v2/alerts", "GenieKey genie-secret"))
        host = socket.gethostname()
        document = create.json()
        self.assertEqual({key: document[key] for key in document if key != "description"}, {
            "message": "Backup failed", "alias": "backup", "priority": "P1", "source": host, "entity": host,
            "tags": ["metasystem", "critical"], "details": {"host": "nas"}})
        self.assertEqual((close.method, close.path), ("POST", "/v2/alerts/backup/close?identifierType=alias"))
        self.assertEqual(close.json(), {"source": host, "note": f"resolved after 10m (firing since {mm.iso_time(self.t0)})"})


class Templates(AlertTestCase):
    """title_template and message_template: string.Template fields per channel, checked by config --check."""

    def test_each_channel_fills_its_own_templates(self):
        with HTTPServer(default=Reply(200, "ok")) as slack, HTTPServer() as hook:
            alerts = self.system(
                f"[channel:chat]\ntype = slack\nurl = {slack.url('/s')}\n"
                "title_template = $title on $host ($severity, $$5 budget)\n"
                "message_template = ${message}; key $key since $since; $details\n\n"
                f"[channel:raw]\ntype = mattermost\nurl = {hook.url('/h')}\n")
            since = self.clock.time()
            alerts.fire("backup", "Backup failed", "rsync exited 23", "critical", details={"host": "nas", "n": 2})
        host = socket.gethostname()
        payload = slack.requests[0].json()
        self.assertEqual(payload["text"], f"[CRITICAL] Backup failed on {host} (critical, $5 budget)")
        self.assertTrue(payload["attachments"][0]["blocks"][0]["text"]["text"].startswith(
            f"rsync exited 23; key backup since {mm.iso_time(since)}; host=nas, n=2\n"))
        self.assertTrue(hook.requests[0].json()["text"].startswith("**[CRITICAL] Backup failed**\n\nrsync exited 23\n"))

    def test_an_unknown_field_or_a_lone_dollar_is_a_configuration_problem(self):
        self.write_config("[channel:chat]\ntype = slack\nurl = https://hooks.slack.com/services/x\n"
                          "title_template = $title on $hostname\nmessage_template = costs 5$ now\n", log_channel=False)
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [
            f"{self.config_path}: [channel:chat] title_template: unknown field $hostname; the fields are $title, "
            "$message, $severity, $kind, $key, $host, $since, $time, $details, $note",
            f"{self.config_path}: [channel:chat] message_template: a $ at character 8 names no field (write $$ for "
            "a $)"])
