"""Config helpers shared by the entry points: resolvers used in conf/, and checks of the composed config."""

from __future__ import annotations

from importlib import resources

from omegaconf import DictConfig, OmegaConf

# Registers the training config's types (conf/train.yaml lists them first in its defaults); every
# entry point that composes `train` imports this module before Hydra runs.
from ptune import schema as _schema  # noqa: F401


def asset_path(name: str) -> str:
    """Path of a file shipped inside the package (the built-in sample data)."""
    return str(resources.files("ptune.assets") / name)


if not OmegaConf.has_resolver("ptune_asset"):
    OmegaConf.register_new_resolver("ptune_asset", asset_path)


def require(cfg: DictConfig, *keys: str) -> None:
    """Fail before any heavy work when a value the run needs is unset."""
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or value == "":
            raise SystemExit(f"config error: {key} is not set; pass {key}=... on the command line")


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def added_settings(cfg: DictConfig, config_name: str, overrides: list[str], groups) -> list[str]:
    """Dotted keys of `cfg` that conf/ does not define for this entry point and these config groups.

    Hydra refuses `trainer.max_step=5` as not in the config, but its "add a key" form `+trainer.max_step=5`
    (which that very error message suggests) goes through, and the run would silently keep the real
    setting. The config composed again from the same group choices alone says which keys exist.
    """
    from hydra import compose

    picked = [o for o in overrides if _override_key(o) in groups]
    known = OmegaConf.to_container(compose(config_name, overrides=picked), resolve=False)

    def walk(have, known, at):
        for key, value in have.items():
            if key not in known:
                yield at + str(key)
            elif isinstance(value, dict) and isinstance(known[key], dict):
                yield from walk(value, known[key], f"{at}{key}.")

    return list(walk(OmegaConf.to_container(cfg, resolve=False), known, ""))


def refuse_added_settings(cfg: DictConfig) -> None:
    """Stop an entry point whose command line added a setting it does not have (a misspelling, usually)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    extra = added_settings(cfg, hc.job.config_name, list(hc.overrides.task), hc.runtime.choices)
    if extra:
        raise SystemExit(f"config error: unknown setting {', '.join(extra)}: not a key of "
                         f"conf/{hc.job.config_name}.yaml or the config groups it uses; a misspelling?")
