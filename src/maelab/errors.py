"""Errors a user can cause and fix: the CLI prints their message alone, no traceback."""


class UserError(Exception):
    """Bad input: a config value, a missing dataset, an unreadable file."""


class ConfigError(UserError):
    pass
