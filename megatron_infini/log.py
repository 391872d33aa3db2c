"""This package's log: INFO lines (kernel and implementation choices) on stderr, said once."""

from __future__ import annotations

import logging
import sys


def enable_package_log(level: int = logging.INFO) -> logging.Logger:
    """Send the `megatron_infini` loggers' records at `level` and above to stderr (idempotent).
    Called by the command-line entry points; a library user configures logging as usual."""
    log = logging.getLogger("megatron_infini")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        log.addHandler(handler)
        log.setLevel(level)
    return log
