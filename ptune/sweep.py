"""Score every checkpoint of one or more runs and compare them.

    python -m ptune.sweep runs='[outputs/a,outputs/b]' data.eval_file=dev.json

Each run folder's complete `checkpoint-N` folders are evaluated with ptune.evaluate's own functions; a
Hydra multirun folder (job folders 0/, 1/, ... holding checkpoints) stands for all its jobs. The base
model is loaded once per distinct base (path, dtype, attention, remote code) and only the prefix
weights are swapped between checkpoints; checkpoints trained on another base are grouped and scored
with that base, loaded once in turn. A checkpoint whose `eval/metrics.json` (written by an earlier sweep
or by ptune.evaluate, in one layout) records the same eval file contents, data, model and generation
settings is not generated again unless `force=true`.

Writes `sweep.md`, `sweep.csv` and `sweep.png` (one subplot per metric against step, one line per run)
to `output_dir` (default `<first run>/sweep`) and names the best checkpoint for every metric.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from ptune import checkpoint as ckpt_io
from ptune.checkpoint import sha256_file, write_text_atomic
from ptune.chatglm.ptuning import is_reference_checkpoint
from ptune.config import refuse_added_settings, resolve_device
from ptune import evaluate as ev
from ptune import models
from ptune.data import Columns, DataError, load_examples
from ptune.errors import exit_on_user_error
from ptune.logs import setup_logging
from ptune.metrics import SCORE_KEYS

log = logging.getLogger("ptune.sweep")

METRICS_FILE = "metrics.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


class SweepError(ValueError):
    """A sweep that cannot start: no runs, no eval file, a run folder without checkpoints."""


@dataclass
class Target:
    run: str                 # the run's label in tables and plots
    ckpt: Path
    step: int
    model: dict = field(default_factory=dict)      # base model settings: recorded, then overridden
    data: dict = field(default_factory=dict)       # data settings: recorded, then overridden
    metrics: dict | None = None
    error: str | None = None
    scored: bool = False     # generated in this sweep (not taken from an earlier metrics.json)

    @property
    def name(self) -> str:
        return f"{self.run}/{self.ckpt.name}"


# --------------------------------------------------------------------------------------------- discovery

def expand_runs(runs) -> list[tuple[str, Path]]:
    """(label, folder) of every run: a folder with checkpoints, or each job folder of a multirun folder."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not runs:
        raise SweepError("config error: runs is empty; pass runs='[outputs/run_a,outputs/run_b]'")
    found, seen = [], set()
    for r in runs:
        label = str(r).rstrip("/") or str(r)
        path = Path(str(r)).expanduser()
        if not path.is_dir():
            raise SweepError(f"runs: {path}: no such folder")
        if ckpt_io.list_checkpoints(path):
            folders = [(label, path)]
        else:
            jobs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()
                           and ckpt_io.list_checkpoints(p)), key=lambda p: int(p.name))
            if not jobs:
                reference = sorted(p for p in path.iterdir() if _STEP.match(p.name) and is_reference_checkpoint(p))
                if reference:
                    raise SweepError(
                        f"runs: {path} holds ChatGLM ptuning-script checkpoints ({reference[0].name}, ...), which "
                        "record no base model or data settings; import each first: python -m ptune.chatglm.ptuning "
                        f"import {reference[0]} <run dir> --base /path/to/chatglm2-6b, then sweep <run dir>")
                raise SweepError(f"runs: {path} holds no complete checkpoint-N folder, nor multirun job folders "
                                 "(0/, 1/, ...) that do")
            folders = [(f"{label}/{p.name}", p) for p in jobs]
        for lab, p in folders:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                found.append((lab, p))
    return found


def _non_null(section) -> dict:
    return {k: v for k, v in OmegaConf.to_container(section, resolve=True).items() if v is not None}


def plan(cfg: DictConfig) -> list[Target]:
    """Every complete checkpoint of every run, oldest first within a run, with its effective settings.

    The merge is the one ptune.evaluate applies: what the checkpoint recorded, overridden by the
    non-null values of `cfg.model` and `cfg.data`.
    """
    model_overrides, data_overrides = _non_null(cfg.model), _non_null(cfg.data)
    if not data_overrides.get("eval_file"):
        raise SweepError("config error: data.eval_file is not set; pass data.eval_file=/path/to/dev.json")
    eval_file = Path(str(data_overrides["eval_file"])).expanduser()
    if not eval_file.is_file():
        raise SweepError(f"data.eval_file={eval_file}: no such file")
    data_overrides["eval_file"] = str(eval_file.resolve())
    targets = []
    for label, run in expand_runs(cfg.runs):
        for ckpt in ckpt_io.list_checkpoints(run):
            t = Target(label, ckpt, int(_STEP.match(ckpt.name).group(1)))
            try:
                config = ckpt_io.read_prefix_config(ckpt)
                t.model = models.inference_model_settings(config, model_overrides)
                t.data = {**config.get("data", {}), **data_overrides}
            except (ckpt_io.CheckpointError, ValueError, KeyError) as e:
                t.error = f"{ckpt}: unreadable prefix_config.json ({type(e).__name__}: {e})"
            targets.append(t)
    return targets


