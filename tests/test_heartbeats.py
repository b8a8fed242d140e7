"""Heard when the machine dies: run --ping speaks the healthchecks.io protocol to a real server on 127.0.0.1."""

import os
import re

import metasystem_monitor as mm

from .servers import HTTPServer, Reply
from .support import AlertTestCase, FakeClock, sqlite_rows

TOKEN = "8f14e45f-ceea-467f-a0e6-secret-ping-token"


class PingTest(AlertTestCase):
    def test_one_ping_is_tried_again_on_503_within_its_budget_and_not_after_a_404(self):
        clock = FakeClock()
        with HTTPServer(Reply(503, "busy"), Reply(503, "busy"), Reply(200, "OK")) as service:
            taken = mm.send_ping(service.url(f"/{TOKEN}"), "", "rid-1", b"all good\n", budget_s=10.0,
                                 clock=clock.monotonic, sleep=clock.sleep)
        self.assertIsNone(taken)
        self.assertEqual([request.path for request in service.requests], [f"/{TOKEN}?rid=rid-1"] * 3)
        self.assertEqual(clock.slept, [1.0, 2.0])
        with HTTPServer(Reply(404, "not found")) as service:
            refused = mm.send_ping(service.url(f"/{TOKEN}"), "fail", "rid-2", budget_s=10.0, clock=clock.monotonic,
                                   sleep=clock.sleep)
        self.assertEqual(len(service.requests), 1)
        self.assertEqual(refused, f"ping to {mm.mask_url(service.url(''))}/***?*** failed: HTTP 404: not found")
        self.assertNotIn(TOKEN, refused)

    def test_an_unknown_url_answered_ok_is_still_said(self):
        with HTTPServer(Reply(200, "OK (not found)")) as service:
            said = mm.send_ping(service.url(f"/{TOKEN}"), "start", "rid-3", budget_s=5.0)
        self.assertRegex(said, r"^ping to http://127\.0\.0\.1:\d+/\*\*\*\?\*\*\*: the service answered "
                               r"'OK \(not found\)': is the URL right\?$")

    def test_the_url_keeps_its_query_and_gains_the_signal_and_the_run_id(self):
        self.assertEqual(mm.ping_url("https://hc.example/ping/key/backup?create=1", "start", "r1"),
                         "https://hc.example/ping/key/backup/start?create=1&rid=r1")
        self.assertEqual(mm.ping_url("https://hc.example/abc/", "", "r1"), "https://hc.example/abc?rid=r1")


class RunPingsTest(AlertTestCase):
    def run_job(self, service, *command, config=""):
        self.write_config(config)
        return self.run_cli("run", "nightly", "--ping", service.url(f"/{TOKEN}"), "--", *command,
                            env=self.cli_env())

    def test_start_then_success_with_the_output_as_body_and_one_run_id(self):
        with HTTPServer(default=Reply(200, "OK")) as service:
            result = self.run_job(service, "sh", "-c", "echo backed up")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"", b""))
        start, done = service.requests
        run_id = re.fullmatch(rf"/{TOKEN}/start\?rid=([0-9a-f-]{{36}})", start.path).group(1)
        self.assertEqual((start.method, start.body, done.method, done.path, done.body),
                         ("POST", b"", "POST", f"/{TOKEN}?rid={run_id}", b"backed up\n"))
        self.assertEqual(done.headers["Content-Type"], "text/plain; charset=utf-8")

    def test_a_failure_pings_its_exit_code_with_the_output(self):
        with HTTPServer(default=Reply(200, "OK")) as service:
            result = self.run_job(service, "sh", "-c", "echo disk gone >&2; exit 3")
        self.assertEqual(result.returncode, 3)
        start, done = service.requests
        run_id = start.path.split("rid=")[1]
        self.assertEqual((done.path, done.body), (f"/{TOKEN}/3?rid={run_id}", b"disk gone\n"))

    def test_a_dead_ping_service_neither_fails_nor_holds_the_job(self):
        with HTTPServer(default=Reply(hang=True)) as service:
            result = self.run_job(service, "sh", "-c", "echo fine", config="[alerting]\ntimeout = 0.2s\n")
        self.assertEqual((result.returncode, result.stdout), (0, b""))
        lines = result.stderr.decode().splitlines()
        self.assertEqual(len(lines), 2, lines)
        for line in lines:
            self.assertRegex(line, r"^metasystem_monitor\.py: warning: ping to http://127\.0\.0\.1:\d+/\*\*\*\?\*\*\* "
                                   r"failed: ")
        self.assertNotIn(TOKEN, result.stderr.decode())

    def test_a_ping_url_that_is_not_http_is_a_usage_error_and_nothing_runs(self):
        self.write_config("")
        result = self.run_cli("run", "nightly", "--ping", "ftp://example/x", "--", "sh", "-c", "exit 9",
                              env=self.cli_env())
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (2, "metasystem_monitor.py: error: --ping: not an http or https URL with a host\n"))


