"""How `python -m ptune.<command>` starts: Hydra composes the command's config first, from this light module, and
only then is the command's module imported and its main(cfg) run.

The commands' modules import torch and transformers, which take seconds. Composed before them, --help and a setting
Hydra refuses (a misspelt key, a value of the wrong type, an option a config group does not have, an override it
cannot parse) are answered at once, and in one line naming the setting, where Hydra prints a block of its own.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import traceback
from contextlib import contextmanager
from types import TracebackType
from typing import NoReturn

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from ptune import settings
# ptune.config registers the resolvers and the training config's types that composing needs.
from ptune.config import (conf_dir, no_run_folder_if_refused, refuse_added_settings, remove_unused_run_folders,
                          unknown_setting)
from ptune.errors import exit_on_user_error, first_line, stopped, tell_launcher, user_message



def run_command(command: str) -> NoReturn:
    """Compose conf/<command>.yaml with the command line, then run ptune.<command>.main(cfg) (once per job of a
    multirun); exit with its status."""
    asked_full = os.environ.get("HYDRA_FULL_ERROR")

    def job(cfg: DictConfig):
        with environment("HYDRA_FULL_ERROR", asked_full):  # what the command itself starts sees the user's own
            if not settings_accepted(command, cfg):
                return None  # refused, in one line (a multirun goes on with its next job)
            try:
                module = importlib.import_module(f"ptune.{command}")
            except KeyboardInterrupt:
                stopped(f"{command} interrupted")
            return module.main(cfg)

    job.__module__ = f"ptune.{command}"  # Hydra names the job (hydra.job.name) after this module
    main = hydra.main(config_path=str(conf_dir()), config_name=command, version_base="1.3")(job)
    # Hydra then raises its errors instead of printing them: they are told below, in one line.
    with environment("HYDRA_FULL_ERROR", "1"):
        try:
            main()
        except KeyboardInterrupt:  # while Hydra composed (the command's main handles its own)
            stopped(f"{command} interrupted")
        except Exception as e:
            raised_in_job = _from_frame(e.__traceback__, job.__code__)
            if asked_full == "1":
                raise
            if raised_in_job is not None:  # a bug (main ends a user's mistake itself): its traceback from the job on
                traceback.print_exception(type(e), e, raised_in_job)
                sys.exit(1)
            if not isinstance(e, (HydraException, OmegaConfBaseException)):
                raise
            line = f"error: {setting_error(e, command)}"
            print(line, file=sys.stderr)
            tell_launcher(line)
            remove_unused_run_folders()  # a multirun's folder, made before a job's settings were composed
            sys.exit(1)
    sys.exit(0)


# Config groups a command's command line may add with `+group=option` (train's experiments): not an unknown setting.
APPENDABLE_GROUPS = {"train": ("experiment",)}


def settings_accepted(command: str, cfg: DictConfig) -> bool:
    """Refuse settings the command does not have, and values ptune.settings rules out, before the command's module
    (and torch) is imported. False where refused: the error's line is printed, and the run's fresh folder removed."""

    def check(cfg: DictConfig) -> bool:
        with no_run_folder_if_refused():
            refuse_added_settings(cfg, appendable=APPENDABLE_GROUPS.get(command, ()))
            settings.COMMANDS[command](cfg)
        return True

    check.__module__ = f"ptune.{command}"  # exit_on_user_error names the command after it
    return exit_on_user_error(check)(cfg) is True


def _from_frame(tb: TracebackType | None, code) -> TracebackType | None:
    """The part of a traceback from the first frame running `code` on, or None where no frame does."""
    while tb is not None and tb.tb_frame.f_code is not code:
        tb = tb.tb_next
    return tb


@contextmanager
def environment(name: str, value: str | None):
    before = os.environ.get(name)
    _set(name, value)
    try:
        yield
    finally:
        _set(name, before)


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


_EXPECTED = [("converted to Integer", "a whole number"), ("converted to Float", "a number"),
             ("not a valid bool", "true or false")]


def setting_error(e: BaseException, command: str) -> str:
    """One line for an error of composing the config, naming the setting at fault and what it takes (and the
    config file it is in, where a file of conf/ or of --config-dir set it)."""
    found = _omegaconf_error(e)
    where = re.match(r"In '([^']+)'", str(e))
    line = _setting_line(e, found, command)
    return f"in {where.group(1)}.yaml: {line}" if where and found is not None else line


def _omegaconf_error(e: BaseException) -> OmegaConfBaseException | None:
    # Hydra raises its own exception `from` OmegaConf's, or (an error in a config file) during its handling.
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OmegaConfBaseException):
            return x
    return None


def _setting_line(e: BaseException, cause: OmegaConfBaseException | None, command: str) -> str:
    if isinstance(e, OverrideParseException):
        return (f"{e.override}: not an override Hydra can read ({first_line(e.message)}); quote a value holding "
                "spaces, brackets, commas or non-ASCII letters, or starting with ~, e.g. 'key=\"a, b\"'")
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option of {group}; the options are {', '.join(sorted(e.options)) or '(none)'}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return unknown_setting([cause.full_key], command, _close_key(cause))
    if isinstance(cause, ValidationError) and cause.full_key:
        expected = next((what for marker, what in _EXPECTED if marker in str(cause.msg)), None)
        if expected is not None:
            if _optional(cause):
                expected += " or null"
            return f"{cause.full_key}={cause.value!r}: expected {expected}"
    if cause is not None and cause.full_key:  # an interpolation, say
        return user_message(cause)
    # Hydra's own words, on one line, without OmegaConf's key/type trailer.
    return " ".join(line.strip() for x in (e, cause) if x is not None for line in str(x).strip().splitlines()
                    if line.strip() and not line.strip().startswith(("full_key:", "reference_type=", "object_type=")))


def _optional(error: OmegaConfBaseException) -> bool:
    parent = error.parent_node
    if isinstance(parent, DictConfig) and error.key is not None:
        node = parent._get_node(error.key)
        return node is not None and node._is_optional()
    return False


def _close_key(error: ConfigKeyError | ConfigAttributeError) -> str | None:
    """The parent's key nearest a misspelt one (trainer.max_step -> trainer.max_steps), with the same path."""
    parent, key = error.parent_node, error.key
    if not isinstance(parent, DictConfig) or key is None:
        return None
    near = difflib.get_close_matches(str(key), [str(k) for k in parent.keys()], n=1, cutoff=0.75)
    if not near:
        return None
    return re.sub(r"[^.]+$", near[0], error.full_key) if "." in error.full_key else near[0]

