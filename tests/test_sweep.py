"""ptune.sweep on a tiny real run: one base load, reuse of earlier scores, multirun folders, reports."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import ptune.evaluate
import ptune.models
from conftest import run_train
from ptune import sweep as sw
from ptune.checkpoint import list_checkpoints
from ptune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT = ("sweep.md", "sweep.csv", "sweep.png")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_file, tmp_path_factory) -> Path:
    """A tiny llama run with checkpoint-1, -2 and -3 (trained once for the whole module)."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    run_train(f"model.path={tiny_model_dir('llama')}", f"data.train_file={sample_file}", f"output_dir={out}",
              "prefix.length=4", "trainer.max_steps=3", "trainer.save_steps=1", "trainer.log_steps=1",
              "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=1", "trainer.progress_bar=false",
              "trainer.tensorboard=false", "optim.lr=0.05")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    def make(dest: Path) -> Path:
        shutil.copytree(trained, dest)
        return dest
    return make


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("sweep", overrides=["progress_bar=false", "limit=5", "generation.max_new_tokens=8",
                                                 *overrides])


@pytest.fixture
def counted(monkeypatch):
    """Counts of real base loads and real generation calls made through ptune.models / ptune.evaluate."""
    counts = {"load_base": 0, "predict": 0}
    real_load, real_predict = ptune.models.load_base, ptune.evaluate.predict

    def load_base(*a, **k):
        counts["load_base"] += 1
        return real_load(*a, **k)

    def predict(*a, **k):
        counts["predict"] += 1
        return real_predict(*a, **k)

    monkeypatch.setattr(ptune.models, "load_base", load_base)
    monkeypatch.setattr(ptune.evaluate, "predict", predict)

    def take() -> dict:
        out = dict(counts)
        counts.update(load_base=0, predict=0)
        return out
    return take


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sweep_loads_base_once_reuses_scores_and_reports(run_copy, sample_file, tmp_path, counted, capsys):
    run = run_copy(tmp_path / "run")
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 1, "predict": 3}
    out = run / "sweep"
    assert result["output_dir"] == out and len(result["scored"]) == 3 and not result["failed"]

    rows = read_csv(out / "sweep.csv")
    assert list(rows[0])[:6] == ["run", "step", "rouge-1", "rouge-2", "rouge-l", "bleu-4"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and {r["run"] for r in rows} == {str(run)}
    for r in rows:
        for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
            assert 0.0 <= float(r[k]) <= 100.0

    png = (out / "sweep.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

    md = (out / "sweep.md").read_text(encoding="utf-8")
    assert "| name | rouge-1 | rouge-2 | rouge-l | bleu-4 |" in md
    for step in (1, 2, 3):
        assert f"| {run}/checkpoint-{step} |" in md
    printed = capsys.readouterr().out
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        best = result["best"][k]
        assert best[k] == pytest.approx(max(float(r[k]) for r in rows), abs=1e-4)
        assert f"**{k}**: {best['name']}" in md
        assert f"best {k}: {best['name']}" in printed

    # Each checkpoint got the files ptune.evaluate writes, stamped with the settings that produced them.
    for ckpt in list_checkpoints(run):
        metrics = json.loads((ckpt / "eval" / "metrics.json").read_text())
        assert metrics["num_samples"] == 5 and metrics["generation"]["max_new_tokens"] == 8
        assert len((ckpt / "eval" / "generated_predictions.jsonl").read_text().splitlines()) == 5

    # Same settings again: nothing is generated and no model is loaded; the report is rebuilt from the files.
    (out / "sweep.csv").unlink()
    again = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 0, "predict": 0}
    assert len(again["reused"]) == 3 and read_csv(out / "sweep.csv") == rows

    # Scores from before the current prediction rules (a file without them, or older ones) are made again.
    for ckpt, rules in (("checkpoint-1", None), ("checkpoint-2", ptune.evaluate.PREDICTION_RULES - 1)):
        path = run / ckpt / "eval" / "metrics.json"
        old = json.loads(path.read_text())
        assert old.pop("prediction_rules") == ptune.evaluate.PREDICTION_RULES
        path.write_text(json.dumps(old if rules is None else {**old, "prediction_rules": rules}))
    again = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 1, "predict": 2} and again["reused"] == [f"{run}/checkpoint-3"]
    assert json.loads(path.read_text())["prediction_rules"] == ptune.evaluate.PREDICTION_RULES

    # force=true scores all three again, with one base load; other generation settings do as well.
    assert len(sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}", "force=true"))["scored"]) == 3
    assert counted() == {"load_base": 1, "predict": 3}
    sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}", "generation.max_new_tokens=4"))
    assert counted() == {"load_base": 1, "predict": 3}
    sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}", "generation.max_new_tokens=4", "limit=3"))
    assert counted() == {"load_base": 1, "predict": 3}


