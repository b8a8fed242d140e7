"""Secrets never reach the history, JSON output, logs or errors, in any encoding they can take.

Raw, percent-encoded (upper and lower case hex) and base64 in basic auth: a receiver that repeats the
request path or its Authorization header back in an error, and an alert whose title holds a secret.
"""

import base64
import json
import os
from urllib.parse import quote

from .servers import HTTPServer, Reply
from .support import AlertTestCase, sqlite_rows

TOKEN = "123456:ABC-secret/token+x"


def encodings(secret):
    encoded = quote(secret, safe="")
    return {secret, secret.lower(), encoded, encoded.lower(), base64.b64encode(secret.encode()).decode()}


class SecretEncodingsTest(AlertTestCase):

    def everything_written(self, *results):
        """The store's text columns, the syslog lines and the outputs of ``results``, as one text."""
        texts = [repr(sqlite_rows(self.db, f"SELECT * FROM {table}"))
                 for table in ("alerts", "alert_deliveries", "alert_marks", "alert_states")]
        texts += [repr(line) for line in self.syslog.pending()]
        texts += [(result.stdout + result.stderr).decode() for result in results]
        return "\n".join(texts)

    def assertNowhere(self, secret, text):
        for form in encodings(secret):
            self.assertNotIn(form, text, f"{secret!r} shows as {form!r}")

    def test_a_receiver_echoing_the_path_percent_encoded_leaves_no_token(self):
        for lower in (False, True):
            with self.subTest(lower_hex=lower):
                echo = (lambda request, lower=lower: quote(request.path, safe="").lower() if lower
                        else quote(request.path, safe=""))
                with HTTPServer(default=Reply(400, '{"ok":false,"description":"bad path"}', echo=echo)) as telegram:
                    self.write_config(f"[channel:tg]\ntype = telegram\ntoken = {TOKEN}\nchat_id = 1\n"
                                      f"api_url = {telegram.url()}\n")
                    os.chmod(self.config_path, 0o600)
                    sent = self.run_cli("-v", "alert", "--warning", f"t{lower}", env=self.cli_env())
                    listed = self.run_cli("alerts", "--json", env=self.cli_env())
                self.assertIn(quote(TOKEN, safe="")[:6], telegram.requests[0].path.replace(":", "%3A"))
                self.assertEqual(sqlite_rows(self.db, "SELECT count(*) FROM alert_deliveries WHERE channel = 'tg' "
                                                      "AND outcome = 'failed' AND error LIKE '%***%'"), [(1 + lower,)])
                self.assertNowhere(TOKEN, self.everything_written(sent, listed))

    def test_credentials_in_a_url_go_as_basic_auth_and_are_masked_when_echoed(self):
        echo_auth = Reply(401, "denied:", echo=lambda request: request.headers.get("Authorization"))
        for kind in ("webhook", "alertmanager", "ntfy"):
            with self.subTest(kind=kind):
                with HTTPServer(default=echo_auth) as receiver:
                    url = receiver.url("/hook").replace("http://", "http://ops:pa%23ss-Word9@")
                    self.write_config(f"[channel:it]\ntype = {kind}\nurl = {url}\n")
                    sent = self.run_cli("alert", "--critical", f"down {kind}", env=self.cli_env())
                self.assertEqual(receiver.requests[0].headers.get("Authorization"),
                                 "Basic " + base64.b64encode(b"ops:pa#ss-Word9").decode())
                self.assertTrue(receiver.requests[0].path.startswith("/hook"), receiver.requests[0].path)
                self.assertEqual(sent.returncode, 4, sent.stderr)
                written = self.everything_written(sent)
                for secret in ("pa#ss-Word9", "pa%23ss-Word9", "ops:pa#ss-Word9"):
                    self.assertNowhere(secret, written)

    def test_an_alert_title_holding_a_secret_is_masked_in_key_history_marks_and_log(self):
        with HTTPServer() as hook:
            url = hook.url("/services/T0001/B0002/XyzSecretPart42")
            self.write_config(f"[channel:hook]\ntype = webhook\nurl = {url}\n")
            sent = self.run_cli("alert", "--critical", "leak XyzSecretPart42 here", "and 123 XyzSecretPart42",
                                env=self.cli_env())
            fired = self.run_cli("alert", "--warning", "t", "--key", "k-XyzSecretPart42", env=self.cli_env())
        self.assertEqual((sent.returncode, fired.returncode), (0, 0), sent.stderr + fired.stderr)
        payloads = [json.loads(request.body) for request in hook.requests]
        self.assertEqual([p["title"] for p in payloads], ["leak *** here", "t"])
        self.assertEqual(sqlite_rows(self.db, "SELECT dedup_key FROM alerts ORDER BY id"),
                         [("critical:leak *** here",), ("k-***",)])
        self.assertNowhere("XyzSecretPart42", self.everything_written(sent, fired) + repr(payloads))


class PushGatewayUrlTest(AlertTestCase):

    def test_bad_gateway_urls_are_one_line_usage_errors_without_the_password(self):
        for gateway in ("http://admin:Hunter2#x@127.0.0.1:9091", "http://u:Hunter2@/", "http://127.0.0.1:99999",
                        "http://admin:Hunter2@127.0.0.1:0", "ftp://admin:Hunter2@127.0.0.1/"):
            with self.subTest(gateway=gateway):
                result = self.run_cli("--db", self.db, "push", "--gateway", gateway)
                self.assertOneLineError(result, 2, "--gateway: ")
                self.assertNotIn(b"Hunter2", result.stderr)

    def test_credentials_reach_the_gateway_as_basic_auth_and_its_echo_is_masked(self):
        with HTTPServer(default=Reply(500, "no:", echo=lambda request: request.headers.get("Authorization"))) as gw:
            result = self.run_cli("--db", self.db, "push", "--gateway",
                                  gw.url("/").replace("http://", "http://admin:Hunter2%40x@"))
        self.assertEqual(gw.requests[0].headers.get("Authorization"),
                         "Basic " + base64.b64encode(b"admin:Hunter2@x").decode())
        self.assertOneLineError(result, 1, "failed: HTTP 500: no: Basic ***")
        for form in encodings("Hunter2@x") | encodings("admin:Hunter2@x"):
            self.assertNotIn(form.encode(), result.stderr)
