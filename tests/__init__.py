"""The test suite. Importing it enters the sandbox (tests/sandbox.py) before any test module loads."""

from . import sandbox

sandbox.current()