def test_multirun_folder_is_expanded_into_its_jobs(run_copy, sample_file, tmp_path, counted):
    multi = tmp_path / "multirun"
    run_copy(multi / "0")
    run_copy(multi / "1")
    (multi / "multirun.yaml").write_text("{}\n")
    report = tmp_path / "report"
    result = sw.sweep(compose(f"runs=[{multi}]", f"data.eval_file={sample_file}", f"output_dir={report}"))
    assert counted() == {"load_base": 1, "predict": 6}
    rows = read_csv(report / "sweep.csv")
    assert [(r["run"], int(r["step"])) for r in rows] == [(f"{multi}/{j}", s) for j in (0, 1) for s in (1, 2, 3)]
    # The jobs are copies of one run: greedy decoding scores them identically.
    assert [r["rouge-l"] for r in rows[:3]] == [r["rouge-l"] for r in rows[3:]]
    assert (report / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    # Each checkpoint of job 0 ties with job 1's copy at its step: the run listed first is named.
    assert result["best"]["bleu-4"]["run"] == f"{multi}/0"
    assert f"{multi}/1/checkpoint-{result['best']['bleu-4']['step']}" in result["tied"]["bleu-4"]


def _rewrite_manifest(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest:
        data = (ckpt / name).read_bytes()
        manifest[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def recorded_as(run: Path, section: str, key: str, value) -> None:
    """Rewrite one recorded setting in every checkpoint of `run`, keeping the manifests valid."""
    for ckpt in list_checkpoints(run):
        config = json.loads((ckpt / "prefix_config.json").read_text())
        config[section][key] = value
        (ckpt / "prefix_config.json").write_text(json.dumps(config))
        _rewrite_manifest(ckpt)


def test_other_base_is_loaded_separately_and_a_broken_checkpoint_is_reported(run_copy, sample_file, tmp_path,
                                                                             tiny_model_dir, counted):
    a, b, c = run_copy(tmp_path / "a"), run_copy(tmp_path / "b"), run_copy(tmp_path / "c")
    moved = shutil.copytree(tiny_model_dir("llama"), tmp_path / "llama-copy")
    for run, base in ((b, moved), (c, tmp_path / "gone")):
        recorded_as(run, "base", "path", str(base))
    broken = a / "checkpoint-2" / "prefix.safetensors"
    broken.write_bytes(broken.read_bytes()[:-8])
    result = sw.sweep(compose(f"runs=[{a},{b},{c}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 3, "predict": 5}  # the third load fails: its base folder is gone
    failed = {f["checkpoint"]: f["error"] for f in result["failed"]}
    assert list(failed) == [str(a / "checkpoint-2")] + [str(c / f"checkpoint-{s}") for s in (1, 2, 3)]
    assert "truncated" in failed[str(a / "checkpoint-2")]
    assert f"model.path={tmp_path / 'gone'}: no such folder" in failed[str(c / "checkpoint-1")]
    rows = read_csv(a / "sweep" / "sweep.csv")
    assert [(r["run"], int(r["step"])) for r in rows] == [(str(a), 1), (str(a), 3)] + [(str(b), s) for s in (1, 2, 3)]
    # Same weights behind both paths: same scores.
    assert [r["bleu-4"] for r in rows if r["run"] == str(a)] == [r["bleu-4"] for r in rows if r["run"] == str(b)][::2]
    assert "Not scored" in (a / "sweep" / "sweep.md").read_text()


def test_a_quantized_run_gets_its_own_base_and_false_scores_it_on_a_float_one(run_copy, sample_file, tmp_path,
                                                                             counted):
    """Two runs alike but for the quantization they trained with are scored on two bases (they shared the
    first one's); model.quantization=false scores the quantized run's prefix on the float base."""
    from hydra import compose as hydra_compose, initialize_config_dir

    plain, quantized = run_copy(tmp_path / "float"), run_copy(tmp_path / "int8")
    recorded_as(quantized, "model", "quantization", "int8")
    result = sw.sweep(compose(f"runs=[{plain},{quantized}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 2, "predict": 6} and not result["failed"]
    swept = {(r["run"], r["step"]): r for r in read_csv(plain / "sweep" / "sweep.csv")}

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=[f"checkpoint={quantized / 'checkpoint-2'}", "limit=5",
                                                   f"data.eval_file={sample_file}", "generation.max_new_tokens=8",
                                                   f"output_dir={tmp_path / 'alone'}"])
    alone = ptune.evaluate.evaluate(cfg)
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert float(swept[(str(quantized), "2")][k]) == pytest.approx(alone[k], abs=1e-4), k
    assert json.loads((quantized / "checkpoint-2" / "eval" / "metrics.json").read_text())["model"]["quantization"] \
        == "int8"

    counted()
    as_float = sw.sweep(compose(f"runs=[{quantized}]", f"data.eval_file={sample_file}", "model.quantization=false"))
    assert counted() == {"load_base": 1, "predict": 3} and not as_float["reused"]
    rows = read_csv(quantized / "sweep" / "sweep.csv")
    assert [[r[k] for k in ("step", "rouge-1", "bleu-4")] for r in rows] == [
        [r[k] for k in ("step", "rouge-1", "bleu-4")] for (run, _), r in swept.items() if run == str(plain)]


def test_command_line_and_config_errors(run_copy, sample_file, tmp_path):
    run = run_copy(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "ptune.sweep", f"runs=[{run}]", f"data.eval_file={sample_file}", "limit=3",
           "generation.max_new_tokens=4", "progress_bar=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "best rouge-l: " in proc.stdout and (run / "sweep" / "sweep.md").is_file()
    assert proc.stderr.count("checkpoint-") >= 3  # one log line per checkpoint
    with pytest.raises(sw.SweepError, match="holds no complete checkpoint-N folder"):
        sw.sweep(compose(f"runs=[{empty}]", f"data.eval_file={sample_file}"))
    with pytest.raises(sw.SweepError, match="data.eval_file is not set"):
        sw.sweep(compose(f"runs=[{run}]"))
    for flag in ("force", "progress_bar"):  # any non-empty text would otherwise count as true
        with pytest.raises(ConfigError, match=f"^{flag}='ture': expected true or false$"):
            sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}", f"{flag}=ture"))
    # a checkpoint given for a run: said so, with the run folder to pass
    with pytest.raises(sw.SweepError) as err:
        sw.sweep(compose(f"runs=[{run}/checkpoint-2]", f"data.eval_file={sample_file}"))
    assert str(err.value) == (f"runs: {run}/checkpoint-2 is a checkpoint, not a run folder; a sweep scores every "
                              f"checkpoint of a run: pass runs=[{run}] (or score this one with python -m "
                              f"ptune.evaluate checkpoint={run}/checkpoint-2)")


def test_scores_written_by_evaluate_are_reused_only_when_made_with_the_same_settings(run_copy, sample_file,
                                                                                     tmp_path, counted):
    """ptune.evaluate and ptune.sweep write metrics.json in one layout, so a sweep can take evaluate's scores;
    it does not when the data settings differ, which it used not to check for evaluate's files."""
    from hydra import compose as hydra_compose, initialize_config_dir

    run = run_copy(tmp_path / "run")

    def evaluate(ckpt: str, *extra: str) -> dict:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hydra_compose("evaluate", overrides=[f"checkpoint={run / ckpt}", f"data.eval_file={sample_file}",
                                                       "limit=5", "generation.max_new_tokens=8", *extra])
        ptune.evaluate.evaluate(cfg)
        return json.loads((run / ckpt / "eval" / "metrics.json").read_text())

    same = evaluate("checkpoint-1")  # device auto, as the sweep's: on a GPU both load the base in bf16
    evaluate("checkpoint-2", "data.max_source_length=7")
    counted()
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 1, "predict": 2}  # checkpoint-2 (other data settings) and -3
    assert result["reused"] == [f"{run}/checkpoint-1"]
    swept = json.loads((run / "checkpoint-2" / "eval" / "metrics.json").read_text())
    for key in ("eval_sha256", "data", "model", "limit", "generation", "checkpoint", "eval_file", "rouge-l"):
        assert key in same and key in swept, key
    assert "sweep" not in swept and swept["data"]["max_source_length"] != 7
    assert {k: v for k, v in same.items() if k != "generation"} == {
        k: v for k, v in json.loads((run / "checkpoint-1" / "eval" / "metrics.json").read_text()).items()
        if k != "generation"}


def test_sampled_scores_are_the_same_at_any_batch_size_and_reused_at_any(run_copy, sample_file, tmp_path, counted):
    """Each row samples from its own stream: scores sampled at batch 2 are batch 4's, so a sweep at another batch
    size reuses them."""
    run = run_copy(tmp_path / "run")
    common = [f"runs=[{run}]", f"data.eval_file={sample_file}", "limit=4", "generation=reference_sampling",
              "generation.max_new_tokens=4"]

    def scores() -> list[dict]:
        return [{k: json.loads((c / "eval" / "metrics.json").read_text())[k] for k in ("rouge-1", "bleu-4")} |
                {"predict": (c / "eval" / "generated_predictions.jsonl").read_text()}
                for c in sorted(run.glob("checkpoint-*"))]

    sw.sweep(compose(*common, "batch_size=1"))
    at_one = scores()
    counted()
    assert len(sw.sweep(compose(*common, "batch_size=4"))["reused"]) == 3 and counted()["predict"] == 0
    assert len(sw.sweep(compose(*common, "batch_size=auto"))["reused"]) == 3
    assert len(sw.sweep(compose(*common, "batch_size=4", "force=true"))["scored"]) == 3
    assert scores() == at_one and counted()["predict"] == 3
    assert len({s["predict"] for s in at_one}) == 3  # the checkpoints' replies differ: the check compares something


def test_a_limit_past_the_files_end_reuses_scores_made_without_one_and_the_reverse(run_copy, sample_file,
                                                                                     tmp_path, counted):
    """limit=null and a limit at or past the row count score the same rows: neither makes the other's
    scores stale (a limit that leaves rows out still does)."""
    run = run_copy(tmp_path / "run")
    evalset = tmp_path / "dev.jsonl"
    evalset.write_text("".join(sample_file.read_text(encoding="utf-8").splitlines(keepends=True)[:4]),
                       encoding="utf-8")
    first = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={evalset}", "limit=null"))
    assert len(first["scored"]) == 3 and counted()["predict"] == 3
    for limit, reused in [("4", 3), ("1000", 3), ("null", 3), ("3", 0)]:
        result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={evalset}", f"limit={limit}"))
        assert len(result["reused"]) == reused, limit
        assert counted()["predict"] == 3 - reused, limit
    stored = json.loads((run / "checkpoint-1" / "eval" / "metrics.json").read_text())
    assert stored["limit"] == 3 and stored["num_samples"] == 3


def test_a_run_whose_columns_the_eval_file_lacks_is_not_scored_and_the_sweep_goes_on(run_copy, sample_file, tmp_path):
    a, b = run_copy(tmp_path / "a"), run_copy(tmp_path / "b")
    recorded_as(b, "data", "prompt_column", "question")
    for force in ("force=true", "force=false"):  # a fresh scoring, then one that first looks for reusable scores
        result = sw.sweep(compose(f"runs=[{a},{b}]", f"data.eval_file={sample_file}", force))
        failed = {f["checkpoint"]: f["error"] for f in result["failed"]}
        assert list(failed) == [str(b / f"checkpoint-{s}") for s in (1, 2, 3)], force
        assert all("column 'question' not found" in e and "data.prompt_column=" in e for e in failed.values())
        assert [int(r["step"]) for r in read_csv(a / "sweep" / "sweep.csv")] == [1, 2, 3]
        assert "Not scored" in (a / "sweep" / "sweep.md").read_text()


def test_a_sweep_that_fails_part_way_leaves_no_report_of_the_previous_one(run_copy, sample_file, tmp_path):
    """The report is removed before scoring starts: after a failed sweep there is none, rather than the previous
    sweep's standing as if it were this one's. A sweep refused at start-up changes nothing."""
    run = run_copy(tmp_path / "run")
    out = run / "sweep"
    sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert all((out / name).is_file() for name in REPORT)
    with pytest.raises(sw.SweepError, match="data.eval_file is not set"):
        sw.sweep(compose(f"runs=[{run}]"))
    for flag in ("force", "progress_bar"):  # any non-empty text would otherwise count as true
        with pytest.raises(ConfigError, match=f"^{flag}='ture': expected true or false$"):
            sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}", f"{flag}=ture"))
    assert all((out / name).is_file() for name in REPORT)

    recorded_as(run, "base", "path", str(tmp_path / "gone"))  # every checkpoint fails once scoring starts
    with pytest.raises(sw.SweepError, match="no checkpoint could be scored"):
        sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert not [p.name for p in out.iterdir()]


def test_ctrl_c_stops_with_one_line_and_status_130_and_the_next_sweep_reuses_the_finished_scores(
        run_copy, sample_file, tmp_path, counted):
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background), so in the sweep it starts too")
    run = run_copy(tmp_path / "run")
    out = run / "sweep"
    sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))  # a previous report, to be removed
    evalset = tmp_path / "dev.jsonl"  # 256 rows: a checkpoint takes seconds to score, time to interrupt the second
    evalset.write_text(sample_file.read_text(encoding="utf-8") * 4, encoding="utf-8")
    settings = [f"runs=[{run}]", f"data.eval_file={evalset}", "limit=null", "generation.max_new_tokens=32"]

    def scored_here(ckpt: Path) -> bool:
        path = ckpt / "eval" / "metrics.json"
        try:
            return json.loads(path.read_text())["num_samples"] == 256
        except FileNotFoundError:
            return False

    proc = subprocess.Popen([sys.executable, "-m", "ptune.sweep", *settings, "progress_bar=false"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:  # the log line comes once checkpoint-1's scores are on disk
            seen.append(line)
            if f"{run}/checkpoint-1: rouge-1 " in line:
                break
        proc.send_signal(signal.SIGINT)  # while checkpoint-2 is generating
        stderr = "".join(seen) + proc.communicate(timeout=120)[1]
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, stderr[-4000:]
    assert "Traceback" not in stderr and stderr.count("interrupted") == 1
    kept = [c.name for c in list_checkpoints(run) if scored_here(c)]
    assert kept[0] == "checkpoint-1" and len(kept) < 3
    assert stderr.splitlines()[-1] == (
        f"sweep interrupted: the {len(kept)} checkpoint(s) scored before the interrupt keep their scores in "
        "eval/metrics.json, which the next sweep with the same settings reuses; no report was written")
    assert not [p.name for p in out.iterdir()]  # neither the previous report nor part of this one

    counted()
    again = sw.sweep(compose(*settings))
    assert again["reused"] == [f"{run}/{name}" for name in kept]
    assert counted() == {"load_base": 1, "predict": 3 - len(kept)}
    assert all((out / name).is_file() for name in REPORT)


def test_multirun_jobs_without_checkpoints_and_incomplete_checkpoints_are_listed_as_not_scored(
        run_copy, sample_file, tmp_path):
    multi = tmp_path / "multirun"
    run_copy(multi / "0")
    (multi / "1").mkdir(parents=True)  # a job that failed before its first save
    (multi / "1" / "config.yaml").write_text("{}\n")
    run_copy(multi / "2")
    (multi / "2" / "checkpoint-3" / "manifest.json").unlink()
    (multi / "multirun.yaml").write_text("{}\n")
    report = tmp_path / "report"
    result = sw.sweep(compose(f"runs=[{multi}]", f"data.eval_file={sample_file}", f"output_dir={report}"))
    assert {f["checkpoint"]: f["error"] for f in result["failed"]} == {
        str(multi / "1"): "no checkpoints written",
        str(multi / "2" / "checkpoint-3"): "not a complete checkpoint: manifest.json missing"}
    assert [(r["run"], int(r["step"])) for r in read_csv(report / "sweep.csv")] == [
        (f"{multi}/0", 1), (f"{multi}/0", 2), (f"{multi}/0", 3), (f"{multi}/2", 1), (f"{multi}/2", 2)]
    md = (report / "sweep.md").read_text()
    not_scored = md[md.index("## Not scored"):]
    assert f"- {multi / '1'}: no checkpoints written" in not_scored
    assert f"- {multi / '2' / 'checkpoint-3'}: not a complete checkpoint: manifest.json missing" in not_scored


def test_tied_best_scores_are_named_together_and_the_fewest_steps_is_named_first(run_copy, sample_file, tmp_path,
                                                                                  capsys):
    """Run b holds a's checkpoints under later steps (checkpoint-11 is a's checkpoint-1): every best score is tied
    between them. b is listed first, yet a's earlier step is named, and b's copy is named beside it."""
    a, b = run_copy(tmp_path / "a"), run_copy(tmp_path / "b")
    for ckpt in list_checkpoints(b):
        ckpt.rename(b / f"checkpoint-{int(ckpt.name.split('-')[1]) + 10}")
    result = sw.sweep(compose(f"runs=[{b},{a}]", f"data.eval_file={sample_file}"))
    md = (b / "sweep" / "sweep.md").read_text()
    printed = capsys.readouterr().out
    steps = {r["name"]: r["step"] for r in result["rows"]}
    for k, best in result["best"].items():
        copy = f"{b}/checkpoint-{best['step'] + 10}"
        assert best["run"] == str(a) and copy in result["tied"][k], k
        tied = ", ".join(f"{name} (step {steps[name]})" for name in result["tied"][k])
        assert f"- **{k}**: {best['name']} (step {best['step']}): {best[k]:.4f}; tied with {tied}" in md
        assert f"best {k}: {best['name']} ({best[k]:.4f}), tied with {', '.join(result['tied'][k])}" in printed
    assert "are tied: the checkpoint with the fewest steps is named" in md


def test_runs_scored_with_other_prompt_or_reference_settings_are_ranked_under_a_warning(run_copy, sample_file,
                                                                                         tmp_path):
    a, b = run_copy(tmp_path / "a"), run_copy(tmp_path / "b")
    recorded = json.loads((a / "checkpoint-1" / "prefix_config.json").read_text())
    recorded_as(b, "data", "max_target_length", 7)
    recorded_as(b, "model", "template", "plain")
    result = sw.sweep(compose(f"runs=[{a},{b}]", f"data.eval_file={sample_file}"))
    assert [w.split(":")[0] for w in result["warnings"]] == [
        f"runs differ in data.max_target_length ({recorded['data']['max_target_length']} in {a}; 7 in {b}), "
        "which shapes the prompts or references they are scored on",
        f"runs differ in model.template ({recorded['model']['template']} in {a}; plain in {b}), "
        "which shapes the prompts or references they are scored on"]
    assert len(result["rows"]) == 6 and {r["run"] for r in result["best"].values()} <= {str(a), str(b)}
    md = (a / "sweep" / "sweep.md").read_text()
    assert md.count("**Warning**: runs differ in ") == 2 and md.index("**Warning**") < md.index("| name |")

    # One value given on the command line scores every checkpoint alike: that warning goes.
    result = sw.sweep(compose(f"runs=[{a},{b}]", f"data.eval_file={sample_file}", "data.max_target_length=7"))
    assert [w.split(" (")[0] for w in result["warnings"]] == ["runs differ in model.template"]


def test_a_base_whose_positions_cannot_hold_prompt_and_reply_is_not_scored_and_the_sweep_goes_on(
        run_copy, sample_file, tmp_path, tiny_model_dir, counted):
    """evaluate refuses a reply that runs past the model's positions; in a sweep that refusal is about one base,
    so its checkpoints are listed as not scored and the other runs are ranked."""
    a, b = run_copy(tmp_path / "a"), run_copy(tmp_path / "b")
    short = shutil.copytree(tiny_model_dir("llama"), tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    recorded_as(b, "base", "path", str(short))
    result = sw.sweep(compose(f"runs=[{a},{b}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 2, "predict": 6}
    failed = {f["checkpoint"]: f["error"] for f in result["failed"]}
    assert list(failed) == [str(b / f"checkpoint-{s}") for s in (1, 2, 3)]
    pattern = (r"generation.max_new_tokens=8: the longest of the 5 eval prompts has \d+ tokens, which with the reply "
               r"need \d+ positions; the model has 40 \(max_position_embeddings\): expected ")
    assert all(re.fullmatch(pattern + ".*data.max_source_length of at most 32", e) for e in failed.values()), failed
    assert [int(r["step"]) for r in read_csv(a / "sweep" / "sweep.csv")] == [1, 2, 3]
    assert "Not scored" in (a / "sweep" / "sweep.md").read_text()


def test_folders_that_cannot_be_written_lose_no_scores(run_copy, sample_file, tmp_path, counted, caplog):
    """A report folder that cannot be written is refused before anything is generated (it was found only at the
    end, with a traceback, after every checkpoint was scored). A checkpoint whose eval/ cannot be written (a run
    on read-only storage) is still scored and ranked; its scores are in the report only, and the log says so."""
    run = run_copy(tmp_path / "run")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ptune.evaluate.ConfigError, match=rf"^output_dir={blocker}/sweep: cannot write there, "
                                                         rf"{blocker} is not a folder; expected a folder"):
        sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}", f"output_dir={blocker}/sweep"))
    assert counted() == {"load_base": 0, "predict": 0}

    (run / "checkpoint-2" / "eval").write_text("")  # as root, permissions would not stop a write
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert len(result["scored"]) == 3 and not result["failed"]
    assert [int(r["step"]) for r in read_csv(run / "sweep" / "sweep.csv")] == [1, 2, 3]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith(f"{run}/checkpoint-2: could not write {run / 'checkpoint-2' / 'eval'} (") and
               m.endswith("); its scores are in this sweep's report only, and the next sweep scores it again")
               for m in warned), warned


def test_a_checkpoint_removed_while_it_is_scored_is_not_made_again(run_copy, sample_file, tmp_path, monkeypatch):
    """keep_last of a run still training deletes a checkpoint the sweep is generating for: its eval/ folder would
    bring the checkpoint's folder back, incomplete, and every later sweep would fail on it."""
    run = run_copy(tmp_path / "run")
    real = ptune.evaluate.predict

    def predict(*a, **k):
        texts = real(*a, **k)
        if (run / "checkpoint-1" / "eval").is_dir():  # the second checkpoint's generation: prune it meanwhile
            shutil.rmtree(run / "checkpoint-2", ignore_errors=True)
        return texts
    monkeypatch.setattr(ptune.evaluate, "predict", predict)
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert not (run / "checkpoint-2").exists()
    assert result["failed"] == [{"checkpoint": str(run / "checkpoint-2"),
                                 "error": "removed while it was being scored (keep_last of a run still training?)"}]
    assert [int(r["step"]) for r in read_csv(run / "sweep" / "sweep.csv")] == [1, 3]


def interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C while the `call`-th checkpoint of the sweep generates (the ones before it are really scored)."""
    real, calls = ptune.evaluate.predict, []

    def predict(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ptune.evaluate, "predict", predict)


def test_an_interrupt_says_which_scores_were_kept_and_which_eval_folders_could_not_be_written(
        run_copy, sample_file, tmp_path, monkeypatch):
    """The interrupt's line claimed every checkpoint scored kept its eval/metrics.json, those whose eval/ could
    not be written too: it names those now, and claims only what is on disk."""
    run = run_copy(tmp_path / "run")
    (run / "checkpoint-2" / "eval").write_text("")  # as root, permissions would not stop a write
    interrupt_at(monkeypatch, 3)
    with pytest.raises(sw.SweepInterrupted) as err:
        sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert str(err.value) == (
        "the 1 checkpoint(s) scored before the interrupt keep their scores in eval/metrics.json, which the next "
        "sweep with the same settings reuses; 1 other checkpoint(s) scored keep no scores, as their eval/ folder "
        f"could not be written ({run}/checkpoint-2), and the next sweep scores them again; no report was written")
    assert (run / "checkpoint-1" / "eval" / "metrics.json").is_file()
    assert not (run / "checkpoint-3" / "eval").exists()

    # None kept: the line says so rather than counting them as kept.
    shutil.rmtree(run / "checkpoint-1" / "eval")
    (run / "checkpoint-1" / "eval").write_text("")
    interrupt_at(monkeypatch, 2)
    with pytest.raises(sw.SweepInterrupted) as err:
        sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert str(err.value) == (
        "the 1 checkpoint(s) scored before the interrupt keep no scores, as their eval/ folder could not be written "
        f"({run}/checkpoint-1), and the next sweep scores them again; no report was written")


def test_the_report_says_how_many_rows_were_scored(run_copy, sample_file, tmp_path):
    """sweep.md said "(first 1000 rows)" for a limit past the eval file's end; it gives the rows really scored,
    with the file's count where the limit left some out, for fresh scores and reused ones alike."""
    run = run_copy(tmp_path / "run")
    evalset = tmp_path / "dev.jsonl"
    evalset.write_text("".join(sample_file.read_text(encoding="utf-8").splitlines(keepends=True)[:4]),
                       encoding="utf-8")
    for limit, said in [("1000", "all 4 rows"), ("1000", "all 4 rows"), ("null", "all 4 rows"),
                        ("3", "first 3 of 4 rows")]:
        sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={evalset}", f"limit={limit}"))
        lines = (run / "sweep" / "sweep.md").read_text(encoding="utf-8").splitlines()
        assert lines[2] == f"Eval file: {evalset} ({said})", limit

    # A run whose response column is empty in one row reads one row fewer: the counts are given per run.
    other = run_copy(tmp_path / "other")
    recorded_as(other, "data", "response_column", "alt")
    rows = [json.loads(line) for line in evalset.read_text(encoding="utf-8").splitlines()]
    evalset.write_text("".join(json.dumps({**r, "alt": "" if i == 0 else r["summary"]}, ensure_ascii=False) + "\n"
                               for i, r in enumerate(rows)), encoding="utf-8")
    sw.sweep(compose(f"runs=[{run},{other}]", f"data.eval_file={evalset}", "limit=3"))
    lines = (run / "sweep" / "sweep.md").read_text(encoding="utf-8").splitlines()
    assert lines[2] == f"Eval file: {evalset} (first 3 of 4 rows in {run}; all 3 rows in {other})"


def test_a_run_whose_label_starts_with_an_underscore_is_in_the_plots_legend(run_copy, sample_file, tmp_path,
                                                                           monkeypatch):
    """matplotlib leaves a line whose label starts with "_" out of a legend it gathers itself: a run given as a
    relative folder such as _a had lines in sweep.png but no legend entry."""
    from matplotlib.figure import Figure

    saved, real_savefig = [], Figure.savefig

    def savefig(fig, *a, **k):
        saved.append(fig)
        return real_savefig(fig, *a, **k)
    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.chdir(tmp_path)
    run_copy(tmp_path / "_a")
    run_copy(tmp_path / "b")
    sw.sweep(compose("runs=[_a,b]", f"data.eval_file={sample_file}"))
    assert (tmp_path / "_a" / "sweep" / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    [fig] = saved
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["_a", "b"]


def test_a_checkpoint_damaged_after_it_was_scored_is_not_ranked_on_its_old_scores(run_copy, sample_file, tmp_path,
                                                                                   counted):
    run = run_copy(tmp_path / "run")
    sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 1, "predict": 3}
    prefix = run / "checkpoint-2" / "prefix.safetensors"
    data = bytearray(prefix.read_bytes())
    data[-5] ^= 0xFF  # same size: only the checksum tells
    prefix.write_bytes(bytes(data))
    (run / "checkpoint-3" / "prefix_config.json").write_text("[]")  # valid JSON, not what ptune wrote
    _rewrite_manifest(run / "checkpoint-3")
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted() == {"load_base": 0, "predict": 0}  # checkpoint-1's scores are reused
    failed = {f["checkpoint"]: f["error"] for f in result["failed"]}
    assert list(failed) == [str(run / "checkpoint-2"), str(run / "checkpoint-3")]
    assert failed[str(run / "checkpoint-2")].startswith(f"{prefix}: SHA-256 ")
    assert "does not match the manifest" in failed[str(run / "checkpoint-2")]
    assert failed[str(run / "checkpoint-3")] == (f"{run / 'checkpoint-3' / 'prefix_config.json'}: a JSON list, "
                                                 "expected an object; the checkpoint is damaged")
    assert [int(r["step"]) for r in read_csv(run / "sweep" / "sweep.csv")] == [1]


def replace_prefix(ckpt: Path, other: Path) -> None:
    """`ckpt`'s prefix (and the manifest that vouches for it) replaced by `other`'s, under the same name: a rewound
    run saved again, or a checkpoint copied over (rsync -a without --delete); its eval/ stays."""
    for name in ("prefix.safetensors", "prefix_config.json", "trainer_state.json", "optimizer.safetensors",
                 "manifest.json"):
        if (other / name).is_file():
            shutil.copyfile(other / name, ckpt / name)


def test_a_checkpoint_whose_prefix_was_replaced_is_scored_again(run_copy, sample_file, tmp_path, counted, caplog):
    run = run_copy(tmp_path / "run")
    common = [f"runs=[{run}]", f"data.eval_file={sample_file}"]
    sw.sweep(compose(*common))
    before = json.loads((run / "checkpoint-2" / "eval" / "metrics.json").read_text())
    assert before["prefix_sha256"] == hashlib.sha256((run / "checkpoint-2" / "prefix.safetensors").read_bytes()
                                                     ).hexdigest()
    replace_prefix(run / "checkpoint-2", run / "checkpoint-3")
    counted()
    caplog.set_level(logging.INFO, logger="ptune")
    result = sw.sweep(compose(*common))
    assert counted()["predict"] == 1 and len(result["reused"]) == 2
    assert "checkpoint-2: earlier scores differ in its prefix" in caplog.text
    after = json.loads((run / "checkpoint-2" / "eval" / "metrics.json").read_text())
    third = json.loads((run / "checkpoint-3" / "eval" / "metrics.json").read_text())
    assert after["prefix_sha256"] == third["prefix_sha256"] != before["prefix_sha256"]
    assert {k: after[k] for k in ("rouge-1", "bleu-4")} == {k: third[k] for k in ("rouge-1", "bleu-4")}


def test_a_checkpoint_saved_again_while_it_is_scored_gets_no_scores_of_the_old_prefix(run_copy, sample_file,
                                                                                        tmp_path, monkeypatch):
    run = run_copy(tmp_path / "run")
    real = ptune.evaluate.predict

    def predict(*a, **k):
        texts = real(*a, **k)
        if (run / "checkpoint-1" / "eval").is_dir() and not (run / "checkpoint-2" / "eval").is_dir():
            replace_prefix(run / "checkpoint-2", run / "checkpoint-3")  # the trainer saves it again meanwhile
        return texts
    monkeypatch.setattr(ptune.evaluate, "predict", predict)
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert [f["checkpoint"] for f in result["failed"]] == [str(run / "checkpoint-2")]
    assert "its prefix changed while it was being scored" in result["failed"][0]["error"]
    assert not (run / "checkpoint-2" / "eval").exists()
    monkeypatch.setattr(ptune.evaluate, "predict", real)
    assert not sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))["failed"]  # the next one scores it


def test_a_checkpoint_removed_while_its_scores_are_worked_out_is_not_made_again(run_copy, sample_file, tmp_path,
                                                                                 monkeypatch):
    run = run_copy(tmp_path / "run")
    real = sw.compute_metrics

    def compute_metrics(*a, **k):
        scores = real(*a, **k)
        if (run / "checkpoint-1" / "eval").is_dir():  # the second checkpoint's scoring: pruned meanwhile
            shutil.rmtree(run / "checkpoint-2", ignore_errors=True)
        return scores
    monkeypatch.setattr(sw, "compute_metrics", compute_metrics)
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert not (run / "checkpoint-2").exists()
    assert result["failed"] == [{"checkpoint": str(run / "checkpoint-2"),
                                 "error": "removed while it was being scored (keep_last of a run still training?)"}]


def test_a_run_without_a_complete_checkpoint_is_listed_and_the_others_are_ranked(run_copy, sample_file, tmp_path):
    done, saving = run_copy(tmp_path / "done"), run_copy(tmp_path / "saving")
    for ckpt in list_checkpoints(saving):
        (ckpt / "manifest.json").unlink()  # written last: a run part-way through its first save looks like this
    result = sw.sweep(compose(f"runs=[{done},{saving}]", f"data.eval_file={sample_file}"))
    assert {f["checkpoint"] for f in result["failed"]} == {str(saving / f"checkpoint-{n}") for n in (1, 2, 3)}
    assert {(r["run"], r["step"]) for r in read_csv(done / "sweep" / "sweep.csv")} == {
        (str(done), str(n)) for n in (1, 2, 3)}


def test_earlier_scores_with_generation_settings_of_another_shape_are_scored_again(run_copy, sample_file, tmp_path,
                                                                                    counted):
    run = run_copy(tmp_path / "run")
    sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    path = run / "checkpoint-1" / "eval" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "generation": None}))
    counted()
    result = sw.sweep(compose(f"runs=[{run}]", f"data.eval_file={sample_file}"))
    assert counted()["predict"] == 1 and len(result["reused"]) == 2 and not result["failed"]


