"""The suite's sandbox: every file a test writes, its HOME, TMPDIR and working directory, in one folder.

The suite runs as root in CI. A test that let ``../../../etc/passwd`` or ``/dev/null`` reach a writing
command once replaced the machine's account file. So, before any test is loaded:

- one folder is made in the system's temporary folder; HOME and TMPDIR (and ``tempfile.tempdir``) move
  just below it, for this process and every child it starts (shallow: a Unix socket's path must stay
  under 104 bytes, even below macOS's long TMPDIR);
- the working directory moves DEPTH levels below it, so that a relative path climbing DEPTH - 1 levels
  up still lands inside; a test that changes directory goes to ``deep_folder(its own folder)``;
- SIGINT is given back its default for the children, when the runner was started with it ignored;
- what lies outside is fingerprinted first (the account files, the real ``~/.metasystem``, the checkout,
  new entries in the system's temporary folder), and ``tests/test_zz_sandbox_guard.py``, discovered last,
  fails if any of it changed.
"""

import atexit
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

DEPTH = 12  # a hostile relative path may climb at most DEPTH - 1 levels and stay inside
HOST_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/hosts", "/etc/hostname")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MARK = "METASYSTEM_TEST_SANDBOX"


class Sandbox:
    """The folders of one run of the suite and the fingerprint of the host taken before it began."""

    def __init__(self, root, system_tmp, real_home):
        self.root = root
        self.tmp = os.path.join(root, "t")
        self.home = os.path.join(root, "h")
        self.work = deep_folder(root, create=False)
        self.system_tmp = system_tmp
        self.real_home = real_home
        self.before = None

    def fingerprint(self):
        """What must not change while the suite runs, as a comparable dict."""
        return {
            "host files": {path: _file_digest(path) for path in HOST_FILES},
            "devices": {path: _kind(path) for path in DEVICES},
            "~/.metasystem": _tree_digest(os.path.join(self.real_home, ".metasystem")),
            "checkout": _checkout_state(REPO),
            "system temporary folder": _temporary_entries(self.system_tmp),
        }

    def changes(self):
        """Each part of the fingerprint that differs now from before the suite ran: (part, before, now)."""
        now = self.fingerprint()
        return [(part, self.before[part], now[part]) for part in self.before if now[part] != self.before[part]]

    def inside(self, path):
        """Whether ``path`` (made absolute against the working directory, links resolved) lies inside."""
        real = os.path.realpath(path)
        return real == os.path.realpath(self.root) or real.startswith(os.path.realpath(self.root) + os.sep)


def deep_folder(base, create=True):
    """A folder DEPTH levels below ``base``: from there a path climbing DEPTH - 1 levels stays in ``base``."""
    folder = os.path.join(base, *["d"] * DEPTH)
    if create:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    return folder


_current = []  # the one Sandbox of this process, once entered


def current():
    """The sandbox this process runs in; made and entered on first use."""
    if not _current:
        _current.append(_enter())
    return _current[0]


def _enter():
    system_tmp = tempfile.gettempdir()
    real_home = os.path.expanduser("~")
    root = tempfile.mkdtemp(prefix="mm-suite-", dir=system_tmp)
    box = Sandbox(root, system_tmp, real_home)
    box.before = box.fingerprint()
    for folder in (box.tmp, box.home, box.work):
        os.makedirs(folder, mode=0o700)
    # Times are shown in the local zone: the suite's is UTC, and a test that means another says so (TZ).
    os.environ.update(HOME=box.home, TMPDIR=box.tmp, TZ="UTC", **{_MARK: root})
    time.tzset()
    for key in ("METASYSTEM_DB", "METASYSTEM_HOME", "METASYSTEM_CONFIG", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        os.environ.pop(key, None)
    tempfile.tempdir = box.tmp
    os.chdir(box.work)
    # Started under nohup or as a background job in a script, the runner inherits SIGINT ignored, and
    # so would every child it starts: a test that interrupts one would wait in vain. A handler in the
    # runner is reset to the default by exec, so each child starts with SIGINT as a terminal gives it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    atexit.register(_leave, box, os.getpid())
    return box


def _leave(box, pid):
    if os.getpid() == pid:  # not in a forked child that happens to exit through atexit
        os.chdir("/")
        shutil.rmtree(box.root, ignore_errors=True)


def _file_digest(path):
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError as err:
        return f"unreadable: {err.strerror}"


def _kind(path):
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing"
    return "character device" if stat.S_ISCHR(mode) else f"not a device (mode {mode:o})"


def _tree_digest(folder):
    """Every entry below ``folder`` with its kind, size and content digest; None if it does not exist."""
    if not os.path.lexists(folder):
        return None
    entries = {}
    for parent, folders, files in os.walk(folder):
        for name in sorted(folders + files):
            path = os.path.join(parent, name)
            info = os.lstat(path)
            digest = _file_digest(path) if stat.S_ISREG(info.st_mode) else ""
            entries[os.path.relpath(path, folder)] = (stat.S_IFMT(info.st_mode), info.st_size, digest)
    return entries


def _checkout_state(repo):
    """``git status --porcelain --ignored`` of the checkout (caches aside), with each listed file's digest."""
    try:
        listed = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--ignored", "--untracked-files=all"],
            capture_output=True, timeout=60, check=True).stdout.decode("utf-8", "surrogateescape")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    state = {}
    for line in listed.splitlines():
        path = line[3:]
        if "__pycache__" in path.split("/") or path.endswith(".pyc"):
            continue
        full = os.path.join(repo, path)
        state[line] = _file_digest(full) if os.path.isfile(full) else "folder or gone"
    return state


def _temporary_entries(folder):
    """Names in the system's temporary folder that the suite's own temporary files would take."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(name for name in names if name.startswith(("mm-", "tmp")) and not name.startswith("mm-suite-"))
