"""The training config's types (ptune/schema.py) fit every shipped config and give no values of their own."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import MISSING, OmegaConf

import ptune.config  # noqa: F401  (registers the schema, as ptune.train does)
from ptune import schema
from reliability_harness import REPO

CONF = REPO / "conf"


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("experiment", [None] + sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_shipped_combination_composes(model, experiment):
    cfg = compose(f"model={model}", *([f"+experiment={experiment}"] if experiment else []))
    assert isinstance(cfg.trainer.max_steps, int) and isinstance(cfg.optim.lr, float)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every key has a value


def added(*overrides: str) -> list[str]:
    from hydra import compose as hydra_compose, initialize_config_dir

    from ptune.config import added_settings

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
        return added_settings(cfg, "train", list(overrides), {"model", "data", "experiment"}, ("experiment",))


@pytest.mark.parametrize("experiment", [None] + sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_shipped_configs_add_no_setting(experiment):
    assert added(*([f"+experiment={experiment}"] if experiment else []), "model=chatglm2_6b") == []


def test_settings_added_on_the_command_line_are_found():
    """Hydra lets `+key=value` and `++key=value` add keys it would refuse as unknown without the plus."""
    assert added("+experiment=adgen_60steps", "+trainer.max_step=5", "++optimizer.lr=1", "trainer.max_steps=3",
                 "++trainer.save_steps=2") == ["trainer.max_step", "optimizer"]


def test_values_come_from_the_yaml_alone():
    for cls in (schema.ModelSchema, schema.DataSchema, schema.PrefixSchema, schema.OptimSchema, schema.TrainerSchema,
                schema.TrainSchema):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert f.default == MISSING, f"{cls.__name__}.{f.name} has a default of its own: {f.default!r}"
    raw = OmegaConf.load(CONF / "train.yaml")
    cfg = compose()
    for section in ("prefix", "optim", "trainer"):
        assert OmegaConf.to_container(cfg[section]) == OmegaConf.to_container(raw[section]), section


def test_every_yaml_key_is_typed():
    """A key added to conf/train.yaml without a type in ptune/schema.py would fail every run: catch it here."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))
    typed = {f.name: f for f in dataclasses.fields(schema.TrainSchema)}
    for key, value in raw.items():
        if key in ("defaults", "hydra"):
            continue
        assert key in typed, key
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(typed[key].default_factory)}
            assert set(value) == names, (key, set(value) ^ names)
