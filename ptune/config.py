"""Config helpers shared by the entry points: resolvers used in conf/, and checks of the composed config."""

from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Registers the training config's types (conf/train.yaml lists them first in its defaults); every
# entry point that composes `train` imports this module before Hydra runs.
from ptune import errors
from ptune import schema as _schema  # noqa: F401
from ptune.errors import ConfigError

if TYPE_CHECKING:
    import torch


def asset_path(name: str) -> str:
    """Path of a file shipped inside the package (the built-in sample data)."""
    return str(resources.files("ptune.assets") / name)


def conf_path(name: str) -> str:
    """Path of one of ptune's config files (each command's --help points at its own, for the comments)."""
    return str(Path(__file__).resolve().parents[1] / "conf" / name)


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
        self.jobs.append((config.hydra.job.num, list(config.hydra.overrides.task), error))

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
    """A run refused inside this block (a setting, a missing model folder, a bad data file) leaves no dated folder
    behind: the job's folder is removed if it was made for this job (not the user's own) and holds nothing but the
    files of `written`, which this job made (its train.log with the error, say), removed with it."""
    try:
        yield
    except errors.user_errors():  # a bug keeps its folder and train.log, for the report
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


def require(cfg: DictConfig, *keys: str) -> None:
    """Fail before any heavy work when a value the run needs is unset."""
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value == "":
            raise ConfigError(f"{key} is not set; pass {key}=... on the command line")


def _override_key(override: str) -> str:
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

    appended = [_override_key(o) for o in overrides
                if o.startswith("+") and _override_key(o) in groups and _override_key(o) not in appendable]
    if appended:  # the cause of whatever keys they brought
        return appended
    picked = [o for o in overrides if _override_key(o) in groups]
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
    extra = added_settings(cfg, hc.job.config_name, list(hc.overrides.task), hc.runtime.choices, appendable)
    if extra:
        raise ConfigError(unknown_setting(extra, hc.job.config_name))


def unknown_setting(keys: list[str], config_name: str, suggestion: str | None = None) -> str:
    """The line for keys a command's config does not have, as Hydra finds them (ptune.command) or as ptune does."""
    hint = f"; did you mean {suggestion}?" if suggestion else "; a misspelling?"
    return (f"unknown setting {', '.join(keys)}: not a key of conf/{config_name}.yaml or the config groups it uses"
            + hint)


# Range and type checks of the composed config, which the entry points run before a model loads, so a
# typo costs seconds, not a load. Each error names the key, the value given and what was expected.

_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def resolve_device(value, key: str = "device") -> torch.device:
    """`auto` (the GPU when there is one), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    import torch  # here, not at the top: ptune.command composes a config with this module before torch loads

    name = str(value)
    form = _DEVICE.fullmatch(name)
    if not form:
        raise ConfigError(f"{key}={name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu":
        count = torch.cuda.device_count()
        if not count:
            raise ConfigError(f"{key}={name}: no CUDA device on this machine; use cpu or auto")
        if int(form.group(1) or 0) >= count:
            raise ConfigError(f"{key}={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_count(cfg: DictConfig, key: str, least: int = 1, nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if (value is None and nullable) or (_whole(value) and value >= least):
        return
    null = " or null" if nullable else ""
    raise ConfigError(f"{key}={value!r}: expected a whole number of at least {least}{null}")


def check_above_zero(cfg: DictConfig, key: str, what: str, nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if (value is None and nullable) or (_number(value) and value > 0):
        return
    null = ", or null" if nullable else ""
    raise ConfigError(f"{key}={value!r}: expected {what}, a number above 0{null}")


def check_in_range(cfg: DictConfig, key: str, expected: str, least: float = 0, below: float = math.inf) -> None:
    """A number from `least` up to (not) `below`; NaN, infinity and true/false are refused too."""
    value = OmegaConf.select(cfg, key)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and least <= value < below):
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def check_flag(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")


def check_batch_size(cfg: DictConfig, key: str = "batch_size") -> None:
    if OmegaConf.select(cfg, key) != "auto":
        check_count(cfg, key)


def check_token_ids(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not (isinstance(value, ListConfig) and all(_whole(t) and t >= 0 for t in value)):
        raise ConfigError(f"{key}={value!r}: expected a list of token ids (whole numbers >= 0), e.g. [2] or []")


def check_sampling(cfg: DictConfig, temperature_key: str, top_p_key: str, sampling: bool = True) -> None:
    """A temperature above 0 where sampling, top_p within [0, 1] (0 keeps only the likeliest token)."""
    t, p = OmegaConf.select(cfg, temperature_key), OmegaConf.select(cfg, top_p_key)
    if not _number(t) or (sampling and t <= 0):
        raise ConfigError(f"{temperature_key}={t!r}: expected a number" + (" above 0 when sampling; greedy decoding "
                                                                           "is do_sample=false" if sampling else ""))
    if not (_number(p) and 0 <= p <= 1):
        raise ConfigError(f"{top_p_key}={p!r}: expected a number from 0 to 1")


def check_generation(cfg: DictConfig, key: str = "generation") -> None:
    """The generation group (conf/generation/): how many tokens, greedy or sampled, extra stop tokens."""
    check_count(cfg, f"{key}.max_new_tokens")
    check_flag(cfg, f"{key}.do_sample")
    check_flag(cfg, f"{key}.compile_step")
    check_count(cfg, f"{key}.seed", least=0)
    check_sampling(cfg, f"{key}.temperature", f"{key}.top_p", sampling=OmegaConf.select(cfg, f"{key}.do_sample"))
    check_token_ids(cfg, f"{key}.extra_eos_token_ids")


def check_data_lengths(cfg: DictConfig, nullable: bool = False) -> None:
    """Length limits and which end of a long prompt is cut (evaluate's null keeps the checkpoint's)."""
    for key in ("data.max_source_length", "data.max_target_length"):
        check_count(cfg, key, nullable=nullable)
    side = cfg.data.truncate_source_from
    if not (side in ("left", "right") or (nullable and side is None)):
        raise ConfigError(f"data.truncate_source_from={side!r}: expected right (keep a long prompt's start) or left "
                          "(keep its end)")


def check_quantization(cfg: DictConfig, inference: bool = False) -> None:
    """model.quantization: null or a mode that ptune.quant has; the inference entry points also take false,
    which loads a float base for a checkpoint that trained on a quantized one."""
    from ptune.quant import DEFAULT_GROUP_SIZE, check_mode

    mode = cfg.model.get("quantization")
    if mode is None or (inference and mode is False):
        return
    check_mode(mode, cfg.model.get("quantization_group_size") or DEFAULT_GROUP_SIZE)


def check_inference_model(cfg: DictConfig) -> None:
    """The `model` overrides of evaluate, sweep, chat and serve (null: the checkpoint's). trust_remote_code and
    fused_layers are checked as flags: a typo such as `ture` is refused, not read as true -- least of all for running
    code shipped with the weights."""
    check_quantization(cfg, inference=True)
    check_flag(cfg, "model.trust_remote_code")
    if cfg.model.get("fused_layers") is not None:
        check_flag(cfg, "model.fused_layers")
    check_template(cfg, nullable=True)


def check_template(cfg: DictConfig, nullable: bool = False) -> None:
    """model.template names a prompt format ptune has (null, where allowed: the checkpoint's, or for a bare base
    the tokenizer's chat template)."""
    from ptune.data import TEMPLATES

    value = cfg.model.get("template")
    if not (value in TEMPLATES or (nullable and value is None)):
        raise ConfigError(f"model.template={value!r}: expected one of {', '.join(TEMPLATES)}"
                          + (" (or null)" if nullable else ""))
