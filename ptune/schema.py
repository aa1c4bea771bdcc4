"""Types of the training config, so a wrong value fails when the config is composed, naming the key.

conf/train.yaml (and the model/data groups and experiments it pulls in) stays the one place that holds
values and explains them; these dataclasses only say what type each key has. They are registered in
Hydra's ConfigStore as `ptune_train_schema`, which conf/train.yaml lists first in its defaults, so
`trainer.max_steps=abc` and a misspelt key are refused while the config is composed, before anything runs
(ptune.command words it: `trainer.max_steps='abc': expected a whole number`).

Every field is MISSING here: a key that conf/ forgets to set is an error on first use, not a silent
default hidden in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA_NAME = "ptune_train_schema"


@dataclass
class ModelSchema:
    path: Optional[str] = MISSING
    dtype: str = MISSING
    attn_implementation: str = MISSING
    template: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    fused_layers: bool = MISSING
    quantization: Optional[str] = MISSING
    quantization_group_size: int = MISSING
    quantization_cache: Optional[str] = MISSING


@dataclass
class DataSchema:
    train_file: Optional[str] = MISSING
    eval_file: Optional[str] = MISSING
    prompt_column: str = MISSING
    response_column: str = MISSING
    history_column: Optional[str] = MISSING
    max_source_length: int = MISSING
    max_target_length: int = MISSING
    truncate_source_from: str = MISSING


@dataclass
class PrefixSchema:
    length: int = MISSING
    projection: bool = MISSING
    projection_hidden_size: Optional[int] = MISSING
    dropout: float = MISSING


@dataclass
class OptimSchema:
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    eps: float = MISSING
    warmup_steps: int = MISSING
    schedule: str = MISSING
    max_grad_norm: Optional[float] = MISSING


@dataclass
class TrainerSchema:
    max_steps: int = MISSING
    save_steps: int = MISSING
    log_steps: int = MISSING
    per_device_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    auto_micro_batch_gib: Optional[float] = MISSING
    gradient_checkpointing: Any = MISSING  # true, false, a number of layers, or auto
    compile: bool = MISSING
    cuda_graphs: bool = MISSING
    cuda_graph_shapes: int = MISSING
    sort_by_length: bool = MISSING
    group_by_length: int = MISSING
    pad_to_multiple_of: int = MISSING
    loss_chunk_size: int = MISSING
    keep_last: Optional[int] = MISSING
    tensorboard: bool = MISSING
    progress_bar: bool = MISSING


@dataclass
class TrainSchema:
    experiment_name: str = MISSING
    seed: int = MISSING
    output_dir: str = MISSING
    resume: Any = MISSING  # null, false, latest, or a checkpoint folder
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    prefix: PrefixSchema = field(default_factory=PrefixSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainSchema)


register()
