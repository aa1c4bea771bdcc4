"""Config helpers shared by the entry points: resolvers used in conf/, and checks of required values."""

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
