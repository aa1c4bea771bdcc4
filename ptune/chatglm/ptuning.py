"""P-tuning checkpoints in the format of ChatGLM2-6B's own ptuning scripts, read and written.

Those scripts save a folder holding ``config.json`` (the model's ChatGLM config with ``pre_seq_len``
and ``prefix_projection`` set) and ``pytorch_model.bin`` or ``model.safetensors`` with only the prefix
encoder's tensors, named ``transformer.prefix_encoder.embedding.weight`` (plus ``trans.0.*`` and
``trans.2.*`` with projection). ptune's :class:`~ptune.prefix.PrefixEncoder` uses the same names
without the ``transformer.prefix_encoder.`` part and the same key/value layout, so such a folder
loads as a ptune prefix as it is: :func:`ptune.models.load_for_inference` and
:func:`ptune.models.attach_checkpoint` detect it (:func:`is_reference_checkpoint`). The folder does
not record the base model's location, so ``model.path`` must be given.

Command line::

    python -m ptune.chatglm.ptuning import <old checkpoint dir> <run dir> [--base /path/to/chatglm2-6b]
    python -m ptune.chatglm.ptuning export <ptune checkpoint> <out dir>

``import`` writes ``<run dir>/checkpoint-N`` (N from the old folder's name, else 0) with a manifest, and
refuses a ``checkpoint-N`` that exists; ``export`` writes ``config.json``, ``pytorch_model.bin`` (the one file
ChatGLM2-6B's main.py, web demo and README load a prefix from) and ``model.safetensors`` (what ptune reads)
in the reference format, for a prefix trained on a ChatGLM-shaped base only. ``.bin`` files are read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from contextlib import suppress
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ptune import checkpoint as ckpt_io
from ptune.chatglm import integrity
from ptune.chatglm.convert import ChatGLMConversionError, config_number
from ptune.errors import first_line
from ptune.files import read_json_object, replacing, save_tensors
from ptune.prefix import PrefixSpec

REF_PREFIX = "transformer.prefix_encoder."
CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
FORMAT = "chatglm-ptuning"
# What ChatGLM2-6B's ptuning/train.sh uses for AdvertiseGen.
DEFAULT_DATA = {"prompt_column": "content", "response_column": "summary", "history_column": None,
                "max_source_length": 64, "max_target_length": 128, "truncate_source_from": "right"}
DEFAULT_MODEL = {"path": None, "dtype": "auto", "attn_implementation": "sdpa", "template": "chatglm2",
                 "trust_remote_code": False}
_CHATGLM_TYPES = ("glm", "chatglm")
# Not ptune.checkpoint's whole-name pattern, which picks a run's own folders: this only reads a step hint
# from a folder made elsewhere, so a renamed one (adgen-checkpoint-3000) still gives its step.
_STEP = re.compile(r"checkpoint-(\d+)$")


class PtuningFormatError(ckpt_io.CheckpointError):
    """A reference-format P-tuning folder that cannot be read, or a prefix that cannot be written as one."""


def is_reference_checkpoint(path) -> bool:
    """A folder with a ChatGLM ``config.json`` whose ``pre_seq_len`` is set, and no ptune prefix_config.json."""
    path = Path(path)
    if not (path / CONFIG).is_file() or (path / ckpt_io.CONFIG_FILE).is_file():
        return False
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("pre_seq_len") is not None


def spec_from_config(cfg: dict, where: str) -> PrefixSpec:
    """The PrefixSpec of a ChatGLM2/3 prefix encoder, as the original code sizes it."""
    if "kv_channels" not in cfg or "multi_query_group_num" not in cfg:
        raise PtuningFormatError(
            f"{where}: no kv_channels / multi_query_group_num; only ChatGLM2-6B / ChatGLM3-6B P-tuning checkpoints "
            "are supported (a first-generation ChatGLM-6B prefix has another layout)")
    missing = [k for k in ("num_layers", "hidden_size", "pre_seq_len") if k not in cfg]
    if missing:
        raise PtuningFormatError(f"{where}: missing {', '.join(missing)}")
    projection = cfg.get("prefix_projection")
    if projection not in (None, True, False):  # bool("false") would be true
        raise PtuningFormatError(f"{where}: prefix_projection is {json.dumps(projection)}; expected true or false")
    try:
        sizes = {k: config_number(cfg, k) for k in
                 ("num_layers", "multi_query_group_num", "kv_channels", "pre_seq_len", "hidden_size")}
    except ChatGLMConversionError as e:
        raise PtuningFormatError(f"{where}: {e}") from None
    # The original encoder uses multi_query_group_num key/value heads whatever multi_query_attention says.
    return PrefixSpec(num_layers=sizes["num_layers"], num_kv_heads=sizes["multi_query_group_num"],
                      head_dim=sizes["kv_channels"], length=sizes["pre_seq_len"], projection=bool(projection),
                      projection_hidden_size=sizes["hidden_size"] if projection else None)


def expected_shapes(spec: PrefixSpec) -> dict[str, tuple[int, ...]]:
    shapes = {"embedding.weight": (spec.length, spec.kv_size)}
    if spec.projection:
        h = spec.projection_hidden_size
        shapes.update({"trans.0.weight": (h, spec.kv_size), "trans.0.bias": (h,),
                       "trans.2.weight": (spec.kv_size, h), "trans.2.bias": (spec.kv_size,)})
    return shapes


def _step(path: Path) -> int | None:
    m = _STEP.search(path.resolve().name)
    if m:
        return int(m.group(1))
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def reference_prefix_config(path) -> dict:
    """The ptune prefix_config of a reference-format folder: its spec, the chatglm2 template, 64/128 lengths.

    ``base.path`` is None: the old format does not say where the base model is.
    """
    path = Path(path)
    cfg = read_json_object(path / CONFIG, PtuningFormatError)
    spec = spec_from_config(cfg, str(path / CONFIG))
    return {
        "prefix": spec.to_dict(), "dropout": 0.0,
        "base": {"path": None, "model_type": "glm", "vocab_size": cfg.get("padded_vocab_size"),
                 "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                 "hidden_size": cfg["hidden_size"]},
        "model": dict(DEFAULT_MODEL), "data": dict(DEFAULT_DATA),
        "step": _step(path), "format": FORMAT, "source": str(path),
    }


def _weight_files(path: Path) -> list[Path]:
    for name in INDEX_FILES:
        index = path / name
        if index.is_file():
            try:
                weight_map = integrity.read_weight_map(index)
            except integrity.IntegrityError as e:
                raise PtuningFormatError(str(e)) from None
            shards = sorted({f for k, f in weight_map.items() if k.startswith(REF_PREFIX)})
            if not shards:
                raise PtuningFormatError(f"{index}: lists no {REF_PREFIX}* tensors")
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise PtuningFormatError(f"{path}: shard(s) listed in {name} are missing: {', '.join(missing)}")
            return [path / s for s in shards]
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise PtuningFormatError(f"{path}: no {' or '.join(WEIGHT_FILES)}; expected the prefix encoder's weights there")


def _read_prefix_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(REF_PREFIX)}
        except (SafetensorError, OSError) as e:
            raise PtuningFormatError(f"{file}: unreadable safetensors file ({e})") from None
    try:
        sd = torch.load(str(file), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged or code-carrying pickle raises anything
        raise PtuningFormatError(f"{file}: cannot be read as a plain tensor file ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise PtuningFormatError(f"{file}: holds a {type(sd).__name__}, expected a dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(REF_PREFIX)}


def load_reference_weights(path, spec: PrefixSpec | None = None) -> dict[str, torch.Tensor]:
    """PrefixEncoder state dict (``embedding.weight``, ...) of a reference-format folder, checked against its config."""
    path = Path(path)
    if spec is None:
        spec = spec_from_config(read_json_object(path / CONFIG, PtuningFormatError), str(path / CONFIG))
    files = _weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update({k[len(REF_PREFIX):]: v for k, v in _read_prefix_tensors(file).items()})
    where = files[0] if len(files) == 1 else path
    shapes = expected_shapes(spec)
    missing = sorted(set(shapes) - set(weights))
    extra = sorted(set(weights) - set(shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(REF_PREFIX + k for k in missing))
        if extra:
            parts.append("unexpected " + ", ".join(REF_PREFIX + k for k in extra))
        raise PtuningFormatError(f"{where}: {'; '.join(parts)} (config.json: pre_seq_len={spec.length}, "
                                 f"prefix_projection={str(spec.projection).lower()})")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise PtuningFormatError(
                f"{where}: {REF_PREFIX}{name} has shape {tuple(weights[name].shape)}, config.json implies {shape} "
                f"(pre_seq_len={spec.length}, num_layers={spec.num_layers}, multi_query_group_num="
                f"{spec.num_kv_heads}, kv_channels={spec.head_dim}"
                + (f", hidden_size={spec.projection_hidden_size})" if spec.projection else ")"))
    return weights


# ----------------------------------------------------------------------------------- conversions


def import_checkpoint(old_dir, run_dir, base_path: str | None = None) -> Path:
    """Write the reference-format folder `old_dir` as a ptune checkpoint `run_dir/checkpoint-N`."""
    old_dir = Path(old_dir)
    if not is_reference_checkpoint(old_dir):
        if (old_dir / CONFIG).is_file() and not (old_dir / ckpt_io.CONFIG_FILE).is_file():
            # A damaged config.json is named as such, not as "not a checkpoint".
            read_json_object(old_dir / CONFIG, PtuningFormatError)
        raise PtuningFormatError(f"{old_dir}: not a ChatGLM P-tuning checkpoint (needs {CONFIG} with pre_seq_len set "
                                 f"and no {ckpt_io.CONFIG_FILE})")
    config = reference_prefix_config(old_dir)
    weights = load_reference_weights(old_dir, PrefixSpec(**config["prefix"]))
    if base_path is not None:
        base = Path(base_path)
        if not (base / "config.json").is_file():
            raise PtuningFormatError(f"--base {base_path}: no config.json there; pass the folder of the base model "
                                     "the prefix was trained on (or leave --base out and pass model.path= when loading)")
        _check_base_fits(base, config["prefix"], old_dir)
        # Absolute: the checkpoint is loaded from other working folders than the one it was imported in.
        config["base"]["path"] = config["model"]["path"] = str(base.resolve())
    step = config.pop("step") or 0
    # The checkpoints of one reference run (checkpoint-1000, -2000, ...) go into one folder; those of another run
    # or of a ptune training run would mix with them (resume=latest, a run folder's newest checkpoint).
    held = ckpt_io.list_checkpoints(run_dir) if Path(run_dir).is_dir() else []
    others = [p.name for p in held
              if Path(ckpt_io.read_prefix_config(p).get("imported_from", "")).parent != old_dir.resolve().parent]
    if others:
        raise PtuningFormatError(f"{run_dir}: holds {', '.join(others)} of another run; import into an empty or new "
                                 f"folder (the checkpoints of {old_dir.parent} may share one)")
    target = Path(run_dir) / f"checkpoint-{step}"
    # save_checkpoint replaces a checkpoint of the same step (right for a resumed run re-saving it), which
    # here would throw away a run's own checkpoint, its optimizer and trainer state with it.
    if target.exists():
        raise PtuningFormatError(f"{target}: exists; import into another run folder (or remove it first)")
    config.pop("format")
    config["imported_from"] = str(old_dir.resolve())
    config.pop("source")
    return ckpt_io.save_checkpoint(run_dir, step, weights, config)


def _check_base_fits(base: Path, prefix: dict, old_dir: Path) -> None:
    """Refuse a --base whose attention layers the prefix cannot fit (it would fail only when loaded, naming the
    base as what the prefix 'was trained on')."""
    from transformers import AutoConfig

    from ptune.chatglm.convert import glm_config_from_chatglm
    from ptune.prefix import attention_shape

    chatglm = _base_chatglm_config(base)
    try:
        shape = attention_shape(glm_config_from_chatglm(chatglm) if chatglm
                                else AutoConfig.from_pretrained(base, local_files_only=True))
    except (ChatGLMConversionError, OSError, ValueError, KeyError) as e:
        raise PtuningFormatError(f"--base {base}: its config.json cannot be read as a model's ({e})") from None
    wanted = {k: prefix[k] for k in ("num_layers", "num_kv_heads", "head_dim")}
    differ = [f"{k}: prefix {v} vs base {shape[k]}" for k, v in wanted.items() if shape[k] != v]
    if differ:
        raise PtuningFormatError(f"--base {base}: the prefix of {old_dir} does not fit it ({', '.join(differ)}); "
                                 "pass the base model it was trained on")


def _base_chatglm_config(path) -> dict:
    if not path:
        return {}
    cfg_file = Path(path) / CONFIG
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) and cfg.get("model_type") == "chatglm" else {}


def export_checkpoint(ckpt, out_dir) -> Path:
    """Write a ptune checkpoint as ``out_dir/config.json`` + ``pytorch_model.bin`` + ``model.safetensors`` in the
    reference format (the reference code loads the .bin alone; the same tensors in both).

    Only a prefix trained on a ChatGLM2/3-shaped base (GLM, projection width = the model's hidden size)
    has a reference-format equivalent; anything else is refused.
    """
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if is_reference_checkpoint(ckpt):
        raise PtuningFormatError(f"{ckpt}: already a ChatGLM P-tuning folder ({CONFIG} with pre_seq_len); "
                                 "export takes a ptune checkpoint")
    config = ckpt_io.read_prefix_config(ckpt)
    spec = PrefixSpec(**config["prefix"])
    base = config.get("base", {})
    where = ckpt / ckpt_io.CONFIG_FILE
    if base.get("model_type") not in _CHATGLM_TYPES:
        raise PtuningFormatError(f"{where}: the prefix was trained on a {base.get('model_type')!r} model; only "
                                 "prefixes of ChatGLM2/3 (GLM) models can be written in the ChatGLM P-tuning format")
    hidden = base.get("hidden_size")
    if hidden is None:
        raise PtuningFormatError(f"{where}: base.hidden_size is not recorded; the ChatGLM format needs it")
    if spec.projection and spec.projection_hidden_size != hidden:
        raise PtuningFormatError(
            f"{where}: projection_hidden_size={spec.projection_hidden_size} differs from the model's hidden_size="
            f"{hidden}; ChatGLM's prefix encoder always projects through hidden_size")
    weights = ckpt_io.load_prefix_weights(ckpt)
    shapes = expected_shapes(spec)
    if set(weights) != set(shapes) or any(tuple(weights[k].shape) != s for k, s in shapes.items()):
        raise PtuningFormatError(f"{ckpt / ckpt_io.PREFIX_FILE}: tensors {sorted(weights)} do not match the prefix "
                                 f"spec in {where}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PtuningFormatError(f"{out_dir}: exists and is not an empty folder; pick a new folder")
    ref_cfg = _base_chatglm_config(base.get("path"))
    ref_cfg.update({"model_type": "chatglm", "num_layers": spec.num_layers, "multi_query_attention": True,
                    "multi_query_group_num": spec.num_kv_heads, "kv_channels": spec.head_dim, "hidden_size": hidden,
                    "pre_seq_len": spec.length, "prefix_projection": spec.projection})
    if base.get("vocab_size") is not None:
        ref_cfg.setdefault("padded_vocab_size", base["vocab_size"])
    made = not out_dir.exists()
    written = [out_dir / name for name in ("model.safetensors", "pytorch_model.bin", "trainer_state.json", CONFIG)]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {REF_PREFIX + k: v.contiguous() for k, v in weights.items()}
        save_tensors(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        with replacing(out_dir / "pytorch_model.bin") as tmp:
            torch.save(tensors, tmp)
        if config.get("step") is not None:  # where the Trainer keeps it, which import reads back
            (out_dir / "trainer_state.json").write_text(json.dumps({"global_step": int(config["step"])}) + "\n",
                                                        encoding="utf-8")
        (out_dir / CONFIG).write_text(json.dumps(ref_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except (OSError, SafetensorError, RuntimeError) as e:  # a file where a folder is needed, a read-only or full
        # disk (torch.save reports that as a RuntimeError); what was written goes, so the same command can run again
        for path in written:
            with suppress(OSError):
                path.unlink(missing_ok=True)
        if made:
            with suppress(OSError):
                out_dir.rmdir()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise PtuningFormatError(f"could not write {out_dir}: {reason}") from None
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptune.chatglm.ptuning",
                                     description="Convert between ChatGLM2/3 P-tuning checkpoints and ptune's.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="reference-format folder -> <run dir>/checkpoint-N (ptune)")
    imp.add_argument("old_dir")
    imp.add_argument("run_dir")
    imp.add_argument("--base", default=None, help="base model folder to record (else pass model.path= when loading)")
    exp = sub.add_parser("export", help="ptune checkpoint -> reference-format folder")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "import":
            out = import_checkpoint(args.old_dir, args.run_dir, args.base)
        else:
            out = export_checkpoint(args.checkpoint, args.out_dir)
    except ckpt_io.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