def test_a_quantized_cache_folder_that_cannot_be_used_is_reported_and_the_other_runs_are_ranked(
        run_copy, sample_file, tmp_path, caplog):
    plain, quantized = run_copy(tmp_path / "float"), run_copy(tmp_path / "int8")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "README.txt").write_text("mine\n")
    recorded_as(quantized, "model", "quantization", "int8")
    recorded_as(quantized, "model", "quantization_cache", str(tmp_path / "taken"))  # holds another file
    result = sw.sweep(compose(f"runs=[{plain},{quantized}]", f"data.eval_file={sample_file}"))
    assert {f["checkpoint"] for f in result["failed"]} == {str(quantized / f"checkpoint-{n}") for n in (1, 2, 3)}
    assert all("holds README.txt" in f["error"] for f in result["failed"])
    assert len(read_csv(plain / "sweep" / "sweep.csv")) == 3
    # A cache folder that cannot be made (a file in its way): quantized all the same, scored, a warning
    (tmp_path / "file").write_text("x")
    recorded_as(quantized, "model", "quantization_cache", str(tmp_path / "file" / "cache"))
    result = sw.sweep(compose(f"runs=[{quantized}]", f"data.eval_file={sample_file}"))
    assert not result["failed"] and len(read_csv(quantized / "sweep" / "sweep.csv")) == 3
    cache = tmp_path / "file" / "cache"
    assert f"could not cache the quantized base in model.quantization_cache={cache}" in caplog.text