def base_key(t: Target, device: torch.device) -> str:
    """What makes two checkpoints share one loaded base model (the template only shapes the prompts)."""
    return json.dumps(models.base_identity_settings(t.model, device), sort_keys=True)


# ------------------------------------------------------------------------------------------- freshness

class Expected:
    """What an earlier metrics.json must match to be reused: eval file, generation, row count, settings."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.gen = OmegaConf.to_container(cfg.generation, resolve=True)
        self.limit = cfg.limit
        self.device = device
        self._rows: dict[str, int] = {}
        self._sha: dict[str, str] = {}

    def rows(self, data: dict) -> int:
        """Rows build_eval_set will keep, counted without a tokenizer (so a cached sweep loads no model)."""
        cols = (data["eval_file"], data["prompt_column"], data["response_column"], data.get("history_column"))
        key = json.dumps(cols)
        if key not in self._rows:
            self._rows[key] = len(load_examples(cols[0], Columns(*cols[1:])))
        n = self._rows[key]
        return min(self.limit, n) if self.limit else n

    def record(self, t: Target) -> dict:
        """The settings record ptune.evaluate writes too (:func:`ptune.evaluate.settings_record`)."""
        f = t.data["eval_file"]
        if f not in self._sha:
            self._sha[f] = sha256_file(Path(f))
        return ev.settings_record(t.data, t.model, self.limit, self.device, eval_sha256=self._sha[f])

    def reusable(self, t: Target) -> dict | None:
        path = t.ckpt / "eval" / METRICS_FILE
        if not path.is_file():
            return None
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if not isinstance(old, dict):
            return None
        # files a sweep wrote before it shared ptune.evaluate's layout keep the record under "sweep"
        recorded = old["sweep"] if isinstance(old.get("sweep"), dict) else old
        why = None
        if Path(str(old.get("eval_file", ""))).expanduser().resolve() != Path(t.data["eval_file"]):
            why = f"eval file {old.get('eval_file')}"
        elif any(old.get("generation", {}).get(k) != v for k, v in self.gen.items()):
            why = "generation settings"
        elif old.get("num_samples") != self.rows(t.data):
            why = f"{old.get('num_samples')} rows"
        elif any(recorded.get(k) != v for k, v in self.record(t).items()):
            why = "data, model or eval file contents"
        elif not all(isinstance(old.get(k), (int, float)) for k in SCORE_KEYS):
            why = "missing scores"
        if why:
            log.info("%s: earlier scores differ in %s; scoring again", t.name, why)
            return None
        return old


# ---------------------------------------------------------------------------------------------- scoring

def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def skip(t: Target, error: str, bar) -> None:
    """A checkpoint that cannot be scored: reported under "Not scored", the sweep goes on."""
    t.error = error
    log.error("%s: skipped: %s", t.name, error)
    bar.update(1)


def data_error(e: DataError) -> str:
    return f"{e} (the run's recorded data settings; data.prompt_column= and the like override them)"


def score_group(targets: list[Target], cfg: DictConfig, device: torch.device, expected: Expected, bar) -> None:
    """Load the group's base once, then attach, generate and score each checkpoint in turn."""
    model_cfg = OmegaConf.create(targets[0].model)
    try:
        base, tokenizer, _ = models.load_for_inference(None, model_cfg, device)
    except models.ModelError as e:
        for t in targets:
            skip(t, str(e), bar)
        return
    lm, evalsets = None, {}
    for t in targets:
        start = time.perf_counter()
        try:
            lm = models.attach_checkpoint(base, t.ckpt, prefix_lm=lm)
        except ckpt_io.CheckpointError as e:
            skip(t, str(e), bar)
            continue
        template = t.model.get("template")
        key = json.dumps([template, t.data], sort_keys=True)
        try:
            if key not in evalsets:
                evalsets[key] = ev.build_eval_set(t.data["eval_file"], tokenizer, t.data, template, cfg.limit)
        except DataError as e:
            skip(t, data_error(e), bar)
            continue
        evalset = evalsets[key]
        texts, stats = ev.predict(lm, tokenizer, evalset.prompts, cfg.generation, cfg.batch_size, device,
                                  progress=False)
        t.metrics = ev.score(texts, evalset.labels)
        ev.write_results(t.ckpt / "eval", evalset, texts, t.metrics,
                         {"generation": {**expected.gen, **stats}, "checkpoint": str(t.ckpt),
                          "eval_file": t.data["eval_file"], **expected.record(t)})
        t.scored = True
        log.info("%s: %s (%d rows, %.1f s, %s tokens/s)", t.name, _scores(t.metrics), len(texts),
                 time.perf_counter() - start, stats["tokens_per_s"])
        bar.update(1)
    del base, lm, evalsets
    _release_memory()  # before the next group's base is loaded


