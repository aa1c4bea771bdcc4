"""User-facing failures: entry points print these as one line and exit 1, without a traceback."""

from __future__ import annotations

import functools
import logging
import sys


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite values, a checkpoint that cannot be resumed, a bad setting)."""


class ConfigError(ValueError):
    """A setting of an entry point's config that its type or range rules out, named with the value given."""


def user_errors() -> tuple[type[BaseException], ...]:
    # Defined here rather than in ptune.train: under `python -m ptune.train` that module runs as
    # __main__, and an exception class defined there would not be the one caught here.
    from ptune.checkpoint import CheckpointError
    from ptune.data import DataError
    from ptune.models import ModelError
    from ptune.quant import QuantizationError

    return CheckpointError, ConfigError, DataError, ModelError, QuantizationError, TrainingError


def exit_on_user_error(fn):
    """Wrap an entry point so a known user error ends the run with its message alone."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            # The run's log file records the error too; the console shows it once, as the "error:" line.
            record = logging.getLogger("ptune").makeRecord("ptune", logging.ERROR, fn.__module__, 0, "%s", (e,), None)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper
