"""User-facing failures: entry points print these as one line and exit 1, without a traceback."""

from __future__ import annotations

import functools
import logging
import sys


def user_errors() -> tuple[type[BaseException], ...]:
    from ptune.checkpoint import CheckpointError
    from ptune.data import DataError
    from ptune.models import ModelError

    found = [CheckpointError, DataError, ModelError]
    try:
        from ptune.train import TrainingError

        found.append(TrainingError)
    except ImportError:  # the trainer's dependencies are absent (e.g. an inference-only install)
        pass
    return tuple(found)


def exit_on_user_error(fn):
    """Wrap an entry point so a known user error ends the run with its message alone."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            logging.getLogger("ptune").error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper
