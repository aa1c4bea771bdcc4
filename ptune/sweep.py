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
to `output_dir` (default `<first run>/sweep`) and names the best checkpoint for every metric, with the
checkpoints tied with it. The previous report is removed before scoring starts, so a sweep that stops early
leaves none rather than one that looks like its own. Checkpoint folders that cannot be scored, and multirun
jobs that wrote none, are listed under "Not scored"; runs whose prompts or references were built with other
settings are ranked together under a warning that names them. Ctrl-C or SIGTERM stops with one line and
exit status 130 or 143: the scores written so far are kept and reused by the next sweep (the line names any
checkpoint scored whose eval/ folder could not be written, which kept none).
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("sweep")

import csv
import gc
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from ptune import checkpoint as ckpt_io
from ptune.files import replacing, sha256_file, write_text_atomic
from ptune.chatglm.ptuning import is_reference_checkpoint
from ptune import settings
from ptune.settings import resolve_device
from ptune import evaluate as ev
from ptune import models
from ptune.data import DataError
from ptune.errors import ConfigError, QuantizationError, SweepError, exit_on_user_error, stopped
from ptune.logs import setup_logging
from ptune.metrics import SCORE_KEYS, compute_metrics

log = logging.getLogger("ptune.sweep")

METRICS_FILE = "metrics.json"


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C once scoring began; the message says what was kept."""


@dataclass
class Target:
    run: str                 # the run's label in tables and plots
    ckpt: Path               # the checkpoint folder; the job folder of a multirun job that wrote none
    step: int | None         # None: a job without checkpoints
    model: dict = field(default_factory=dict)      # base model settings: recorded, then overridden
    data: dict = field(default_factory=dict)       # data settings: recorded, then overridden
    config: dict | None = None                      # its prefix_config.json, read (once) by plan()
    metrics: dict | None = None
    error: str | None = None
    scored: bool = False     # generated in this sweep (not taken from an earlier metrics.json)
    saved: bool = False      # those scores written to its eval/metrics.json (not where eval/ could not be written)
    rows_in_file: int | None = None  # eval rows its data settings read, before the limit (set with its metrics)
    prefix_sha256: str | None = None  # its prefix when planned: scores are reused, and written, for this prefix only

    @property
    def name(self) -> str:
        return self.run if self.step is None else f"{self.run}/{self.ckpt.name}"


# --------------------------------------------------------------------------------------------- discovery

def expand_runs(runs) -> list[tuple[str, Path]]:
    """(label, folder) of every run: a folder with checkpoints, or each job folder of a multirun folder (those
    without checkpoints too, so that plan() can list them as not scored)."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not runs:
        raise SweepError("runs is empty; pass runs='[outputs/run_a,outputs/run_b]'")
    found, seen = [], set()
    for r in runs:
        label = str(r).rstrip("/") or str(r)
        path = Path(str(r)).expanduser()
        if not path.is_dir():
            raise SweepError(f"runs: {path}: no such folder")
        present = ckpt_io.checkpoint_folders(path)
        if ckpt_io.list_checkpoints(path) or (present and not any(is_reference_checkpoint(p) for p in present)):
            folders = [(label, path)]  # a run; one whose checkpoints are all incomplete is listed as not scored
        else:
            jobs = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
            if not any(ckpt_io.list_checkpoints(p) for p in jobs):
                if (path / ckpt_io.CONFIG_FILE).is_file():  # what ptune.evaluate takes: an easy slip
                    raise SweepError(f"runs: {path} is a checkpoint, not a run folder; a sweep scores every checkpoint "
                                     f"of a run: pass runs=[{path.parent}] (or score this one with python -m "
                                     f"ptune.evaluate checkpoint={path})")
                reference = [p for p in ckpt_io.checkpoint_folders(path) if is_reference_checkpoint(p)]
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
    """Every checkpoint of every run, oldest first within a run, with its effective settings.

    The merge is the one ptune.evaluate applies: what the checkpoint recorded, overridden by the
    non-null values of `cfg.model` and `cfg.data`. Incomplete checkpoint folders and multirun jobs that
    wrote no checkpoint come with the reason they cannot be scored, to be listed rather than left out.
    """
    model_overrides, data_overrides = _non_null(cfg.model), _non_null(cfg.data)
    if not data_overrides.get("eval_file"):
        raise SweepError("data.eval_file is not set; pass data.eval_file=/path/to/dev.json")
    eval_file = Path(str(data_overrides["eval_file"])).expanduser()
    if not eval_file.is_file():
        raise SweepError(f"data.eval_file={eval_file}: no such file")
    data_overrides["eval_file"] = str(eval_file.resolve())
    targets = []
    for label, run in expand_runs(cfg.runs):
        folders = ckpt_io.checkpoint_folders(run)
        if not folders:  # a multirun job that failed or was stopped before its first save
            targets.append(Target(label, run, None, error="no checkpoints written"))
        for ckpt in folders:
            missing = ckpt_io.missing_files(ckpt)
            t = Target(label, ckpt, ckpt_io.checkpoint_step(ckpt),
                       error=f"not a complete checkpoint: {', '.join(missing)} missing" if missing else None)
            if t.error is None:
                try:
                    # Checked before earlier scores are reused too: a prefix damaged since is not ranked.
                    ckpt_io.verify(ckpt, [ckpt_io.PREFIX_FILE, ckpt_io.CONFIG_FILE])
                    config = ckpt_io.read_prefix_config(ckpt)
                except ckpt_io.CheckpointError as e:
                    t.error = str(e)
                else:
                    t.config, t.prefix_sha256 = config, ev.prefix_sha256(ckpt)
                    t.model = models.inference_model_settings(config, model_overrides)
                    t.data = {**config["data"], **data_overrides}
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

    def rows_in_file(self, data: dict) -> int:
        """Rows build_eval_set reads before the limit, counted without a tokenizer (so a cached sweep loads no
        model)."""
        cols = (data["eval_file"], data["prompt_column"], data["response_column"], data.get("history_column"))
        key = json.dumps(cols)
        if key not in self._rows:
            self._rows[key] = len(ev.eval_examples(cols[0], data))
        return self._rows[key]

    def rows(self, data: dict) -> int:
        """Rows build_eval_set will keep."""
        n = self.rows_in_file(data)
        return min(self.limit, n) if self.limit else n

    def record(self, t: Target) -> dict:
        """The settings record ptune.evaluate writes too (:func:`ptune.evaluate.settings_record`)."""
        f = t.data["eval_file"]
        if f not in self._sha:
            self._sha[f] = sha256_file(Path(f))
        limit = ev.effective_limit(self.limit, self.rows_in_file(t.data))
        return ev.settings_record(t.data, t.model, limit, self.device, eval_sha256=self._sha[f], prefix=t.prefix_sha256)

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
        generation = old.get("generation")
        if old.get("prefix_sha256") != t.prefix_sha256:
            why = "its prefix (replaced since, or scored before metrics.json recorded it)"
        elif Path(str(old.get("eval_file", ""))).expanduser().resolve() != Path(t.data["eval_file"]):
            why = f"eval file {old.get('eval_file')}"
        elif not isinstance(generation, dict) or any(generation.get(k) != v for k, v in self.gen.items()):
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


REMOVED = "removed while it was being scored (keep_last of a run still training?)"


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
    except (models.ModelError, QuantizationError) as e:
        for t in targets:
            skip(t, str(e), bar)
        return
    lm, evalsets = None, {}
    for t in targets:
        start = time.perf_counter()
        try:
            lm = models.attach_checkpoint(base, t.ckpt, prefix_lm=lm, config=t.config)
        except ckpt_io.CheckpointError as e:
            skip(t, str(e), bar)
            continue
        template = t.model.get("template")
        key = json.dumps([template, t.data], sort_keys=True)
        try:
            if key not in evalsets:
                evalsets[key] = ev.build_eval_set(ev.eval_examples(t.data["eval_file"], t.data), tokenizer, t.data,
                                                  template, cfg.limit)
        except DataError as e:
            skip(t, data_error(e), bar)
            continue
        except ConfigError as e:  # a template this base's tokenizer lacks: other bases may have it
            skip(t, str(e), bar)
            continue
        evalset = evalsets[key]
        try:
            texts, stats = ev.predict(lm, tokenizer, evalset.prompts, cfg.generation, cfg.batch_size, device,
                                      progress=False)
        except ConfigError as e:  # a setting this base cannot take (its positions, its vocabulary): other bases can
            skip(t, str(e), bar)
            continue
        metrics = compute_metrics(texts, evalset.labels)
        # A run still training may have removed it (keep_last) or saved it again meanwhile: writing would bring it
        # back, or put this prefix's scores beside another prefix.
        if not t.ckpt.is_dir():
            skip(t, REMOVED, bar)
            continue
        if ev.prefix_sha256(t.ckpt) != t.prefix_sha256:
            skip(t, "its prefix changed while it was being scored (saved again by a run still training?); the next "
                    "sweep scores it", bar)
            continue
        t.metrics, t.rows_in_file = metrics, evalset.rows_in_file
        try:
            ev.write_results(t.ckpt / "eval", evalset, texts, t.metrics,
                             {"generation": {**expected.gen, **stats}, "checkpoint": str(t.ckpt),
                              "eval_file": t.data["eval_file"], **expected.record(t)}, parents=False)
            t.saved = True
        except FileNotFoundError:  # removed in the moment since
            t.metrics = None
            skip(t, REMOVED, bar)
            continue
        except OSError as e:  # a run on read-only storage: the scores made are still ranked
            log.warning("%s: could not write %s (%s); its scores are in this sweep's report only, and the next sweep "
                        "scores it again", t.name, t.ckpt / "eval", e)
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
        return Path(str(cfg.output_dir)).expanduser()
    runs = cfg.runs if isinstance(cfg.runs, (list, ListConfig)) else [cfg.runs]
    if not runs:
        raise SweepError("runs is empty; pass runs='[outputs/run_a,outputs/run_b]'")
    return Path(str(runs[0])).expanduser() / "sweep"


REPORT_FILES = ("sweep.md", "sweep.csv", "sweep.png")


def remove_report(out: Path) -> list[str]:
    """Delete the report files (and temporaries a stopped writer left); returns the names of those that were there.

    Done before scoring: a sweep that fails or is interrupted part-way then leaves no report, never the previous
    one standing as if it described this sweep. The scores it would have been built from stay in each
    checkpoint's eval/metrics.json (where eval/ could be written), so the next sweep rebuilds it without generating
    again."""
    if not out.is_dir():
        return []
    removed = [name for name in REPORT_FILES if (out / name).is_file()]
    for name in removed:
        (out / name).unlink()
    for tmp in out.glob(".sweep.*.tmp"):
        tmp.unlink(missing_ok=True)
    return removed


def sweep(cfg: DictConfig) -> dict:
    """Score all checkpoints, write the comparison files; returns rows, best per metric and failures."""
    settings.sweep(cfg)
    device = resolve_device(cfg.device)
    out = output_dir(cfg)
    targets = plan(cfg)
    settings.check_writable(out, "output_dir" if cfg.output_dir else None)
    removed = remove_report(out)  # only now: a sweep refused at start-up leaves the last report alone
    if removed:
        log.info("removed the previous report (%s) from %s; this sweep writes it anew", ", ".join(removed), out)
    try:
        score_all(targets, cfg, device)
        return report(targets, cfg, out)
    except KeyboardInterrupt:
        remove_report(out)  # a report cut off part-way would describe part of this sweep
        raise SweepInterrupted(interrupted(targets)) from None


def score_all(targets: list[Target], cfg: DictConfig, device: torch.device) -> None:
    """Take earlier scores where they match, then score the rest, one base load per distinct base."""
    expected = Expected(cfg, device)
    bar = tqdm(total=len(targets), desc="sweep", unit="ckpt", disable=not cfg.progress_bar)
    try:
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
                t.metrics, t.rows_in_file = old, expected.rows_in_file(t.data)  # counted already by reusable()
                log.info("%s: already scored, %s (force=true scores it again)", t.name, _scores(old))
                bar.update(1)
            else:
                groups.setdefault(base_key(t, device), []).append(t)
        if len(groups) > 1:
            log.info("checkpoints use %d different base models; loading each once", len(groups))
        for group in groups.values():
            score_group(group, cfg, device, expected, bar)
    finally:
        bar.close()  # an interrupted bar's line is finished before the message that follows it


