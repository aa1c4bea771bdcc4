"""Config plumbing shared by the entry points: resolvers used in conf/, Hydra callbacks and run folders, and the
refusal of settings a command does not have (the checks of values are ptune.settings')."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Registers the training config's types (conf/train.yaml lists them first in its defaults); every
# entry point that composes `train` imports this module before Hydra runs.
from ptune import errors
from ptune import schema as _schema  # noqa: F401
from ptune.errors import ConfigError


def asset_path(name: str) -> str:
    """Path of a file shipped inside the package (the built-in sample data)."""
    return str(resources.files("ptune.assets") / name)


def conf_dir() -> Path:
    """ptune's Hydra configs: ptune/conf in an installed package (pyproject.toml puts them there), else the
    repository's conf/ beside the package (a checkout, an editable install)."""
    package = Path(__file__).resolve().parent
    return package / "conf" if (package / "conf").is_dir() else package.parent / "conf"


def conf_path(name: str) -> str:
    """Path of one of ptune's config files (each command's --help points at its own, for the comments)."""
    return str(conf_dir() / name)


def conf_groups(groups) -> str:
    """--help's list of the config groups a command takes, each with its options (conf/hydra/help/ptune.yaml)."""
    if not groups:
        return ""
    lines = [f"{g}: {', '.join(sorted(p.stem for p in Path(conf_path(g)).glob('*.yaml')))}" for g in groups]
    return "== Configuration groups ==\nChoose an option of a group (group=option)\n\n" + "\n".join(lines) + "\n\n"


if not OmegaConf.has_resolver("ptune_asset"):
    OmegaConf.register_new_resolver("ptune_asset", asset_path)
if not OmegaConf.has_resolver("ptune_conf"):
    OmegaConf.register_new_resolver("ptune_conf", conf_path)
if not OmegaConf.has_resolver("ptune_home"):  # output_dir="~/runs/x" is a folder in the home, not ./~/runs/x
    OmegaConf.register_new_resolver("ptune_home", lambda path: os.path.expanduser(str(path)))  # "" stays ""
if not OmegaConf.has_resolver("ptune_groups"):
    OmegaConf.register_new_resolver("ptune_groups", conf_groups)


class MakeRunFolder(Callback):
    """Creates the run's folder before Hydra does (conf/train.yaml lists it under hydra.callbacks).

    Hydra makes the folder before any ptune code runs, and a path it cannot make (under a file, without
    permission) ended in Hydra's traceback; made here first, it is the usual one line naming the setting.
    `setting` is what the user sets to choose the folder of a single run (hydra.run.dir interpolates it).
    """

    def __init__(self, setting: str = "hydra.run.dir"):
        self.setting = setting

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _make_folder(_folder_setting(config, "run", self.setting), self.setting)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _make_folder(_folder_setting(config, "sweep", "hydra.sweep.dir"), "hydra.sweep.dir")


def _folder_setting(config: DictConfig, mode: str, setting: str) -> str:
    try:
        return config.hydra[mode].dir
    except OmegaConfBaseException as e:  # output_dir=${typo}: Hydra would warn, then fail formatting its own error
        print(f"error: {setting}: {errors.first_line(e.msg)}", file=sys.stderr)
        sys.exit(1)


class MultirunFailures(Callback):
    """Runs every job of a multirun even when some fail with a user error, then ends with status 1 and a list of
    the failed jobs (conf/train.yaml lists it under hydra.callbacks).

    An entry point ends a failed run with SystemExit, which would stop the whole multirun at the first failed job
    (a diverging learning rate, say); Hydra's own way, an exception, goes on but ends with that exception's
    traceback. In a multirun the entry points hand the error to ptune.errors.multirun_failures instead.
    """

    def __init__(self):
        self.jobs: list[tuple[int, list[str], str | None]] = []  # number, overrides, error
        self.seen = 0

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        errors.multirun_failures = []

    # Hydra calls on_job_start and on_job_end for a single run too, where there is no job number: only a
    # multirun (errors.multirun_failures set) is counted.
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        self.seen = len(errors.multirun_failures or [])

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        failures = errors.multirun_failures
        if failures is None:
            return
        error = failures[-1] if len(failures) > self.seen else None
        self.jobs.append((config.hydra.job.num, OmegaConf.to_container(config.hydra.overrides.task, resolve=False),
                          error))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        errors.multirun_failures = None
        failed = [(num, overrides, error) for num, overrides, error in self.jobs if error is not None]
        if not failed:
            return
        if len(failed) == len(self.jobs):
            remove_unused_run_folders()
        # Each job named by the settings that tell it from the others, not the ones they all share.
        shared = set.intersection(*(set(overrides) for _, overrides, _ in self.jobs))
        lines = [f"#{num} ({' '.join(o for o in overrides if o not in shared) or 'no overrides'}): {error}"
                 for num, overrides, error in failed]
        print(f"error: {len(failed)} of {len(self.jobs)} multirun jobs failed:\n  " + "\n  ".join(lines),
              file=sys.stderr)
        sys.exit(1)


# Made by MakeRunFolder in this process, with the parents it made for them: a refused run removes them again.
_made_run_folders: list[Path] = []


def made_for_this_run(path: Path) -> bool:
    """Whether `path` is, or is inside, a folder made for this process's run (which can hold nothing earlier)."""
    path = path.resolve()
    return any(p in _made_run_folders for p in (path, *path.parents))


