"""User-facing failures: entry points print these as one line and exit 1, without a traceback. Ctrl-C and
SIGTERM end them with one line too, and the status a shell gives a command a signal stopped (128 + signal)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NoReturn

from omegaconf.errors import InterpolationResolutionError


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite values, a checkpoint that cannot be resumed, a bad setting)."""


class ConfigError(ValueError):
    """A setting of an entry point's config that its type or range rules out, named with the value given."""


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or does not fit what it is loaded into."""


class DataError(ValueError):
    """A data file that cannot be used, with the place and the reason."""


class ModelError(ValueError):
    """A model folder that cannot be loaded, or a prefix that does not fit it."""


class QuantizationError(ValueError):
    """A mode, group size, model or cache that cannot be quantized or loaded."""


class SweepError(ValueError):
    """A sweep that cannot start or scored nothing: no runs, no eval file, a run folder without checkpoints."""


def first_line(error: BaseException | str) -> str:
    """An error's (or a message's) first line: the CUDA allocator's out-of-memory message goes on for a paragraph,
    and OmegaConf's ends in lines of its key and types."""
    return str(error).strip().split("\n", 1)[0]


# The errors above are all defined here, not in the modules that raise them: catching them then imports none of
# those modules (ptune.command refuses a setting before torch loads), and under `python -m ptune.train` that module
# runs as __main__, where a class of its own would not be the one caught. An interpolation that fails where the
# command first reads its setting (model.path=${oc.env:UNSET}) is the user's too.
USER_ERRORS = (CheckpointError, ConfigError, DataError, ModelError, QuantizationError, SweepError, TrainingError,
               InterpolationResolutionError)


def user_message(error: BaseException) -> str:
    """A user error's line: OmegaConf's own ends in lines of its key and types; the key goes in front instead."""
    full_key = getattr(error, "full_key", None)
    if full_key and getattr(error, "msg", None):
        return f"{full_key}: {first_line(error.msg)}"
    return str(error)


# The signal that raised the KeyboardInterrupt being handled: SIGINT unless SIGTERM's handler below ran.
_received = {"signal": signal.SIGINT}


def _terminate(signum, _frame) -> None:
    # SIGTERM (a scheduler, `kill`, a preempted machine) takes Ctrl-C's path, so each entry point's clean-up
    # for an interrupt runs for it too instead of the process vanishing mid-write.
    _received["signal"] = signum
    raise KeyboardInterrupt


def terminating() -> bool:
    """Whether the KeyboardInterrupt being handled came from SIGTERM: a request to end, never to go on."""
    return _received["signal"] == signal.SIGTERM


def stopped(message: str, signum: int | None = None) -> NoReturn:
    """End after a signal: one line, and exit status 128 + the signal, so `set -e` scripts stop there."""
    print(message, file=sys.stderr)
    sys.exit(128 + int(signum if signum is not None else _received["signal"]))


def end_quietly_if_interrupted_while_starting() -> None:
    """Ctrl-C while the command's module runs its top-level imports ends with "<command> interrupted" and
    status 130; anywhere else it raises KeyboardInterrupt as usual, for the command's own handling."""
    command = sys.orig_argv[sys.orig_argv.index("-m") + 1] if "-m" in sys.orig_argv[:-1] else "ptune"

    def handler(signum, frame):
        # Find the running module's own top-level frame; the frame it called into tells what it is doing.
        called = None
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
                if called is None or called.f_code.co_filename.startswith("<frozen importlib"):
                    stopped(f"{command.rsplit('.', 1)[-1]} interrupted", signum)
                break
            called, frame = frame, frame.f_back
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C was set to be ignored
        signal.signal(signal.SIGINT, handler)


def tell_launcher(message: str, callstack: str | None = None) -> None:
    """Under torchrun, hand it the error line (and a bug's traceback): the failure summary it prints last then
    shows them for this rank, instead of "To enable traceback see: <url>" (the file and its format are torchrun's)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"timestamp": str(int(time.time()))}
    if callstack is not None:
        extra["py_callstack"] = callstack  # the summary shows this in place of the message
    record = {"message": {"message": message, "extraInfo": extra}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False)
    except OSError:
        pass  # the line is on stderr already; the summary keeps torchrun's own text


# While a Hydra multirun runs (ptune.config.MultirunFailures), the user errors of its jobs, collected instead of
# ending the process: one job's bad learning rate must not cancel the jobs after it.
multirun_failures: list[str] | None = None


def exit_on_user_error(fn):
    """Wrap an entry point so a known user error ends the run with its message alone, and an interrupt with
    one line naming the command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        name = fn.__module__.rpartition(".")[2]
        if name == "__main__":
            name = Path(sys.modules["__main__"].__file__ or name).stem
        previous = None
        main_thread = threading.current_thread() is threading.main_thread()
        # Put back after the command, whatever handler it set: the next job of a multirun starts with Ctrl-C's own.
        previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
        if main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _terminate)
        _received["signal"] = signal.SIGINT
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            stopped(f"{name} interrupted{' (SIGTERM)' if terminating() else ''}")
        except USER_ERRORS as e:
            message = user_message(e)
            # The run's log file records the error too; the console shows it once, as the "error:" line.
            record = logging.getLogger("ptune").makeRecord("ptune", logging.ERROR, fn.__module__, 0, "%s", (message,),
                                                           None)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
            print(f"error: {message}", file=sys.stderr)
            tell_launcher(f"error: {message}")
            if multirun_failures is not None:
                multirun_failures.append(message)
                return None
            sys.exit(1)
        except Exception as e:
            # A bug, not a mistake of the user's: Python prints the traceback here; torchrun's summary gets it too.
            tell_launcher(f"{type(e).__name__}: {e}", traceback.format_exc())
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if previous_int is not None:
                signal.signal(signal.SIGINT, previous_int)

    return wrapper
