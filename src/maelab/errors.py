"""Errors a user can cause and fix: the CLI prints their message alone, no traceback, and exits 2."""

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input: a config value, a missing dataset, an unreadable file."""


class ConfigError(UserError):
    pass


def report(message: object) -> int:
    """A user's mistake as every command shows it: ``error: MESSAGE`` on stderr; returns the exit status, 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def fail(message: object) -> NoReturn:
    """End the process on a user's mistake (where no caller is left to return a status to)."""
    raise SystemExit(report(message))