def not_made_for_this_run(path: Path) -> None:
    """`path` and the folders above it belong to another process after all (which made them a moment earlier): a
    refusal of this run must not remove them."""
    path = path.resolve()
    _made_run_folders[:] = [p for p in _made_run_folders if p != path and p not in path.parents]


def remove_unused_run_folders() -> None:
    """Remove the folders made for this process's run, deepest first, that hold nothing (a sweep's folder: nothing
    but Hydra's multirun.yaml, all its jobs refused)."""
    for folder in sorted(set(_made_run_folders), key=lambda p: len(p.parts), reverse=True):
        with suppress(OSError):  # not empty, or another rank removed it first
            if [p.name for p in folder.iterdir()] == ["multirun.yaml"]:
                (folder / "multirun.yaml").unlink()
            folder.rmdir()


def _make_folder(path: str, setting: str) -> None:
    if not str(path).strip():  # e.g. output_dir=$UNSET: Hydra would take the current folder as the run's
        print(f"error: {setting} is empty; pass the folder to write the run to, e.g. {setting}=outputs/my_run",
              file=sys.stderr)
        sys.exit(1)
    if str(path).startswith("~"):  # a hydra.sweep.dir given on the command line: Hydra would make ./~/...
        print(f"error: {setting}={path}: ~ is not expanded here, the folder would be ./{path}; give the full path, "
              f"{setting}={os.path.expanduser(str(path))}", file=sys.stderr)
        sys.exit(1)
    folder = Path(path).resolve()
    new = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # A Hydra callback: an exception here would only become Hydra's warning, and the traceback follow.
        print(f"error: {setting}={path}: cannot create this folder ({e.strerror or e})", file=sys.stderr)
        sys.exit(1)
    _made_run_folders.extend(new)


@contextmanager
def no_run_folder_if_refused(written: tuple[Path, ...] = ()):
    """A run refused inside this block (a setting, a missing model folder, a bad data file), or stopped there by
    Ctrl-C or SIGTERM before its first step, leaves no dated folder behind: the job's folder is removed if it was made for this job (not the user's own) and holds nothing but the
    files of `written`, which this job made (its train.log with the error, say), removed with it."""
    try:
        yield
    except (*errors.USER_ERRORS, KeyboardInterrupt):  # a bug keeps its folder and train.log, for the report
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            folder = Path(hc.runtime.output_dir).resolve()
            if hc.mode == RunMode.MULTIRUN or folder in _made_run_folders:  # a multirun job's folder is Hydra's own
                with suppress(OSError):  # not empty, or another rank removed it first
                    if set(folder.iterdir()) <= {p.resolve() for p in written}:
                        for p in written:
                            p.unlink(missing_ok=True)
                    folder.rmdir()
            if hc.mode == RunMode.RUN:  # a multirun's own folders wait for its end (MultirunFailures)
                remove_unused_run_folders()
        raise


def override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def added_settings(cfg: DictConfig, config_name: str, overrides: list[str], groups,
                   appendable: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys of `cfg` that conf/ does not define for this entry point and these config groups.

    Hydra refuses `trainer.max_step=5` as not in the config, but its "add a key" form `+trainer.max_step=5`
    (which that very error message suggests) goes through, and the run would silently keep the real
    setting. The config composed again from the same group choices alone says which keys exist. A group the
    entry point's defaults do not name, appended the same way (serve's `+generation=greedy`), is itself what
    was added, whether or not its keys are new; `appendable` names the groups meant to be appended (train's
    `+experiment`).
    """
    from hydra import compose

    appended = [override_key(o) for o in overrides
                if o.startswith("+") and override_key(o) in groups and override_key(o) not in appendable]
    if appended:  # the cause of whatever keys they brought
        return appended
    picked = [o for o in overrides if override_key(o) in groups]
    known = OmegaConf.to_container(compose(config_name, overrides=picked), resolve=False)

    def walk(have, known, at):
        for key, value in have.items():
            if key not in known:
                yield at + str(key)
            elif isinstance(value, dict) and isinstance(known[key], dict):
                yield from walk(value, known[key], f"{at}{key}.")

    return list(walk(OmegaConf.to_container(cfg, resolve=False), known, ""))


def refuse_added_settings(cfg: DictConfig, appendable: tuple[str, ...] = ()) -> None:
    """Stop an entry point whose command line added a setting it does not have (a misspelling, usually), or a
    config group it does not take (see added_settings)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    # unresolved: an override's own ${...} is resolved where its setting is read, which names the setting
    overrides = OmegaConf.to_container(hc.overrides.task, resolve=False)
    extra = added_settings(cfg, hc.job.config_name, overrides, hc.runtime.choices, appendable)
    if extra:
        raise ConfigError(unknown_setting(extra, hc.job.config_name))


def unknown_setting(keys: list[str], config_name: str, suggestion: str | None = None) -> str:
    """The line for keys a command's config does not have, as Hydra finds them (ptune.command) or as ptune does."""
    hint = f"; did you mean {suggestion}?" if suggestion else "; a misspelling?"
    return (f"unknown setting {', '.join(keys)}: not a key of conf/{config_name}.yaml or the config groups it uses"
            + hint)