def interrupted(targets: list[Target]) -> str:
    """What an interrupted sweep kept. evaluate's write_results replaces metrics.json whole, and removes the old one
    before it writes the predictions, so a checkpoint cut off mid-write has none and is scored again. A checkpoint
    whose eval/ could not be written kept nothing either: it is named, not counted among those kept."""
    scored = [t for t in targets if t.scored]
    if not scored:
        return "no checkpoint was scored in this sweep; no report was written"
    kept, lost = sum(t.saved for t in scored), [t.name for t in scored if not t.saved]
    said = []
    if kept:
        said.append(f"the {kept} checkpoint(s) scored before the interrupt keep their scores in eval/metrics.json, "
                    "which the next sweep with the same settings reuses")
    if lost:
        who = f"{len(lost)} other checkpoint(s) scored" if kept else \
            f"the {len(lost)} checkpoint(s) scored before the interrupt"
        said.append(f"{who} keep no scores, as their eval/ folder could not be written ({', '.join(lost)}), and the "
                    "next sweep scores them again")
    return "; ".join(said + ["no report was written"])


def report(targets: list[Target], cfg: DictConfig, out: Path) -> dict:
    """Write sweep.csv, sweep.md and sweep.png, print the summary; returns what sweep() returns."""
    rows = [{"run": t.run, "step": t.step, "checkpoint": str(t.ckpt), "name": t.name,
             **{k: float(t.metrics[k]) for k in SCORE_KEYS}} for t in targets if t.metrics is not None]
    failed = [{"checkpoint": str(t.ckpt), "error": t.error} for t in targets if t.error]
    if not rows:
        raise SweepError("no checkpoint could be scored:\n" + "\n".join(f"  {f['checkpoint']}: {f['error']}"
                                                                       for f in failed))
    best = best_per_metric(rows)
    warnings = setting_differences([t for t in targets if t.metrics is not None])
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", rows)
    write_markdown(out / "sweep.md", rows, best, failed, warnings, cfg, targets)
    plot(out / "sweep.png", rows)
    print(ev.format_table(rows))
    for w in warnings:
        print(f"WARNING {w}")
    for k, (r, *tied) in best.items():
        ties = ", tied with " + ", ".join(o["name"] for o in tied) if tied else ""
        print(f"best {k}: {r['name']} ({r[k]:.4f}){ties}")
    for f in failed:
        print(f"FAILED {f['checkpoint']}: {f['error']}")
    log.info("%d checkpoint(s) scored, %d reused, %d not scored; wrote %s", sum(t.scored for t in targets),
             sum(t.metrics is not None and not t.scored for t in targets), len(failed), out)
    return {"rows": rows, "best": {k: tied[0] for k, tied in best.items()},
            "tied": {k: [r["name"] for r in tied[1:]] for k, tied in best.items()},
            "warnings": warnings, "failed": failed, "output_dir": out,
            "scored": [t.name for t in targets if t.scored],
            "reused": [t.name for t in targets if t.metrics is not None and not t.scored]}


# Scores are compared as the report shows them: a difference it does not show is no reason to name one of two.
TIE_DECIMALS = 4


def best_per_metric(rows: list[dict]) -> dict[str, list[dict]]:
    """For each metric, the rows with the best score; the one named best first: the fewest steps (the cheapest
    checkpoint to train), then the run listed first."""
    best = {}
    for k in SCORE_KEYS:
        top = max(round(r[k], TIE_DECIMALS) for r in rows)
        best[k] = sorted((r for r in rows if round(r[k], TIE_DECIMALS) == top), key=lambda r: r["step"])
    return best


# Settings that build the prompts a checkpoint is scored on and the references its replies are scored against.
# Runs that differ in one were not scored on the same task: ranking them together is the user's call, so it is
# done, but said. The base model is not among them: comparing bases is what a sweep across them is for.
SCORING_SETTINGS = ("data.prompt_column", "data.response_column", "data.history_column", "data.max_source_length",
                    "data.max_target_length", "data.truncate_source_from", "model.template")
# A value a checkpoint may not record, as ptune.evaluate.build_eval_set reads it then.
_DEFAULTS = {"data.truncate_source_from": "right"}


