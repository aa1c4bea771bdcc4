"""ChatGLM2-6B P-tuning checkpoints (transformer.prefix_encoder.* + config.json) through ptune's one loader,
and `python -m ptune.chatglm.ptuning import/export` between that format and ptune's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import build_tokenizer
from ptune import checkpoint as ckpt_io
from ptune.chatglm import ptuning
from ptune.chatglm.convert import load_chatglm
from ptune.models import ModelError, attach_checkpoint, base_identity, load_for_inference
from ptune.prefix import PrefixEncoder, PrefixSpec

GOLDEN = Path(__file__).resolve().parent / "golden" / "chatglm"
REF_DIR = GOLDEN / "ptuning_checkpoint"
TINY = GOLDEN / "tiny_chatglm2"


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


@pytest.fixture(scope="module")
def base():
    return load_chatglm(TINY, dtype=torch.float32, verify="size")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "ptuning_noproj.safetensors"))


def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm(ids).logits


def bin_copy(dst: Path) -> Path:
    """The golden folder as the older scripts wrote it: pytorch_model.bin (torch.save) instead of safetensors."""
    dst.mkdir()
    shutil.copyfile(REF_DIR / "config.json", dst / "config.json")
    torch.save(load_file(str(REF_DIR / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


def test_reference_folder_attaches_and_matches_reference_logits(base, ref, tmp_path):
    assert ptuning.is_reference_checkpoint(REF_DIR)
    lm = attach_checkpoint(base, REF_DIR)
    assert lm.prefix.spec == PrefixSpec(num_layers=2, num_kv_heads=2, head_dim=16, length=8)
    assert_close_rel(logits(lm, ref["input_ids"]), ref["logits"])
    lm_bin = attach_checkpoint(base, bin_copy(tmp_path / "bin"))
    for name, t in lm.prefix.state_dict().items():
        assert torch.equal(lm_bin.prefix.state_dict()[name], t), name
    assert_close_rel(logits(lm_bin, ref["input_ids"]), ref["logits"])


def test_load_for_inference_needs_model_path_and_evaluate_runs_on_defaults(tmp_path, sample_file):
    with pytest.raises(ModelError, match=r"ptuning_checkpoint does not record.*model\.path="):
        load_for_inference(REF_DIR, OmegaConf.create({"path": None}))
    # A loadable base folder: the tiny converted-at-load ChatGLM2 weights plus a small tokenizer.
    model_dir = tmp_path / "tiny"
    shutil.copytree(TINY, model_dir)
    build_tokenizer(model_dir)
    lm, _, config = load_for_inference(REF_DIR, OmegaConf.create({"path": str(model_dir), "dtype": "float32"}))
    assert config["model"]["template"] == "chatglm2"
    assert (config["data"]["max_source_length"], config["data"]["max_target_length"]) == (64, 128)
    ref = load_file(str(GOLDEN / "ptuning_noproj.safetensors"))
    assert_close_rel(logits(lm, ref["input_ids"]), ref["logits"])

    from hydra import compose, initialize_config_dir

    import ptune.evaluate as ev

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoint={REF_DIR}", f"model.path={model_dir}",
                                             f"data.eval_file={sample_file}", "device=cpu", "limit=2", "batch_size=2",
                                             f"output_dir={tmp_path / 'eval'}", "generation.max_new_tokens=4"])
    metrics = ev.evaluate(cfg)
    assert set(metrics) >= {"rouge-1", "bleu-4"}
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["data"]["max_source_length"] == 64 and written["data"]["prompt_column"] == "content"


def make_ptune_checkpoint(base, run_dir: Path, projection: bool, model_type: str | None = None) -> Path:
    torch.manual_seed(7)
    spec = PrefixSpec.for_model(base.config, 5, projection=projection)
    enc = PrefixEncoder(spec)
    identity = base_identity(base, TINY)
    if model_type:
        identity["model_type"] = model_type
    config = {"prefix": spec.to_dict(), "dropout": 0.0, "base": identity,
              "model": {"path": str(TINY), "dtype": "float32", "attn_implementation": "sdpa", "template": "chatglm2",
                        "trust_remote_code": False},
              "data": dict(ptuning.DEFAULT_DATA)}
    return ckpt_io.save_checkpoint(run_dir, 3, enc.state_dict(), config)


@pytest.mark.parametrize("projection", [False, True], ids=["no-projection", "projection"])
def test_export_then_import_round_trips_bitwise(base, ref, tmp_path, projection):
    ckpt = make_ptune_checkpoint(base, tmp_path / "run", projection)
    out = tmp_path / "exported"
    assert ptuning.main(["export", str(ckpt), str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pre_seq_len"] == 5 and cfg["prefix_projection"] is projection
    assert (cfg["num_layers"], cfg["multi_query_group_num"], cfg["kv_channels"], cfg["hidden_size"]) == (2, 2, 16, 64)
    sd = load_file(str(out / "model.safetensors"))
    assert all(k.startswith("transformer.prefix_encoder.") for k in sd)
    # ChatGLM2-6B's main.py and web demo load pytorch_model.bin alone, keeping the transformer.prefix_encoder.* keys
    binary = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert binary.keys() == sd.keys() and all(torch.equal(binary[k], sd[k]) for k in sd)
    assert ptuning.spec_from_config(cfg, "x") == PrefixSpec(**ckpt_io.read_prefix_config(ckpt)["prefix"])

    assert json.loads((out / "trainer_state.json").read_text()) == {"global_step": 3}
    assert ptuning.main(["import", str(out), str(tmp_path / "back")]) == 0
    (back,) = ckpt_io.list_checkpoints(tmp_path / "back")
    assert back.name == "checkpoint-3"  # the step goes with it, whatever the exported folder is called
    ckpt_io.verify(back)
    original, again = ckpt_io.load_prefix_weights(ckpt), ckpt_io.load_prefix_weights(back)
    assert set(original) == set(again)
    for name, t in original.items():
        assert again[name].dtype == t.dtype and again[name].numpy().tobytes() == t.numpy().tobytes(), name
    assert ckpt_io.read_prefix_config(back)["prefix"] == ckpt_io.read_prefix_config(ckpt)["prefix"]
    # Both directions give the same model.
    expected = logits(attach_checkpoint(base, ckpt), ref["input_ids"])
    assert torch.equal(logits(attach_checkpoint(base, out), ref["input_ids"]), expected)
    assert torch.equal(logits(attach_checkpoint(base, back), ref["input_ids"]), expected)


def test_import_refuses_a_base_that_is_not_a_model_folder_and_records_an_absolute_one(tmp_path, monkeypatch):
    old = tmp_path / "checkpoint-3000"
    shutil.copytree(REF_DIR, old)
    with pytest.raises(ptuning.PtuningFormatError, match="--base /no/such/model: no config.json there"):
        ptuning.import_checkpoint(old, tmp_path / "run", base_path="/no/such/model")
    assert not (tmp_path / "run").exists()
    monkeypatch.chdir(TINY.parent)
    path = ptuning.import_checkpoint(old, tmp_path / "run", base_path=TINY.name)
    assert ckpt_io.read_prefix_config(path)["model"]["path"] == str(TINY.resolve())


def test_import_of_golden_records_base_and_step(tmp_path):
    old = tmp_path / "checkpoint-3000"
    shutil.copytree(REF_DIR, old)
    path = ptuning.import_checkpoint(old, tmp_path / "run", base_path=str(TINY))
    assert path.name == "checkpoint-3000"
    config = ckpt_io.read_prefix_config(path)
    assert config["base"]["path"] == str(TINY.resolve()) and config["model"]["template"] == "chatglm2"
    golden = load_file(str(REF_DIR / "model.safetensors"))
    assert torch.equal(ckpt_io.load_prefix_weights(path)["embedding.weight"],
                       golden["transformer.prefix_encoder.embedding.weight"])


def test_import_refuses_to_replace_an_existing_checkpoint(base, tmp_path, capsys):
    run = tmp_path / "run"
    existing = make_ptune_checkpoint(base, run, False)  # checkpoint-3, as a training run leaves it
    ckpt_io.save_checkpoint(run, 3, ckpt_io.load_prefix_weights(existing), ckpt_io.read_prefix_config(existing),
                            trainer_state={"global_step": 3},
                            optimizer_state={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []})
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    assert ckpt_io.STATE_FILE in before and ckpt_io.OPTIMIZER_FILE in before
    old = tmp_path / "checkpoint-3"
    shutil.copytree(REF_DIR, old)
    assert ptuning.main(["import", str(old), str(run)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {run}: holds checkpoint-3 of another run; import into an empty or new folder (the "
                   f"checkpoints of {tmp_path} may share one)\n")
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    old = tmp_path / "checkpoint-3000"  # another step: resume=latest would have picked it over the run's own
    shutil.copytree(REF_DIR, old)
    assert ptuning.main(["import", str(old), str(run)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {run}: holds checkpoint-3 of another run")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3"]
    # Into a folder of its own, the same reference step twice is refused; another step of that run goes in too.
    imported = tmp_path / "imported"
    assert ptuning.main(["import", str(old), str(imported)]) == 0
    assert ptuning.main(["import", str(old), str(imported)]) == 1
    assert capsys.readouterr().err.endswith(f"error: {imported / 'checkpoint-3000'}: exists; import into another run "
                                            "folder (or remove it first)\n")
    assert ptuning.main(["import", str(tmp_path / "checkpoint-3"), str(imported)]) == 0
    assert sorted(p.name for p in imported.iterdir()) == ["checkpoint-3", "checkpoint-3000"]


def test_import_refuses_a_base_the_prefix_does_not_fit(tmp_path, tiny_model_dir):
    old = tmp_path / "checkpoint-3000"
    shutil.copytree(REF_DIR, old)
    llama = tiny_model_dir("llama")
    with pytest.raises(ptuning.PtuningFormatError, match=rf"^--base {llama}: the prefix of {old} does not fit it "
                                                         r"\(.*head_dim: prefix 16 vs base \d+.*\); pass the base"):
        ptuning.import_checkpoint(old, tmp_path / "run", base_path=str(llama))
    assert not (tmp_path / "run").exists()


def test_export_refuses_prefixes_that_are_not_chatglm_shaped(base, tmp_path, capsys):
    llama = make_ptune_checkpoint(base, tmp_path / "llama", False, model_type="llama")
    assert ptuning.main(["export", str(llama), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "prefix_config.json" in err and "'llama'" in err and "ChatGLM2/3" in err
    assert not (tmp_path / "out").exists()

    odd = make_ptune_checkpoint(base, tmp_path / "odd", True)
    cfg_file = odd / ckpt_io.CONFIG_FILE
    cfg = json.loads(cfg_file.read_text())
    cfg["prefix"]["projection_hidden_size"] = 48
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ptuning.PtuningFormatError, match="projection_hidden_size=48 differs .*hidden_size=64"):
        ptuning.export_checkpoint(odd, tmp_path / "out2")


def test_missing_key_and_wrong_shape_name_the_file(base, tmp_path):
    sd = load_file(str(REF_DIR / "model.safetensors"))
    broken = tmp_path / "missing"
    broken.mkdir()
    shutil.copyfile(REF_DIR / "config.json", broken / "config.json")
    save_file({}, broken / "model.safetensors")
    with pytest.raises(ckpt_io.CheckpointError,
                       match=r"missing/model\.safetensors: missing transformer\.prefix_encoder\.embedding\.weight"):
        attach_checkpoint(base, broken)

    # config.json says projection, the file has none: the missing trans.* tensors are listed.
    proj = tmp_path / "proj"
    proj.mkdir()
    cfg = json.loads((REF_DIR / "config.json").read_text())
    (proj / "config.json").write_text(json.dumps({**cfg, "prefix_projection": True}))
    torch.save(sd, proj / "pytorch_model.bin")
    with pytest.raises(ckpt_io.CheckpointError, match=r"proj/pytorch_model\.bin: missing .*trans\.0\.bias"):
        attach_checkpoint(base, proj)

    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_text(json.dumps(cfg))
    torch.save({k: v[:, :-1] for k, v in sd.items()}, short / "pytorch_model.bin")
    with pytest.raises(ckpt_io.CheckpointError,
                       match=r"short/pytorch_model\.bin: transformer\.prefix_encoder\.embedding\.weight has shape "
                             r"\(8, 127\), config\.json implies \(8, 128\)"):
        attach_checkpoint(base, short)

    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt_io.CheckpointError, match="noweights: no model.safetensors or pytorch_model.bin"):
        attach_checkpoint(base, empty)


def test_bin_is_read_without_unpickling_code(base, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copyfile(REF_DIR / "config.json", evil / "config.json")
    torch.save({"transformer.prefix_encoder.embedding.weight": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(ckpt_io.CheckpointError, match=r"evil/pytorch_model\.bin: cannot be read"):
        attach_checkpoint(base, evil)


def test_sweep_of_a_reference_output_folder_says_to_import_its_checkpoints(tmp_path, sample_file):
    """The reference scripts' output folder (checkpoint-1000/, checkpoint-2000/, ... in their format) is not a
    ptune run; the sweep names the format and the import command instead of 'no checkpoint'."""
    from ptune import sweep as sw

    out = tmp_path / "adgen-chatglm2-6b-pt-128-2e-2"
    for step in (1000, 2000):
        shutil.copytree(REF_DIR, out / f"checkpoint-{step}")
    with pytest.raises(sw.SweepError) as e:
        sw.expand_runs([str(out)])
    message = str(e.value)
    assert "ChatGLM ptuning-script checkpoints (checkpoint-1000, ...)" in message
    assert f"python -m ptune.chatglm.ptuning import {out / 'checkpoint-1000'} <run dir>" in message
    # and the advice works: imported, the folder is a run the sweep takes
    for step in (1000, 2000):
        ptuning.import_checkpoint(out / f"checkpoint-{step}", tmp_path / "run", base_path=str(TINY))
    assert sw.expand_runs([str(tmp_path / "run")]) == [(str(tmp_path / "run"), tmp_path / "run")]


# ----------------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("content, fault", [
    ("{x", "not valid JSON (Expecting property name"),
    ("[1]", "a JSON list, expected an object"),
    ('"pre_seq_len"', "a JSON str, expected an object"),
    ({"pre_seq_len": "eight"}, 'pre_seq_len is "eight"; expected a whole number above 0'),
    ({"pre_seq_len": 8.5}, "pre_seq_len is 8.5; expected a whole number above 0"),
    ({"pre_seq_len": True}, "pre_seq_len is true; expected a whole number above 0"),
    ({"pre_seq_len": -1}, "pre_seq_len is -1; expected a whole number above 0"),
    ({"num_layers": None}, "num_layers is null; expected a whole number above 0"),
    ({"kv_channels": "16"}, 'kv_channels is "16"; expected a whole number above 0'),
    ({"prefix_projection": "false"}, 'prefix_projection is "false"; expected true or false'),
    ({"hidden_size": None, "prefix_projection": True}, "hidden_size is null; expected a whole number above 0"),
], ids=["not-json", "list", "string", "seq-string", "seq-fraction", "seq-bool", "seq-negative", "layers-null",
        "kv-string", "projection-string", "hidden-null"])
def test_malformed_reference_config_is_refused_in_one_line(base, tmp_path, capsys, content, fault):
    old = tmp_path / "checkpoint-5"
    shutil.copytree(REF_DIR, old)
    if isinstance(content, dict):
        content = json.dumps({**json.loads((REF_DIR / "config.json").read_text()), **content})
    (old / "config.json").write_text(content)
    assert ptuning.main(["import", str(old), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {old / 'config.json'}: ") and fault in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    if ptuning.is_reference_checkpoint(old):  # loading it as a prefix reports the same fault
        with pytest.raises(ckpt_io.CheckpointError, match=fault.replace("(", r"\(")):
            attach_checkpoint(base, old)


@pytest.mark.parametrize("index, fault", [
    ("[1]", 'no "weight_map" object'),
    (json.dumps({"weight_map": {"transformer.prefix_encoder.embedding.weight": "../elsewhere/model.safetensors"}}),
     "weight_map['transformer.prefix_encoder.embedding.weight'] is \"../elsewhere/model.safetensors\"; expected the "
     "name of a shard file in"),
], ids=["list", "outside-the-folder"])
def test_a_shard_index_of_another_shape_or_pointing_elsewhere_is_refused(tmp_path, capsys, index, fault):
    shutil.copytree(REF_DIR, tmp_path / "elsewhere")  # a real shard the escaping entry would otherwise load
    old = tmp_path / "old"
    old.mkdir()
    shutil.copyfile(REF_DIR / "config.json", old / "config.json")
    (old / "model.safetensors.index.json").write_text(index)
    assert ptuning.main(["import", str(old), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {old / 'model.safetensors.index.json'}: ") and fault in err, err
    assert not (tmp_path / "run").exists()


def test_an_export_that_fails_part_way_leaves_nothing_and_can_run_again(base, tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: one line, and no half-written folder refusing the retry."""
    ckpt = make_ptune_checkpoint(base, tmp_path / "run", False)
    out = tmp_path / "exported"

    def full_disk(*a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(ptuning.torch, "save", full_disk)
    assert ptuning.main(["export", str(ckpt), str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"error: could not write {out}: basic_ios::clear: iostream error"
    assert not out.exists()
    monkeypatch.undo()
    assert ptuning.main(["export", str(ckpt), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "pytorch_model.bin",
                                                     "trainer_state.json"]


def test_export_to_a_file_or_below_one_is_refused_in_one_line(base, tmp_path, capsys):
    ckpt = make_ptune_checkpoint(base, tmp_path / "run", False)
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert ptuning.main(["export", str(ckpt), str(target)]) == 1
    assert capsys.readouterr().err == f"error: {target}: exists and is not an empty folder; pick a new folder\n"
    assert target.read_text() == "keep me"
    assert ptuning.main(["export", str(ckpt), str(target / "out")]) == 1
    assert capsys.readouterr().err == f"error: could not write {target / 'out'}: Not a directory\n"
