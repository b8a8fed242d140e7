"""Never silent: whatever breaks at the seams between the features, the run still reaches a person, or says
why on stderr with a non-zero exit, within its deadline."""

import os
import subprocess
import sys

from .support import AlertTestCase

QUICK_S = 20  # a run that should end at once: past this it hangs (a FIFO read, an endless file)


class FilesThatAreNotFilesTest(AlertTestCase):
    """A configuration or secret file is a small regular file; a FIFO blocks a read forever and /dev/zero
    never ends, so both are refused by name before anything is read."""

    def assertRefused(self, result, fragment):
        err = result.stderr.decode()
        self.assertNotEqual(result.returncode, 0, err)
        self.assertIn(fragment, err)
        self.assertNotIn("Traceback", err)

    def test_a_configuration_that_is_a_fifo_or_a_device_is_refused_at_once(self):
        fifo = os.path.join(self.tmp, "fifo.ini")
        os.mkfifo(fifo)
        zero = os.path.join(self.tmp, "zero.ini")
        os.symlink("/dev/zero", zero)
        for path, kind in ((fifo, "a FIFO"), (zero, "a character device")):
            for command in (["config", "--check"], ["alert", "--warning", "t"]):
                with self.subTest(path=path, command=command):
                    result = self.run_cli("--config", path, "--db", self.db, *command, timeout=QUICK_S)
                    self.assertRefused(result, f"{path} is {kind}, not a regular file")

    def test_a_configuration_larger_than_a_megabyte_is_refused(self):
        path = os.path.join(self.tmp, "huge.ini")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("[storage]\n" + "# padding\n" * 120_000)
        result = self.run_cli("--config", path, "config", "--check", timeout=QUICK_S)
        self.assertRefused(result, f"{path} is larger than 1,048,576 bytes")

    def test_a_fifo_is_not_opened_so_no_writer_is_ever_needed(self):
        fifo = os.path.join(self.tmp, "fifo.ini")
        os.mkfifo(fifo)
        child = subprocess.Popen([sys.executable, "-c", "import metasystem_monitor as mm, sys\n"
                                  "try:\n    mm.load_config(sys.argv[1])\nexcept mm.ConfigError as err:\n"
                                  "    print(err)\n", fifo], stdout=subprocess.PIPE, env=self.child_env())
        out, _ = child.communicate(timeout=QUICK_S)
        self.assertEqual(out.decode(), f"configuration file {fifo} is a FIFO, not a regular file\n")


class SuccessThatIsNotTest(AlertTestCase):
    """A run that says all went well when a person did not get the alert is a silent failure."""

    def test_without_syslog_the_alert_reaches_stderr_only_when_no_other_channel_took_it(self):
        from .servers import HTTPServer, Reply

        critical = f"[check:always]\ntype = command\ncommand = {sys.executable} -c \"raise SystemExit(2)\"\n"
        with HTTPServer() as hook, HTTPServer(default=Reply(400, "no")) as refusing:
            for url, expected in ((hook.url("/h"), ""), (refusing.url("/r"), "critical")):
                with self.subTest(url=url):
                    self.write_config(f"[channel:log]\ntype = log\naddress = none\n\n"
                                      f"[channel:hook]\ntype = webhook\nurl = {url}\n\n{critical}", log_channel=False)
                    if os.path.exists(self.db):
                        os.remove(self.db)
                    result = self.run_cli("check", env=self.cli_env())
                    said = [line.split(": ")[1] for line in result.stderr.decode().splitlines()
                            if "[CRITICAL] check always" in line]
                    self.assertEqual((result.returncode, said), (2, [expected] if expected else []),
                                     result.stderr)
        self.assertEqual((len(hook.requests), len(refusing.requests)), (1, 1))