def setting_differences(targets: list[Target]) -> list[str]:
    """One line per scoring setting whose effective value differs between the ranked runs."""
    lines = []
    for key in SCORING_SETTINGS:
        section, name = key.split(".")
        runs_by_value: dict[str, list[str]] = {}
        for t in targets:
            value = getattr(t, section).get(name, _DEFAULTS.get(key))
            runs = runs_by_value.setdefault("null" if value is None else str(value), [])
            if t.run not in runs:
                runs.append(t.run)
        if len(runs_by_value) > 1:
            values = "; ".join(f"{value} in {', '.join(runs)}" for value, runs in runs_by_value.items())
            lines.append(f"runs differ in {key} ({values}), which shapes the prompts or references they are scored "
                         f"on: their scores are ranked together but do not measure the same task; {key}=<value> "
                         "scores them all alike")
    return lines


# ---------------------------------------------------------------------------------------------- reports

def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["run", "step", *SCORE_KEYS, "checkpoint"])
    for r in rows:
        w.writerow([r["run"], r["step"], *(f"{r[k]:.4f}" for k in SCORE_KEYS), r["checkpoint"]])
    write_text_atomic(path, text.getvalue())


def write_markdown(path: Path, rows, best, failed, warnings, cfg: DictConfig, targets: list[Target]) -> None:
    gen = OmegaConf.to_container(cfg.generation, resolve=True)
    eval_files = sorted({t.data["eval_file"] for t in targets if t.data})
    lines = ["# Checkpoint sweep", "",
             f"Eval file: {', '.join(eval_files)} ({rows_scored(targets)})", "",
             "Generation: " + ", ".join(f"{k}={v}" for k, v in gen.items()), ""]
    for w in warnings:
        lines += [f"**Warning**: {w}", ""]
    lines += [ev.format_table(rows), "", "## Best checkpoint per metric", ""]
    lines += [f"- **{k}**: {_best_line(k, tied)}" for k, tied in best.items()]
    if any(len(tied) > 1 for tied in best.values()):
        lines += ["", f"Scores equal to {TIE_DECIMALS} decimals are tied: the checkpoint with the fewest steps is "
                      "named (then the run listed first), followed by the others."]
    if failed:
        lines += ["", "## Not scored", ""] + [f"- {f['checkpoint']}: {f['error']}" for f in failed]
    write_text_atomic(path, "\n".join(lines) + "\n")


def rows_scored(targets: list[Target]) -> str:
    """The eval rows the ranked checkpoints were scored on, as "all 64 rows" or "first 5 of 64 rows": the limit
    alone would claim rows a shorter file does not have. Said per run where runs differ (rows with an empty prompt
    or response under a run's columns are not read)."""
    runs_by_rows: dict[str, list[str]] = {}
    for t in targets:
        if t.metrics is None:
            continue
        n = t.metrics["num_samples"]
        said = f"all {n} rows" if n >= t.rows_in_file else f"first {n} of {t.rows_in_file} rows"
        runs = runs_by_rows.setdefault(said, [])
        if t.run not in runs:
            runs.append(t.run)
    if len(runs_by_rows) == 1:
        return next(iter(runs_by_rows))
    return "; ".join(f"{said} in {', '.join(runs)}" for said, runs in runs_by_rows.items())


def _best_line(key: str, tied: list[dict]) -> str:
    r, *others = tied
    line = f"{r['name']} (step {r['step']}): {r[key]:.4f}"
    return line + ("; tied with " + ", ".join(f"{o['name']} (step {o['step']})" for o in others) if others else "")


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
    # Lines and labels named, not gathered: matplotlib leaves a line whose label starts with "_" out of a legend it
    # gathers, and a run given as a relative folder (runs=[_a]) is labelled so.
    fig.legend(axes[0].get_lines(), runs, loc="outside lower center", ncol=min(len(runs), 3), fontsize="small")
    with replacing(path) as tmp:  # whole, like the tables beside it
        fig.savefig(tmp, dpi=100, format="png")


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        result = sweep(cfg)
    except SweepInterrupted as e:
        stopped(f"sweep interrupted: {e}")
    except KeyboardInterrupt:
        stopped("sweep interrupted before scoring began; nothing was changed")
    if result["failed"]:
        raise SystemExit(f"error: {len(result['failed'])} checkpoint(s) or job(s) not scored; see above")

