"""Errors a user can cause and fix: the CLI prints their message alone, no traceback, and exits 2."""

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input: a config value, a missing dataset, an unreadable file."""


class ConfigError(UserError):
    pass


def fail(message: str) -> NoReturn:
    """End a command on a user's mistake: ``error: MESSAGE`` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
