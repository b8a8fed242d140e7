"""Runs last (discovery sorts modules by name): nothing outside the suite's sandbox changed.

The account files, the devices the program could be pointed at, the real ~/.metasystem, the checkout
(``git status --porcelain --ignored``, caches aside) and the system's temporary folder are compared
with their state before the first test module was loaded (tests/sandbox.py).
"""

import os
import tempfile
import unittest

from . import sandbox


class SandboxGuardTest(unittest.TestCase):

    def test_nothing_outside_the_sandbox_changed(self):
        box = sandbox.current()
        self.assertEqual(box.changes(), [], "a test wrote outside the suite's sandbox")

    def test_the_suite_runs_inside_the_sandbox(self):
        box = sandbox.current()
        for path in (os.environ["HOME"], os.environ["TMPDIR"], tempfile.gettempdir(), os.getcwd()):
            self.assertTrue(box.inside(path), path)
        # A relative path that climbs DEPTH - 1 levels from the working directory stays inside.
        self.assertTrue(box.inside(os.path.join(os.getcwd(), *[".."] * (sandbox.DEPTH - 1), "etc", "passwd")))
        self.assertFalse(box.inside("/etc/passwd"))
        # TMPDIR stays shallow: a test's Unix socket must fit in 104 bytes even below macOS's long TMPDIR.
        self.assertLessEqual(len(box.tmp) - len(box.system_tmp), 30)


class GuardCanFailTest(unittest.TestCase):
    """The fingerprint sees a change in each place it watches (shown on stand-ins inside the sandbox)."""

    def test_a_new_store_in_the_home_folder_is_seen(self):
        home = tempfile.mkdtemp()
        box = sandbox.Sandbox(tempfile.mkdtemp(), tempfile.mkdtemp(), home)
        box.before = box.fingerprint()
        os.mkdir(os.path.join(home, ".metasystem"))
        with open(os.path.join(home, ".metasystem", "metrics.db"), "wb") as handle:
            handle.write(b"x")
        self.assertEqual([part for part, _, _ in box.changes()], ["~/.metasystem"])

    def test_a_file_left_in_a_checkout_or_the_temporary_folder_is_seen(self):
        import subprocess

        repo = tempfile.mkdtemp()
        subprocess.run(["git", "init", "-q", repo], check=True, timeout=60)
        before = sandbox._checkout_state(repo)
        with open(os.path.join(repo, "metrics.db"), "wb") as handle:
            handle.write(b"x")
        self.assertNotEqual(sandbox._checkout_state(repo), before)
        folder = tempfile.mkdtemp()
        os.mkdir(os.path.join(folder, "mm-test-stray"))
        self.assertEqual(sandbox._temporary_entries(folder), ["mm-test-stray"])
