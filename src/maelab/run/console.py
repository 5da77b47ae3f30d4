"""Console logging that coexists with a live progress bar."""

import logging
import sys


class LiveConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record arrives. Rich's progress bar swaps
    ``sys.stdout`` for a proxy that prints above the bar; a handler holding the original stream
    would write into the middle of the bar instead."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass
