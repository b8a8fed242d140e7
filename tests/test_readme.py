"""Every example in the README runs: the fenced blocks marked ``sh example`` and ``python example``.

Shell examples run line by line, in README order, against one temporary store, with
metasystem_monitor.py on PATH and monitoring_dashboard.py in the working folder, as the README tells a
user to install them. Each must exit 0 unless its line says ``# exits N``, and none may print a
traceback. The Python examples run in order as one program.
"""

import os
import re
import stat
import subprocess
import sys

from .servers import SyslogSocket
from .support import REPO, SUBPROCESS_TIMEOUT_S, StoreTestCase

README = os.path.join(REPO, "README.md")
BLOCK = re.compile(r"^```(sh|python) example\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EXITS = re.compile(r"#\s*exits (\d+)")


def examples(kind):
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    return [body for found, body in BLOCK.findall(text) if found == kind]


class ReadmeExamplesTest(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.bin = os.path.join(self.tmp, "bin")
        os.mkdir(self.bin)
        # The program on PATH (the same main(), from cached bytecode: thirty runs do not each compile the
        # file), and python3 the interpreter running these tests.
        self.wrapper("metasystem_monitor.py", f'PYTHONPATH="{REPO}" exec "{sys.executable}" -m metasystem_monitor')
        self.wrapper("python3", f'exec "{sys.executable}"')
        os.symlink(os.path.join(REPO, "monitoring_dashboard.py"), os.path.join(self.tmp, "monitoring_dashboard.py"))
        home = os.path.join(self.tmp, "home")
        os.mkdir(home, 0o700)
        self.syslog = SyslogSocket(os.path.join(self.tmp, "log.sock"))
        self.addCleanup(self.syslog.__exit__)
        with open(os.path.join(home, "alerting-config.ini"), "w", encoding="utf-8") as handle:
            handle.write(f"[channel:log]\ntype = log\naddress = {self.syslog.path}\n")
        os.chmod(os.path.join(home, "alerting-config.ini"), 0o600)

    def wrapper(self, name, command):
        path = os.path.join(self.bin, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f'#!/bin/sh\n{command} "$@"\n')
        os.chmod(path, stat.S_IRWXU)

    def env(self):
        env = self.child_env(PATH=f"{self.bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
        env.pop("PYTHONPATH")  # as a user has it: the dashboard finds the module beside itself
        return env

    def run_shell_line(self, line):
        script = os.path.join(self.tmp, "example.sh")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write("set -o pipefail\n" + line + "\n")
        result = subprocess.run(["bash", script], capture_output=True, env=self.env(), cwd=self.tmp,
                                timeout=SUBPROCESS_TIMEOUT_S)
        self.syslog.pending()  # drained, so a full socket queue never holds up the next alert
        return result

    def test_the_shell_examples(self):
        blocks = examples("sh")
        self.assertGreaterEqual(len(blocks), 7)
        ran = 0
        for block in blocks:
            for line in block.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                expected = EXITS.search(line)
                with self.subTest(line=line):
                    result = self.run_shell_line(line)
                    self.assertNotIn(b"Traceback", result.stdout + result.stderr)
                    self.assertEqual(result.returncode, int(expected.group(1)) if expected else 0,
                                     (result.stdout + result.stderr).decode()[-2000:])
                    ran += 1
        self.assertGreaterEqual(ran, 25)

    def test_the_python_examples(self):
        program = "\n".join(examples("python"))
        self.assertIn("MetricsCollector()", program)
        script = os.path.join(self.tmp, "example.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(program)
        result = subprocess.run([sys.executable, script], capture_output=True, cwd=self.tmp,
                                env=self.child_env(), timeout=SUBPROCESS_TIMEOUT_S)
        self.assertEqual((result.returncode, result.stderr.decode()[-2000:]), (0, ""))