def _scores(m: dict) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in SCORE_KEYS)


def output_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(str(cfg.output_dir))
    runs = cfg.runs if isinstance(cfg.runs, (list, ListConfig)) else [cfg.runs]
    if not runs:
        raise SweepError("config error: runs is empty; pass runs='[outputs/run_a,outputs/run_b]'")
    return Path(str(runs[0])).expanduser() / "sweep"


def sweep(cfg: DictConfig) -> dict:
    """Score all checkpoints, write the comparison files; returns rows, best per metric and failures."""
    ev.check_settings(cfg)
    device = resolve_device(cfg.device)
    out = output_dir(cfg)
    targets = plan(cfg)
    expected = Expected(cfg, device)
    bar = tqdm(total=len(targets), desc="sweep", unit="ckpt", disable=not cfg.progress_bar)
    groups: dict[str, list[Target]] = {}
    for t in targets:
        if t.error:
            skip(t, t.error, bar)
            continue
        try:
            old = None if cfg.force else expected.reusable(t)
        except DataError as e:  # the eval file lacks a column this run's data settings name
            skip(t, data_error(e), bar)
            continue
        if old is not None:
            t.metrics = old
            log.info("%s: already scored, %s (force=true scores it again)", t.name, _scores(old))
            bar.update(1)
        else:
            groups.setdefault(base_key(t, device), []).append(t)
    if len(groups) > 1:
        log.info("checkpoints use %d different base models; loading each once", len(groups))
    for group in groups.values():
        score_group(group, cfg, device, expected, bar)
    bar.close()

    rows = [{"run": t.run, "step": t.step, "checkpoint": str(t.ckpt), "name": t.name,
             **{k: float(t.metrics[k]) for k in SCORE_KEYS}} for t in targets if t.metrics is not None]
    failed = [{"checkpoint": str(t.ckpt), "error": t.error} for t in targets if t.error]
    if not rows:
        raise SweepError("no checkpoint could be scored:\n" + "\n".join(f"  {f['error']}" for f in failed))
    best = {k: max(rows, key=lambda r: r[k]) for k in SCORE_KEYS}  # max keeps the first of equal scores
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", rows)
    write_markdown(out / "sweep.md", rows, best, failed, cfg, targets)
    plot(out / "sweep.png", rows)
    print(ev.format_table(rows))
    for k, r in best.items():
        print(f"best {k}: {r['name']} ({r[k]:.4f})")
    for f in failed:
        print(f"FAILED {f['checkpoint']}: {f['error']}")
    log.info("%d checkpoints: %d scored, %d reused, %d failed; wrote %s", len(targets),
             sum(t.scored for t in targets), sum(t.metrics is not None and not t.scored for t in targets),
             len(failed), out)
    return {"rows": rows, "best": best, "failed": failed, "output_dir": out,
            "scored": [t.name for t in targets if t.scored],
            "reused": [t.name for t in targets if t.metrics is not None and not t.scored]}


# ---------------------------------------------------------------------------------------------- reports

def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["run", "step", *SCORE_KEYS, "checkpoint"])
    for r in rows:
        w.writerow([r["run"], r["step"], *(f"{r[k]:.4f}" for k in SCORE_KEYS), r["checkpoint"]])
    write_text_atomic(path, text.getvalue())


def write_markdown(path: Path, rows, best, failed, cfg: DictConfig, targets: list[Target]) -> None:
    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    eval_files = sorted({t.data["eval_file"] for t in targets if t.data})
    lines = ["# Checkpoint sweep", "",
             f"Eval file: {', '.join(eval_files)}" + (f" (first {cfg.limit} rows)" if cfg.limit else ""), "",
             "Generation: " + ", ".join(f"{k}={v}" for k, v in gen.items()), "",
             ev.format_table(rows), "", "## Best checkpoint per metric", ""]
    lines += [f"- **{k}**: {r['name']} (step {r['step']}): {r[k]:.4f}" for k, r in best.items()]
    if failed:
        lines += ["", "## Not scored", ""] + [f"- {f['checkpoint']}: {f['error']}" for f in failed]
    write_text_atomic(path, "\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict]) -> None:
    """One subplot per metric against step, one line per run; Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, key in zip(axes, SCORE_KEYS):
        for run in runs:
            pts = sorted((r["step"], r[key]) for r in rows if r["run"] == run)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(runs), 3), fontsize="small")
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)  # whole, like the tables beside it


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    refuse_added_settings(cfg)
    setup_logging()
    try:
        result = sweep(cfg)
    except SweepError as e:
        raise SystemExit(str(e)) from None
    if result["failed"]:
        raise SystemExit(f"{len(result['failed'])} checkpoint(s) could not be scored; see above")


if __name__ == "__main__":
    main()
