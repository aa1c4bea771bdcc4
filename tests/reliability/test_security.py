"""Security properties, checked on what ptune writes and on its source and configs:

* a run folder and its checkpoints hold only safetensors, JSON/JSONL, YAML, text logs and TensorBoard
  event records: nothing that unpickles on load;
* every torch.load in ptune/ passes weights_only=True, and nothing calls pickle (or its wrappers);
* trust_remote_code is false in every shipped config and nothing in ptune/ passes True;
* the server listens on loopback by default and bounds request bodies, prompts, replies and its queue.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from safetensors import safe_open

from reliability_harness import REPO, cli, train_args

SOURCE = sorted((REPO / "ptune").rglob("*.py"))
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


# ------------------------------------------------------------------------------------------ what is written


def _strict(constant):
    raise ValueError(f"{constant} is not JSON")


def is_tfrecord(path: Path) -> bool:
    """TensorBoard's event file: [u64 length][u32 crc][length bytes][u32 crc] records, end to end."""
    data, pos = path.read_bytes(), 0
    while pos < len(data):
        if pos + 12 > len(data):
            return False
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 12 + length + 4
    return pos == len(data) and len(data) > 0


def check_file(path: Path) -> str:
    head = path.read_bytes()[:4]
    assert not head.startswith(PICKLE_MAGIC) and not head.startswith(b"PK"), f"{path}: pickle / torch.save zip"
    name = path.name
    if name.endswith(".safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return "safetensors"
    if name.endswith(".json"):
        json.loads(path.read_text(encoding="utf-8"), parse_constant=_strict)
        return "json"
    if name.endswith(".jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            json.loads(line, parse_constant=_strict)
        return "jsonl"
    if name.endswith((".yaml", ".yml")):
        yaml.safe_load(path.read_text(encoding="utf-8"))
        return "yaml"
    if name.endswith(".log"):
        path.read_text(encoding="utf-8")
        return "log"
    if name.endswith(".png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
        return "png"
    if name.startswith("events.out.tfevents."):
        assert is_tfrecord(path), path
        return "tensorboard"
    raise AssertionError(f"{path}: a file of unexpected format in a run folder")


def test_a_run_folder_holds_only_safe_formats(tiny_model_dir, sample_file, tmp_path):
    out = tmp_path / "run"
    res = cli("ptune.train", *train_args(tiny_model_dir("llama"), sample_file, out, "trainer.max_steps=4",
                                         "trainer.tensorboard=true", "trainer.save_steps=2"))
    assert res.rc == 0, str(res)
    res = cli("ptune.evaluate", f"checkpoint={out / 'checkpoint-4'}", f"data.eval_file={sample_file}", "device=cpu",
              "limit=4", "generation.max_new_tokens=4")
    assert res.rc == 0, str(res)
    kinds = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        kinds.setdefault(check_file(path), []).append(str(path.relative_to(out)))
    assert {"safetensors", "json", "jsonl", "yaml", "log", "tensorboard", "png"} <= set(kinds), kinds
    assert "checkpoint-4/eval/generated_predictions.jsonl" in kinds["jsonl"]
    assert "checkpoint-4/optimizer.safetensors" in kinds["safetensors"]


def test_the_format_check_catches_a_pickle(tmp_path):
    import pickle

    import torch

    (tmp_path / "a.json").write_bytes(pickle.dumps({"a": 1}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "b.safetensors")
    for name in ("a.json", "b.safetensors"):
        with pytest.raises(AssertionError, match="pickle"):
            check_file(tmp_path / name)


# ------------------------------------------------------------------------------------------ the source


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    loads, problems = [], []
    for path in SOURCE:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                    problems.append(f"{path}:{node.lineno}: imports a pickle module")
        for call in calls(tree):
            name = dotted(call.func)
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name == "torch.load" or name.endswith(".torch.load"):
                loads.append(where)
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in ("pickle", "dill", "joblib"):
                problems.append(f"{where}: {name}")
            if name in ("numpy.load", "np.load"):
                kw = {k.arg: k.value for k in call.keywords}
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                    problems.append(f"{where}: np.load(allow_pickle=True)")
    assert not problems, problems
    assert loads, "expected the ChatGLM .bin converter's torch.load calls to be checked"


def test_nothing_in_ptune_passes_trust_remote_code_true():
    found = []
    for path in SOURCE:
        for call in calls(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append((f"{path.relative_to(REPO)}:{call.lineno}", ast.unparse(kw.value)))
    # The one place it is passed reads it from the model config (false in every shipped one, see below).
    assert found and all(where.startswith("ptune/models.py:") and value == "bool(model_cfg.trust_remote_code)"
                         for where, value in found), found


CONFIGS = sorted((REPO / "conf").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "conf")))
def test_trust_remote_code_is_false_in_every_config(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "trust_remote_code":
                    found.append((where + k, v))
                walk(v, f"{where}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}{i}.")

    walk(cfg, "")
    assert all(v is False for _, v in found), found
    if path.parent.name == "model":
        assert found == [("trust_remote_code", False)], "every model config states it explicitly"


# ------------------------------------------------------------------------------------------ the server


def test_server_defaults_are_loopback_and_bounded():
    cfg = OmegaConf.load(REPO / "conf" / "serve.yaml")
    assert cfg.host == "127.0.0.1"
    assert cfg.api_key is None  # no key baked into the shipped config
    for key, most in (("max_body_bytes", 16 << 20), ("max_prompt_tokens", 1 << 16), ("max_new_tokens", 1 << 16),
                      ("max_batch_size", 256), ("max_queue", 1 << 16)):
        assert isinstance(cfg[key], int) and 0 < cfg[key] <= most, (key, cfg[key])
