"""Bytes that are not UTF-8, in arguments and in secret files: alerts still go out, verdicts still show.

Each command runs as a real process with the bytes in its argv (a Latin-1 file name, a title typed in an
old terminal), as the kernel hands them over. Text arguments carry them as U+FFFD; file names and a job's
own arguments keep them byte for byte.
"""

import os
import sys

from .servers import HTTPServer
from .support import AlertTestCase, sqlite_rows

LATIN1 = b"caf\xe9"
SHOWN = "caf\ufffd"


class ArgumentBytesTest(AlertTestCase):

    def run_bytes(self, *args, env=None):
        import subprocess

        return subprocess.run([sys.executable.encode(), b"-m", b"metasystem_monitor", *args], capture_output=True,
                              env=env or self.cli_env(), cwd=self.tmp, timeout=120)

    def test_an_alert_title_in_latin1_is_delivered_with_a_visible_replacement(self):
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            result = self.run_bytes(b"alert", b"--critical", LATIN1, b"message " + LATIN1,
                                    b"--detail", b"where=" + LATIN1)
        self.assertEqual(result.returncode, 0, result.stderr)
        [request] = hook.requests
        payload = request.json()
        self.assertEqual((payload["title"], payload["message"], payload["details"]["where"]),
                         (SHOWN, f"message {SHOWN}", SHOWN))
        self.assertEqual(sqlite_rows(self.db, "SELECT title FROM alerts"), [(SHOWN,)])

    def test_a_job_gets_its_file_name_byte_for_byte_and_its_failure_is_reported(self):
        script = self.write_script("job.py", "with open(sys.argv[2], 'wb') as out:\n    out.write(os.fsencode(sys.argv[1]))\nsys.exit(3)")
        got = os.path.join(self.tmp, "got")
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n")
            result = self.run_bytes(b"run", b"nightly", b"--", script.encode(), LATIN1 + b".txt", got.encode())
        self.assertEqual(result.returncode, 3, result.stderr)
        with open(got, "rb") as handle:
            self.assertEqual(handle.read(), LATIN1 + b".txt")
        self.assertIn(f"'{SHOWN}.txt'".encode("utf-8"), result.stdout.splitlines()[1])
        self.assertEqual([r.json()["title"] for r in hook.requests], ["job nightly failed"])
        self.assertEqual(sqlite_rows(self.db, "SELECT job, outcome, exit_code FROM job_runs"), [("nightly", "failure", 3)])

    def test_labels_silences_and_push_jobs_take_latin1(self):
        self.write_config()
        recorded = self.run_bytes(b"record", b"x", b"1", b"--label", b"k=" + LATIN1)
        self.assertEqual((recorded.returncode, recorded.stderr), (0, b""))
        self.assertEqual(sqlite_rows(self.db, "SELECT labels FROM series"), [('{"k":"%s"}' % SHOWN,)])
        added = self.run_bytes(b"silence", b"add", b"--match", LATIN1, b"--for", b"1h")
        self.assertEqual((added.returncode, added.stderr), (0, b""))
        self.assertEqual(sqlite_rows(self.db, "SELECT match FROM silences"), [(SHOWN,)])
        with HTTPServer() as gateway:
            pushed = self.run_bytes(b"push", b"--gateway", gateway.url("/").encode(), b"--job", LATIN1,
                                    b"--instance", b"h")
        self.assertEqual((pushed.returncode, pushed.stderr), (0, b""))
        self.assertEqual(gateway.requests[0].path, "/metrics/job/caf%EF%BF%BD/instance/h")

    def test_stdin_that_is_not_utf8_is_one_usage_error_and_nothing_is_stored(self):
        result = self.run_cli("record", "-", stdin=b"good 1\n" + LATIN1 + b" 2\n", env=self.cli_env())
        self.assertOneLineError(result, 2, "line 2: not UTF-8 text")
        self.assertFalse(os.path.exists(self.db))  # refused before the store was opened


class SecretFileBytesTest(AlertTestCase):
    """A token file holding b'\\xff\\xfe': its channel is skipped with one warning; nothing else changes."""

    def setUp(self):
        super().setUp()
        self.token = os.path.join(self.tmp, "token")
        with open(self.token, "wb") as handle:
            handle.write(b"\xff\xfe")
        os.chmod(self.token, 0o600)

    def test_every_command_names_the_file_and_the_other_channels_deliver(self):
        skipped = "not UTF-8 text"
        with HTTPServer() as hook:
            self.write_config(f"[alerting]\nwebhook_url = {hook.url()}\n"
                              f"[channel:tg]\ntype = telegram\ntoken_file = {self.token}\nchat_id = 1\n"
                              f"[channel:hook2]\ntype = webhook\nurl_file = {self.token}\n"
                              f"[check:full]\ntype = disk\npath = {self.tmp}\ncritical = 101%:\n")
            env = self.cli_env()
            check = self.run_cli("check", env=env)
            alert = self.run_cli("alert", "--warning", "t", env=env)
            listed = self.run_cli("alerts", env=env)
            shown = self.run_cli("config", env=env)
            checked = self.run_cli("config", "--check", env=env)
        self.assertEqual(check.returncode, 2, check.stderr)  # CRITICAL, as the check says
        self.assertTrue(check.stdout.startswith(b"METASYSTEM CRITICAL - full CRITICAL"), check.stdout)
        self.assertEqual(alert.returncode, 3, alert.stderr)  # tg, unusable, did not get it
        # the unusable channels are the run's configuration problem, heard like any other
        self.assertEqual([r.json()["title"] for r in hook.requests], ["check full", "check configuration", "t"])
        self.assertEqual(listed.returncode, 1, listed.stderr)
        self.assertIn(b"tg=not_configured", listed.stdout)
        self.assertEqual(shown.returncode, 1, shown.stderr)
        self.assertIn(f"# not configured: {self.token} is {skipped}".encode(), shown.stdout)
        self.assertEqual(checked.returncode, 1, checked.stderr)
        self.assertIn(f"[channel:tg] channel tg cannot be used here: {self.token} is {skipped}".encode(),
                      checked.stdout)
        for result in (check, alert, listed, shown, checked):
            self.assertNotIn(b"unexpected", result.stderr)
            self.assertNotIn(b"Traceback", result.stderr)

    def test_a_secret_file_other_users_can_read_draws_one_warning(self):
        with open(self.token, "w", encoding="utf-8") as handle:
            handle.write("123:abc\n")
        os.chmod(self.token, 0o644)
        self.write_config(f"[channel:tg]\ntype = telegram\ntoken_file = {self.token}\nchat_id = 1\n")
        result = self.run_cli("config", "--check", env=self.cli_env())
        warnings = [line for line in result.stderr.decode().splitlines() if "other users can read it" in line]
        self.assertEqual(warnings, [f"metasystem_monitor.py: warning: {self.token} holds a secret and other users "
                                    f"can read it: chmod 600 {self.token}"])