class JobSectionPingTest(AlertTestCase):
    """[job:NAME] ping_url: the job's pings set once in the configuration, not on every cron line."""

    def test_a_job_section_pings_and_ping_on_the_command_line_wins(self):
        token_file = os.path.join(self.tmp, "ping-url")
        with HTTPServer(default=Reply(200, "OK")) as service, HTTPServer(default=Reply(200, "OK")) as other:
            with open(token_file, "w", encoding="ascii") as handle:
                handle.write(service.url(f"/{TOKEN}") + "\n")
            os.chmod(token_file, 0o600)
            self.write_config(f"[job:nightly]\nping_url_file = {token_file}\n\n"
                              f"[job:other]\nping_url = {other.url('/other')}\n")
            ran = self.run_cli("run", "nightly", "--", "sh", "-c", "echo ok; exit 4", env=self.cli_env())
            given = self.run_cli("run", "nightly", "--ping", other.url("/given"), "--", "true", env=self.cli_env())
            unpinged = self.run_cli("run", "third", "--", "true", env=self.cli_env())
        self.assertEqual((ran.returncode, given.returncode, given.stderr, unpinged.returncode), (4, 0, b"", 0))
        self.assertEqual(ran.stderr.decode(),  # no channel but the log: the alert on stderr
                         "metasystem_monitor.py: critical: [CRITICAL] job nightly failed | run nightly: failure (exit 4) "
                         "after 0.0 s command: sh -c 'echo ok; exit 4' ok\n")
        start, done = service.requests
        run_id = start.path.split("rid=")[1]
        self.assertEqual((start.path, done.path, done.body), (f"/{TOKEN}/start?rid={run_id}",
                                                              f"/{TOKEN}/4?rid={run_id}", b"ok\n"))
        self.assertEqual([request.path.split("?")[0] for request in other.requests], ["/given/start", "/given"])

    def test_a_job_section_that_cannot_ping_warns_and_the_job_runs(self):
        self.write_config("[job:nightly]\nping_url_env = MM_NOT_SET_HERE\n")
        result = self.run_cli("run", "nightly", "--", "sh", "-c", "exit 0", env=self.cli_env())
        self.assertEqual((result.returncode, result.stdout), (0, b""))
        self.assertEqual(result.stderr.decode(), "metasystem_monitor.py: warning: run nightly not pinged: "
                                                 "[job:nightly] ping_url: $MM_NOT_SET_HERE is not set\n")
        self.write_config(f"[job:nightly]\nping_url = ftp://{TOKEN}\nping = x\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [f"{self.config_path}: [job:nightly] ping: unknown key",
                                            f"{self.config_path}: [job:nightly] ping_url: not an http or https URL"])
        self.assertNotIn(TOKEN, out)


