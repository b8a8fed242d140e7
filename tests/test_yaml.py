"""The original design's alerting-config.yaml: its flat key: value lines are read, the rest refused."""

import os

import metasystem_monitor as mm

from .servers import HTTPServer, Reply
from .support import AlertTestCase

PROG = "metasystem_monitor.py"


class FlatYamlTest(AlertTestCase):
    def home(self):
        folder = os.path.join(self.tmp, "home")
        os.makedirs(folder, exist_ok=True)
        return folder

    def write_yaml(self, text, name="alerting-config.yaml"):
        path = os.path.join(self.home(), name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(path, 0o600)
        return path

    def test_the_designs_yaml_file_beside_the_store_routes_alerts(self):
        with HTTPServer(default=Reply(200, "ok")) as slack, HTTPServer() as hook:
            self.write_yaml("# Slack webhook\n"
                            f"slack_webhook_url: \"{slack.url('/services/T0/B0/x')}\"   # quoted, with a comment\n\n"
                            f"webhook_url: {hook.url('/it')}\n"
                            "dedup_window: 2h\n")
            sent = self.run_cli("alert", "--critical", "Disk full", "--key", "disk")
            api = mm.AlertingSystem(db_path=self.db, environ={"METASYSTEM_HOME": self.home()})
            self.addCleanup(api.close)
        self.assertEqual(sent.returncode, 0)
        # The log channel is syslog where /dev/log is, else stderr: the YAML form cannot point it elsewhere.
        self.assertIn(sent.stderr, (b"", f"{PROG}: critical: [CRITICAL] Disk full\n".encode()))
        self.assertEqual(slack.requests[0].json()["text"], "[CRITICAL] Disk full")
        self.assertEqual(hook.requests[0].path, "/it")
        self.assertEqual(sorted(api.settings.channels), ["log", "slack", "webhook"])
        self.assertEqual(api.settings.dedup_window_s, 7200.0)

    def test_convert_prints_the_ini_that_says_the_same(self):
        path = self.write_yaml("---\nemail_to: ops@example.com\nslack_webhook_url: 'https://hooks.slack.com/it''s'\n"
                               'webhook_url: "https://example.com/a\\"b"\nresolve_after: 3\n')
        converted = self.run_cli("config", "--convert-yaml")
        self.assertEqual((converted.returncode, converted.stderr), (0, b""))
        self.assertEqual(converted.stdout.decode(), f"# converted from {path}; it holds secrets: chmod 600 it\n"
                                                    "[alerting]\nemail_to = ops@example.com\n"
                                                    "slack_webhook_url = https://hooks.slack.com/it's\n"
                                                    'webhook_url = https://example.com/a"b\nresolve_after = 3\n')
        from_yaml = self.run_cli("config").stdout.decode().split("\n", 1)[1]
        ini = os.path.join(self.home(), "alerting-config.ini")
        with open(ini, "wb") as handle:
            handle.write(converted.stdout)
        os.chmod(ini, 0o600)
        both = self.run_cli("config")
        self.assertEqual(both.stdout.decode().split("\n", 1)[1], from_yaml)  # the same configuration
        self.assertEqual(both.stderr.decode(), f"{PROG}: warning: {ini} is read and {path} is not: both exist "
                                               "(delete the YAML file, or convert it: config --convert-yaml)\n")

    def test_anything_beyond_flat_lines_is_refused_with_its_line(self):
        hint = "write it in the INI form instead (config --convert-yaml prints what this file says as INI)"
        for text, line, why in (
                ("email_to: a@b.c\nslack:\n  url: x\n", 2, "slack has no value (a nested mapping or a list?)"),
                ("channels:\n- slack\n", 1, "channels has no value (a nested mapping or a list?)"),
                ("# ok\n\n  email_to: a@b.c\n", 3, "only flat 'key: value' lines are read here"),
                ("email_to: [a, b]\n", 1, "'[a, b]' is not a plain value"),
                ("email_to: &me a@b.c\n", 1, "'&me a@b.c' is not a plain value"),
                ("email_to: |\n  a\n", 1, "'|' is not a plain value"),
                ("email_to: a\nemail_to: b\n", 2, "email_to is given twice"),
                ('email_to: "a\\qb"\n', 1, "'\"a\\\\qb\"' is not a plain value"),
                ("- email_to: a\n", 1, "only flat 'key: value' lines are read here")):
            with self.subTest(text=text):
                path = self.write_yaml(text)
                result = self.run_cli("alert", "--info", "x")
                self.assertEqual((result.returncode, result.stdout), (1, b""))
                self.assertEqual(result.stderr.decode(), f"{PROG}: error: configuration file {path}: line {line}: "
                                                         f"{why}{'' if 'twice' in why else '; ' + hint}\n")

    def test_no_value_can_become_a_line_or_a_section_of_the_ini(self):
        for value in ('"https://example.com/\\n[channel:evil]\\ntype = log"', '"a\\tb"', '"x\\n"', "'a\x1bb'",
                      "a\x07b"):
            with self.subTest(value=value):
                path = self.write_yaml(f"email_to: ops@example.com\nwebhook_url: {value}\n")
                why = f"configuration file {path}: line 2: webhook_url holds a line break or another control character"
                for command in (("config", "--convert-yaml"), ("config", "--check"), ("alert", "--info", "x")):
                    result = self.run_cli(*command)
                    self.assertEqual((result.returncode, result.stdout, result.stderr.decode()),
                                     (1, b"", f"{PROG}: error: {why}\n"))

    def test_what_converts_reads_back_as_the_same_values_in_alerting_alone(self):
        import configparser

        values = {"webhook_url": "https://example.com/[channel:evil]", "email_to": "[channel:evil]",
                  "dedup_window": "2h # not a comment in the INI", "slack_webhook_url": "https://h/#x = [y]"}
        self.write_yaml("".join(f"{key}: '{value}'\n" for key, value in values.items()))
        folder = os.path.join(self.tmp, "a\n[channel:evil]\ntype = log\n")
        os.makedirs(folder)
        named = os.path.join(folder, "alerting-config.yaml")
        with open(named, "w", encoding="utf-8") as handle:
            handle.write("email_to: ops@example.com\n")
        for args, expected in ((("config", "--convert-yaml"), values),
                               (("config", "--convert-yaml", "--config", named), {"email_to": "ops@example.com"})):
            with self.subTest(args=args):
                converted = self.run_cli(*args)
                self.assertEqual((converted.returncode, converted.stderr), (0, b""))
                parser = configparser.ConfigParser(interpolation=None)
                parser.read_string(converted.stdout.decode())
                self.assertEqual((parser.sections(), dict(parser["alerting"])), (["alerting"], expected))
        self.assertEqual(self.run_cli("config", "--convert-yaml", "--config", named).stdout.decode().splitlines()[0],
                         f"# converted from {named!r}; it holds secrets: chmod 600 it")

    def test_keys_that_differ_only_in_letter_case_are_one_key_given_twice(self):
        path = self.write_yaml("Email_To: a@example.com\nemail_to: b@example.com\n")
        for command in (("config", "--convert-yaml"), ("config", "--check"), ("alert", "--info", "x")):
            with self.subTest(command=command):
                result = self.run_cli(*command)
                self.assertEqual((result.returncode, result.stdout, result.stderr.decode()), (1, b"", (
                    f"{PROG}: error: configuration file {path}: line 2: email_to is given twice (line 1 has "
                    "Email_To: keys are read in any letter case)\n")))
        path = self.write_yaml("Webhook_URL: https://example.com/hook\nDEDUP_WINDOW: 2h\n")
        converted = self.run_cli("config", "--convert-yaml")
        self.assertEqual((converted.returncode, converted.stderr), (0, b""))
        self.assertEqual(converted.stdout.decode(), f"# converted from {path}; it holds secrets: chmod 600 it\n"
                                                    "[alerting]\nwebhook_url = https://example.com/hook\n"
                                                    "dedup_window = 2h\n")