class CheckPingTest(AlertTestCase):
    def check(self, config, when=1_800_000_000.0):
        self.write_config(config)
        return self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=repr(when), TZ="UTC"))

    def test_every_check_run_pings_its_url_or_its_exit_code_with_the_output(self):
        marker = os.path.join(self.tmp, "marker")
        with open(marker, "w", encoding="ascii") as handle:
            handle.write("x")
        os.utime(marker, (1_800_000_000.0 - 60, 1_800_000_000.0 - 60))
        with HTTPServer(default=Reply(200, "OK")) as service:
            ok = self.check(f"[check]\nping_url = {service.url('/' + TOKEN)}\n\n"
                            f"[check:marker]\ntype = file_age\npath = {marker}\ncritical = ~:1h\n")
            self.write_config(f"[check]\nping_url_env = MM_PING_URL\n\n"
                              f"[check:marker]\ntype = file_age\npath = {marker}\ncritical = ~:1h\n")
            late = self.run_cli("check", "--no-alert", env=self.cli_env(
                METASYSTEM_NOW=repr(1_800_000_000.0 + 7200), MM_PING_URL=service.url("/" + TOKEN)))
        self.assertEqual((ok.returncode, ok.stderr, late.returncode, late.stderr), (0, b"", 2, b""))
        first, second = service.requests
        self.assertRegex(first.path, rf"^/{TOKEN}\?rid=[0-9a-f-]{{36}}$")
        self.assertEqual(first.body, ok.stdout)
        self.assertRegex(second.path, rf"^/{TOKEN}/2\?rid=[0-9a-f-]{{36}}$")
        self.assertEqual(second.body, late.stdout)

    def test_a_bad_ping_url_is_a_configuration_problem_without_the_url(self):
        self.write_config(f"[check]\nping_url = ftp://{TOKEN}\nping = x\n")
        code, out, err = self.run_main("config", "--check", "--config", self.config_path)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(out.splitlines(), [f"{self.config_path}: [check] ping: unknown key",
                                            f"{self.config_path}: [check] ping_url: not an http or https URL"])


class WatchdogTest(AlertTestCase):
    """The Watchdog: always firing while check runs, so Alertmanager's dead man's switch hears the machine."""

    NOW = 1_800_000_000.0

    def check(self, config):
        marker = os.path.join(self.tmp, "marker")
        with open(marker, "w", encoding="ascii") as handle:
            handle.write("x")
        self.write_config(config + f"\n[check:marker]\ntype = file_age\npath = {marker}\n", log_channel=False)
        return self.run_cli("check", env=self.cli_env(METASYSTEM_NOW=repr(self.NOW)))

    def test_each_check_run_posts_the_watchdog_valid_for_two_intervals(self):
        import socket

        with HTTPServer(default=Reply(200, "")) as alertmanager, HTTPServer(default=Reply(200, "")) as quiet:
            result = self.check(f"[check]\ninterval = 5m\n\n[channel:am]\ntype = alertmanager\n"
                                f"url = {alertmanager.url('')}\n\n"
                                f"[channel:other]\ntype = alertmanager\nurl = {quiet.url('')}\nwatchdog = false\n")
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        (request,) = alertmanager.requests
        self.assertEqual((request.method, request.path, request.headers["Content-Type"]),
                         ("POST", "/api/v2/alerts", "application/json"))
        host = socket.gethostname()
        self.assertEqual(request.json(), [{
            "labels": {"alertname": "Watchdog", "severity": "none", "instance": host, "job": "metasystem"},
            "annotations": {"summary": f"metasystem-monitor runs its checks on {host}",
                            "description": "This alert fires for as long as check runs here, on purpose: route it "
                                           "to a dead man's switch, which alerts when it stops (the machine or cron "
                                           "died)."},
            "startsAt": mm.iso_time(self.NOW), "endsAt": mm.iso_time(self.NOW + 2 * 300 + 60),
            "generatorURL": ""}])
        self.assertEqual(quiet.requests, [])
        # Not an alert of the history: the dashboard's recent alerts stay the machine's news.
        self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alerts"), [(0,)])

    def test_an_alertmanager_that_refuses_it_is_one_warning_and_the_verdict_stands(self):
        with HTTPServer(default=Reply(500, "broken")) as alertmanager:
            result = self.check(f"[channel:am]\ntype = alertmanager\nurl = {alertmanager.url('/secret-path')}\n")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stderr.decode(), "metasystem_monitor.py: warning: channel am: the Watchdog was not "
                                                 "sent: HTTP 500: broken\n")
        self.assertEqual(len(alertmanager.requests), 1)
        no_alert = self.run_cli("check", "--no-alert", env=self.cli_env(METASYSTEM_NOW=repr(self.NOW)))
        self.assertEqual((no_alert.returncode, no_alert.stderr), (0, b""))
