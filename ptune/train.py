"""P-Tuning v2 training: `python -m ptune.train +experiment=adgen_60steps [key=value ...]`.

Also `torchrun --nproc_per_node N -m ptune.train ...`: every rank takes its share of each global batch,
prefix gradients are summed across ranks, and rank 0 alone writes checkpoints and logs.
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("train")

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ptune import checkpoint as ckpt_io
from ptune import settings
from ptune.config import made_for_this_run, no_run_folder_if_refused, not_made_for_this_run, override_key
from ptune.data import BatchPlan, IGNORE, collate, training_rows
from ptune.errors import TrainingError, exit_on_user_error, first_line
from ptune.files import FolderInUse, held_folder, hold_for_this_process, sha256_file, write_text_atomic
from ptune.fit import Prober, agree_across_ranks, choose_split, fastest
from ptune.graphs import micro_batch_loss
from ptune.logs import LogWindow, MetricsLog, setup_logging
from ptune.loss import output_softcap
from ptune.step import optimizer_step
from ptune.models import (base_identity, build_prefix, check_fits, check_vocabulary, learned_positions,
                          load_model, load_tokenizer)
from ptune.prefix import PrefixLM, compile_layers

log = logging.getLogger("ptune.train")


def lr_at(step: int, optim, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then linear decay or constant."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "linear":
        span = max(1, max_steps - optim.warmup_steps)
        return optim.lr * max(0.0, 1 - (step - optim.warmup_steps) / span)
    raise ValueError(f"optim.schedule={optim.schedule!r}: expected linear or constant")


def run_dir(accelerator: Accelerator) -> Path:
    """Hydra's output folder for this job, as rank 0 sees it (ranks may resolve ${now} a second apart)."""
    mine = Path(HydraConfig.get().runtime.output_dir)
    chosen = [str(mine)]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(chosen, src=0)
    chosen = Path(chosen[0])
    if chosen != mine and mine.is_dir() and not any(mine.iterdir()):
        mine.rmdir()
    return chosen


@contextmanager
def run_folder_held(out: Path, accelerator: Accelerator):
    """Rank 0 holds the run folder for the run: a second training given the same folder, or the same dated default
    folder (started within the same second), is refused rather than mixing its checkpoints and log lines in. A
    multirun holds its hydra.sweep.dir too, for all its jobs: another multirun there (two started in the same
    second) would take turns with it job by job, each grid's jobs among the other's."""
    with contextlib.ExitStack() as stack:
        busy = [None]
        sweep = Path(HydraConfig.get().sweep.dir).resolve() if multirun() else None
        if accelerator.is_main_process:
            try:
                if sweep is not None and sweep != out.resolve():  # (a job folder may be the sweep's own: subdir=.)
                    hold_for_this_process(sweep)
                stack.enter_context(held_folder(out))
            except FolderInUse as e:
                busy = [str(e)]
        if accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(busy, src=0)
        if busy[0] is not None:
            not_made_for_this_run(out)  # the other run's folder, even where this one made it a moment earlier
            what = "multirun" if sweep is not None and Path(busy[0]).resolve() == sweep else "training"
            raise TrainingError(f"{busy[0]}: another {what} is writing to this folder now; wait for it to end, or "
                                f"give another {folder_setting()}")
        yield


@contextmanager
def writing(path: Path, after=None):
    """An OSError while writing one of the run's files (a read-only output_dir, a full disk) as the one line of a
    TrainingError naming the file, instead of a traceback; `after()` says what to do about it mid-run."""
    try:
        yield
    except OSError as e:
        raise TrainingError(f"could not write {path}: {e.strerror or e}{after() if after else ''}") from None


def refuse_output_dir_in_multirun(cfg: DictConfig) -> None:
    """Under -m each job writes to <hydra.sweep.dir>/<job number>: an output_dir given would be silently unused."""
    if not multirun():
        return
    hc = HydraConfig.get()
    if "output_dir" in {override_key(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)}:
        raise TrainingError(f"output_dir={cfg.output_dir}: a multirun (-m) writes each job to hydra.sweep.dir/<job "
                            f"number> ({hc.sweep.dir}/0, /1, ...), not to output_dir; pass "
                            f"hydra.sweep.dir={os.path.expanduser(str(cfg.output_dir))} instead")


def multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def folder_setting() -> str:
    """The setting that chooses the run's folder: output_dir, or under -m the multirun's hydra.sweep.dir."""
    return "hydra.sweep.dir" if multirun() else "output_dir"


def go_on_with(out: Path) -> str:
    """The settings that continue this run: its folder; under -m, the multirun's (each job goes on in its own
    numbered folder, given the same settings)."""
    if multirun():
        return f"resume=latest hydra.sweep.dir={HydraConfig.get().sweep.dir} and the multirun's other settings"
    return f"resume=latest output_dir={out}"


def steadier(cfg: DictConfig, dtype: torch.dtype) -> list[str]:
    """The settings that would make a run that went non-finite steadier, leaving out those already in effect."""
    ways = [f"a lower optim.lr (now {cfg.optim.lr:g})"]
    if not cfg.optim.max_grad_norm or cfg.optim.max_grad_norm > 1.0:
        ways.append("optim.max_grad_norm=1.0")
    if dtype == torch.float16:
        ways.append("model.dtype=bfloat16 instead of float16")
    return ways


def last_kept(out: Path) -> str:
    """What a run stopped by an error leaves to go on from, for its error line."""
    if ckpt_io.latest_checkpoint(out) is None:
        return f"no checkpoint was written to {out} yet"
    return f"the last checkpoint in {out} is intact"


def out_of_memory(cfg: DictConfig, step: int, error: Exception, batches: list[dict], global_batch: int, out: Path,
                  recomputed: int, num_layers: int) -> str:
    """The error line of a step that ran out of memory: its micro-batches, and the settings that would fit one."""
    rows, longest = max(len(b["input_ids"]) for b in batches), max(b["input_ids"].shape[1] for b in batches)
    reason = first_line(error)
    return (f"step {step}: out of memory on micro-batches of up to {rows} rows of {longest} tokens ({reason}); "
            f"{last_kept(out)}. Try " + ", ".join(smaller_step(cfg, rows, global_batch, recomputed, num_layers))
            + (f"; then go on with {go_on_with(out)}" if ckpt_io.latest_checkpoint(out) else ""))


def smaller_step(cfg: DictConfig, rows: int, global_batch: int, recomputed: int, num_layers: int) -> list[str]:
    """The settings that would make a training step that ran out of memory smaller, leaving out those already
    at their least."""
    t = cfg.trainer
    if t.auto_micro_batch_gib is not None:
        # The split was measured to peak under the ceiling: recomputing more, shorter rows or a smaller base would
        # only let it take more rows up to the same peak. Other processes may hold part of the device.
        return [f"a lower trainer.auto_micro_batch_gib than {t.auto_micro_batch_gib}",
                "or free the device's memory (other processes may hold part of it)"]
    ways = []
    if rows > 1:
        ways.append(f"a lower trainer.per_device_batch_size (and a higher trainer.gradient_accumulation_steps to keep "
                    f"the global batch of {global_batch})")
    if recomputed < num_layers:
        ways.append("trainer.gradient_checkpointing=true")
    if rows > 1:
        ways.append("trainer.auto_micro_batch_gib=<GiB> to pick the split that fits")
    ways.append(f"shorter rows (data.max_source_length={cfg.data.max_source_length}, "
                f"data.max_target_length={cfg.data.max_target_length})")
    if cfg.model.get("quantization") != "int4":
        ways.append("a quantized base (model.quantization=" + ("int4" if cfg.model.get("quantization") else "int8 or int4") + ")")
    ways.append("or a device with more memory")
    return ways


def resumed_optimizer_settings(optimizer: torch.optim.Optimizer, optim_cfg, resume_from: Path) -> None:
    """A resumed optimizer keeps its moments but takes this run's betas, eps and weight decay (the learning rate is
    set every step); load_state_dict would bring back the checkpoint's, while config.yaml shows this run's."""
    wanted = {"betas": tuple(optim_cfg.betas), "eps": optim_cfg.eps, "weight_decay": optim_cfg.weight_decay}
    for group in optimizer.param_groups:
        had = {**group, "betas": tuple(group["betas"])}  # a list once read back from the checkpoint
        changed = [f"{k} {had[k]} -> {v}" for k, v in wanted.items() if had[k] != v]
        if changed:
            log.info("resume=%s: optimizer %s", resume_from, ", ".join(changed))
        group.update(wanted)


def find_resume(resume, out: Path) -> Path | None:
    if resume in (None, "", False):
        return None
    if resume == "latest":
        found = ckpt_io.latest_checkpoint(out)
        if found is None and made_for_this_run(out):  # a dated default, a typo: nothing earlier can be there
            log.warning("resume=latest: %s was made just now for this run, so there is no checkpoint to go on from; "
                        "starting fresh. To continue a run, give its folder (output_dir=, or hydra.sweep.dir= for a "
                        "multirun)", out)
        elif found is None:
            log.info("resume=latest: no complete checkpoint in %s, starting fresh", out)
        return found
    path = Path(str(resume)).expanduser()
    if not path.is_dir():
        raise TrainingError(f"resume={resume}: no such folder; expected latest, or a checkpoint-N folder")
    newest = ckpt_io.latest_checkpoint(path)
    if not (path / ckpt_io.CONFIG_FILE).exists() and newest is not None:  # a run folder, as evaluate and chat take it
        log.info("resume=%s is a run folder: going on from its newest complete checkpoint, %s", resume, newest.name)
        return newest
    if not ckpt_io.is_complete(path):
        raise TrainingError(f"resume={resume}: not a complete ptune checkpoint folder (prefix.safetensors, "
                            "prefix_config.json and manifest.json)")
    return path


def recompute_setting(t: DictConfig, num_layers: int) -> int | str:
    """trainer.gradient_checkpointing (already checked by check_settings) as a number of decoder layers to
    recompute, or "auto"."""
    value = t.gradient_checkpointing
    if isinstance(value, bool):
        return num_layers if value else 0
    if value != "auto" and value > num_layers:
        raise TrainingError(f"trainer.gradient_checkpointing={value}: this model has {num_layers} decoder layers; "
                            f"give a number from 0 to {num_layers}, true, false or auto")
    return value


def check_positions(model, lengths: list[int], model_path, data_cfg) -> None:
    """Refuse, before the first step, rows longer than the base's position table; training would otherwise
    stop at whichever step first draws one."""
    limit = learned_positions(model)
    if limit is None or max(lengths) <= limit:
        return
    raise TrainingError(
        f"model.path={model_path}: this base has learned positions for {limit} tokens, but the longest training "
        f"row is {max(lengths)} tokens (its prompt cut to data.max_source_length={data_cfg.max_source_length}, "
        f"its response to data.max_target_length={data_cfg.max_target_length}, plus EOS); lower them so that "
        f"they add up to at most {limit - 1} ({limit} positions in all)")


def fitted_split(cfg: DictConfig, lm, params, plan_for, lengths: list[int], rows, pad_token_id: int,
                 device: torch.device, world: int, recompute: int | str, num_layers: int) -> tuple[int, int, int, dict]:
    """(micro-batch, accumulation steps, recomputed layers, what was measured) for
    `trainer.auto_micro_batch_gib`: the largest split measured to fit, or with gradient_checkpointing=auto
    the fastest split measured to fit with the fewest recomputed layers."""
    t = cfg.trainer
    ceiling, per_rank_rows = t.auto_micro_batch_gib, t.per_device_batch_size * t.gradient_accumulation_steps
    softcap = output_softcap(lm.base.config)

    def new_loss():  # each probe runs as training will: captured as a graph when training replays graphs
        return micro_batch_loss(lm, t.loss_chunk_size, softcap, cuda_graphs=t.cuda_graphs, max_shapes=1)

    lm.train()
    prober = Prober(plan_for, rows, lengths, t.max_steps, per_rank_rows, new_loss, params, pad_token_id,
                    t.pad_to_multiple_of, device)
    pick = (lambda found: agree_across_ranks(found, per_rank_rows, num_layers, device)) if world > 1 else fastest
    chosen, probes, candidates = choose_split(prober, ceiling, recompute, num_layers, lm.recompute_layers, pick)
    micro = chosen.micro if chosen else 0
    layers = chosen.layers if chosen else (num_layers if recompute == "auto" else recompute)
    if world > 1 and recompute != "auto":  # ranks measured the same shapes; should their GPUs differ, the smallest
        agreed = torch.tensor(micro, device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        micro = int(agreed)
    if micro == 0:
        smallest = min(probes, key=lambda p: (p.micro, -p.layers))
        advice = ("" if layers == num_layers else
                  "set trainer.gradient_checkpointing=auto (or true), ")
        raise TrainingError(
            f"trainer.auto_micro_batch_gib={ceiling}: even a micro-batch of one row peaks at {smallest.peak_gib:.2f} "
            f"GiB ({smallest.shape[1]} tokens{', every layer recomputed' if smallest.layers == num_layers else ''}); "
            f"raise the ceiling, {advice}quantize the base (model.quantization=int4) or lower "
            "data.max_source_length / data.max_target_length")
    lm.recompute_layers(layers)
    accum = per_rank_rows // micro
    # Under torchrun the agreed layer count may exceed what this rank measured; more layers only use less.
    peak = max((p.peak_gib for p in probes if p.micro == micro and p.layers == layers), default=math.nan)
    log.info("trainer.auto_micro_batch_gib=%g: %d x %d, %d of %d layers recomputed (measured peak %.2f GiB; "
             "also measured: %s)", ceiling, micro, accum, layers, num_layers, peak,
             ", ".join(f"{p.micro} x {p.accumulation}" + (f" ({p.layers} recomputed)" if p.layers else "")
                       + f" {p.peak_gib:.2f} GiB" for p in probes if (p.micro, p.layers) != (micro, layers)) or "none")
    report = {"ceiling_gib": ceiling, "micro_batch": micro, "gradient_accumulation_steps": accum,
              "recomputed_layers": layers, "decoder_layers": num_layers,
              "probes": [{"micro_batch": p.micro, "gradient_accumulation_steps": p.accumulation,
                          "recomputed_layers": p.layers, "rows": p.shape[0], "tokens": p.shape[1],
                          "peak_gib": p.peak_gib if math.isfinite(p.peak_gib) else None} for p in probes]}
    if recompute == "auto":
        report["timed"] = [{"micro_batch": c.micro, "recomputed_layers": c.layers, "ms_per_1000_tokens": c.ms_per_ktoken}
                           for c in candidates]
    return micro, accum, layers, report


def resume_point(resume, out: Path, accelerator: Accelerator) -> tuple[Path | None, dict, dict | None]:
    """(checkpoint to resume from, its trainer state, its optimizer state), checked against its manifest, after
    tidying what an interrupted save left. Refuses to start afresh among another run's checkpoints: the two runs'
    checkpoints and logs would mix, and resume=latest would pick the other run's."""
    if accelerator.is_main_process:  # before looking for `latest`
        for folder, what in ckpt_io.restore_interrupted_resaves(out):
            (log.warning if what.startswith("kept") else log.info)("%s %s", folder, what)
        for stale in ckpt_io.remove_stale_temporaries(out):
            log.info("removed %s, left by an interrupted save", stale)
    accelerator.wait_for_everyone()  # every rank must see the restored folder
    try:
        found = find_resume(resume, out)
        state, optim_state = ckpt_io.load_trainer_state(found) if found is not None else ({"step": 0}, None)
        held = ckpt_io.list_checkpoints(out)
        later = [p.name for p in held if ckpt_io.checkpoint_step(p) > state["step"]]
        if later and found is None:
            raise TrainingError(f"output_dir={out} already holds {', '.join(later)} of an earlier run, and this run "
                                "starts afresh: the two would mix. Continue that run with resume=latest, or give "
                                f"another {folder_setting()}")
        if held and found is not None and found.resolve().parent != out.resolve():
            raise TrainingError(f"resume={resume} is a checkpoint of another folder, and output_dir={out} already "
                                f"holds {', '.join(p.name for p in held)} of its own run: the two runs' checkpoints "
                                f"and logs would mix. Go on from it in an empty {folder_setting()}, or in its own "
                                f"folder (output_dir={found.parent})")
        problem = None
    except (TrainingError, ckpt_io.CheckpointError) as e:
        found, state, optim_state, later, problem = None, {"step": -1}, None, [], e
    if accelerator.num_processes > 1:
        agree_on_resume(accelerator, state["step"], problem is not None, resume, out)
    if problem is not None:
        raise problem
    if later:  # a rewind, e.g. to before a divergence
        log.warning("resume=%s: %s in %s go on from the run being rewound; this run saves over those it reaches, "
                    "the rest stay (and resume=latest would pick them)", found, ", ".join(later), out)
    return found, state, optim_state


def agree_on_resume(accelerator: Accelerator, step: int, failed: bool, resume, out: Path) -> None:
    """Every rank starts from the same step, or every rank stops: a rank that stopped alone would leave the
    others waiting forever, and ranks at different steps would train different runs. On several machines each
    reads output_dir on its own, which is another folder unless it is shared."""
    seen = accelerator.gather(torch.tensor([[step, int(failed)]], device=accelerator.device)).tolist()
    stopped = [rank for rank, (_, bad) in enumerate(seen) if bad]
    if stopped and not failed:
        raise TrainingError(f"rank(s) {', '.join(map(str, stopped))} could not resume (their error is above); "
                            "stopping with them")
    if not stopped and len({s for s, _ in seen}) > 1:
        where = ", ".join(f"rank {rank}: " + (f"checkpoint-{s}" if s else "none, so afresh")
                          for rank, (s, _) in enumerate(seen))
        raise TrainingError(f"resume={resume}: the ranks do not find the same checkpoint in output_dir={out} "
                            f"({where}); on several machines output_dir must be a folder they all share, or hold "
                            "the same checkpoints on each")


def sum_across_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor, reduction="sum") if accelerator.num_processes > 1 else tensor


def on_rank0(accelerator: Accelerator, work) -> None:
    """Run `work` (writing files) on rank 0 alone. If it fails there, every rank stops: the others would
    otherwise wait in their next collective until the process group's timeout (half an hour by default)."""
    failure = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on rank 0 as itself
            failure = e
    if accelerator.num_processes > 1:
        failed = torch.tensor([failure is not None], dtype=torch.int32, device=accelerator.device)
        torch.distributed.broadcast(failed, src=0)
        if failed.item() and failure is None:
            raise TrainingError("rank 0 stopped writing the run folder (its error is above); stopping with it")
    if failure is not None:
        raise failure


def restore(resume_from: Path, state: dict, optim_state: dict, lm: PrefixLM, model, optimizer, scaler,
            cfg: DictConfig, plan: BatchPlan, prefix_config: dict, train_data: dict) -> tuple[int, int]:
    """Load a checkpoint's prefix, optimizer and loss scale into this run; returns (step, skipped steps). Settings
    that change the data order or the prompts from here on, other training data and another base folder are a
    warning; a different prefix cannot go on and is refused. `prefix_config`: what this run's checkpoints will
    record; `train_data`: this run's training file and its SHA-256."""
    recorded = ckpt_io.read_prefix_config(resume_from)
    check_fits(recorded, model, str(resume_from))
    if recorded["prefix"] != lm.prefix.spec.to_dict():
        diff = {k: (v, lm.prefix.spec.to_dict().get(k)) for k, v in recorded["prefix"].items()
                if lm.prefix.spec.to_dict().get(k) != v}
        raise TrainingError(f"resume={resume_from}: its prefix differs from this run's ("
                            + ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
                            + "); resume with the prefix settings it was trained with")
    lm.prefix.load_state_dict(ckpt_io.load_prefix_weights(resume_from))
    optimizer.load_state_dict(optim_state)
    resumed_optimizer_settings(optimizer, cfg.optim, resume_from)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    start = state["step"]
    log.info("resumed from %s at step %d (it was written by %d process(es))", resume_from, start,
             state.get("world_size", 1))
    if state.get("seed") not in (None, cfg.seed):
        log.warning("resume=%s: it was trained with seed %d, this run's is %d; data order and dropout from step %d "
                    "on are not the ones the original run would have had", resume_from, state["seed"], cfg.seed,
                    start + 1)
    if state.get("global_batch") not in (None, plan.global_batch):
        log.warning("resume=%s: it was trained with global batch %d, this run's is %d (%d x %d x %d ranks); "
                    "the data order from step %d on is not the one the original run would have seen",
                    resume_from, state["global_batch"], plan.global_batch, plan.micro_batch, plan.accumulation,
                    plan.world_size, start + 1)
    was, now = state.get("next_lr"), lr_at(start, cfg.optim, cfg.trainer.max_steps)
    if was is not None and not math.isclose(was, now, rel_tol=1e-9, abs_tol=1e-15):
        log.warning("resume=%s: step %d's learning rate is %.6g under this run's schedule (trainer.max_steps=%d, "
                    "optim.lr, warmup_steps and schedule), where the run that saved it would have used %.6g: the "
                    "rate jumps there", resume_from, start + 1, now, cfg.trainer.max_steps, was)
    if state.get("train_sha256") not in (None, train_data["train_sha256"]):
        same = state.get("train_file") == train_data["train_file"]
        log.warning("resume=%s: it was trained on %s%s; from step %d on the rows are not the ones the original run "
                    "would have had", resume_from, state.get("train_file"),
                    " as it was then (the file has changed since)" if same else
                    f", this run reads {train_data['train_file']}", start + 1)
    base_then, base_now = recorded.get("base", {}).get("path"), prefix_config["base"].get("path")
    if base_then and base_now and Path(base_then).expanduser().resolve() != Path(base_now).resolve():
        log.warning("resume=%s: it was trained on the base in %s, this run's is %s (of the same shape); the prefix "
                    "goes on against other weights if they differ", resume_from, base_then, base_now)
    def prompt_settings(config: dict) -> dict:  # how the rows were made: the data entry and the template
        return {**{f"data.{k}": v for k, v in config.get("data", {}).items()},
                **({"model.template": config["model"].get("template")} if "model" in config else {})}

    was = prompt_settings(recorded)
    changed = [f"{k} {was[k]!r} -> {v!r}" for k, v in prompt_settings(prefix_config).items() if k in was and was[k] != v]
    if changed:
        log.warning("resume=%s: %s; from step %d on the prefix trains on other prompts or targets than it was "
                    "trained on so far (config.yaml now holds this run's settings; the checkpoint's own are in its "
                    "prefix_config.json)", resume_from, ", ".join(changed), start + 1)
    return start, state.get("skipped_steps", 0)


def train(cfg: DictConfig) -> Path:
    # accelerate sets up gloo for several CPU processes only when told it runs on the CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with no_run_folder_if_refused():
        settings.train(cfg)
        refuse_output_dir_in_multirun(cfg)
        if cfg.trainer.auto_micro_batch_gib is not None and accelerator.device.type != "cuda":
            raise TrainingError(f"trainer.auto_micro_batch_gib={cfg.trainer.auto_micro_batch_gib}: it measures GPU "
                                f"memory and needs a CUDA device, not {accelerator.device.type}; set "
                                "trainer.per_device_batch_size and trainer.gradient_accumulation_steps yourself, or "
                                "leave it null")
    out = run_dir(accelerator)
    with run_folder_held(out, accelerator):
        return train_in(out, cfg, accelerator)


def train_in(out: Path, cfg: DictConfig, accelerator: Accelerator) -> Path:
    """The run itself, in its folder: resume point, data, model, then the steps."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    t = cfg.trainer
    base_folder = settings.model_folder(cfg.model)  # checked by settings.train
    if accelerator.is_main_process and not os.access(out, os.W_OK | os.X_OK):
        # The run's files may each be writable while the folder takes no new one: found at the first save, the
        # steps before it would be lost.
        raise TrainingError(f"{folder_setting()}: {out} is read-only: a checkpoint could not be saved there; make it "
                            "writable, or give another folder")
    new_log = () if (out / "train.log").exists() else (out / "train.log",)
    with writing(out / "train.log"):
        setup_logging(out / "train.log", accelerator.is_main_process)

    # Refused before the first step (the data, the batch, the model): a run folder made for it is removed again.
    with no_run_folder_if_refused(written=new_log):
        resume_from, state, optim_state = resume_point(cfg.resume, out, accelerator)
        # The data before the model: a bad row is refused in seconds, not after the model's minutes of loading.
        tokenizer = load_tokenizer(base_folder)
        rows = training_rows(cfg.data, cfg.model.template, tokenizer)
        # which rows the steps take: a resume on another file (or this one edited) takes others from here on
        train_file = settings.data_file(cfg.data.train_file)
        train_data = {"train_file": str(train_file.resolve()), "train_sha256": sha256_file(train_file)}
        lengths = [len(ids) for ids in rows["input_ids"]]
        targets = [sum(1 for x in lab[1:] if x != IGNORE) for lab in rows["labels"]]
        global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * world
        if global_batch > len(lengths):  # a step would hold rows twice over
            raise TrainingError(f"a global batch of {global_batch:,} rows (trainer.per_device_batch_size="
                                f"{t.per_device_batch_size} x trainer.gradient_accumulation_steps="
                                f"{t.gradient_accumulation_steps} x {world} rank(s)) is more than the "
                                f"{len(lengths):,} rows of {cfg.data.train_file}; lower either setting")
        model = load_model(cfg.model, device)
        check_vocabulary(model, tokenizer, cfg.model.path)
        num_layers = model.config.num_hidden_layers
        recompute = recompute_setting(t, num_layers)
        check_positions(model, lengths, cfg.model.path, cfg.data)

    def plan_for(micro: int, accumulation: int) -> BatchPlan:
        return BatchPlan(lengths, targets, micro, accumulation, world, cfg.seed, t.sort_by_length, t.group_by_length,
                         t.pad_to_multiple_of)

    torch.manual_seed(cfg.seed)
    lm = PrefixLM(model, build_prefix(model, cfg.prefix, device))
    lm.recompute_layers(0 if recompute == "auto" else recompute)
    if t.compile:
        compile_layers(model)
    softcap = output_softcap(model.config)
    loss_fn = micro_batch_loss(lm, t.loss_chunk_size, softcap, cuda_graphs=t.cuda_graphs, max_shapes=t.cuda_graph_shapes)
    params = list(lm.prefix.parameters())
    micro, accum = t.per_device_batch_size, t.gradient_accumulation_steps
    fitted = None
    if t.auto_micro_batch_gib is not None:
        micro, accum, recompute, fitted = fitted_split(cfg, lm, params, plan_for, lengths, rows,
                                                       tokenizer.pad_token_id, device, world, recompute, num_layers)
    plan = plan_for(micro, accum)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    # Loss scaling only matters for an fp16 base; bf16 and fp32 have the exponent range to do without.
    scaler = torch.amp.GradScaler(device.type, enabled=model.dtype == torch.float16)
    prefix_config = {
        "prefix": lm.prefix.spec.to_dict(), "dropout": cfg.prefix.dropout,
        # absolute: evaluate, chat and serve find the base from whichever folder they run in
        "base": base_identity(model, base_folder.resolve()),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: cfg.data[k] for k in ("prompt_column", "response_column", "history_column",
                                          "max_source_length", "max_target_length", "truncate_source_from")},
    }

    start, skipped = 0, 0
    if resume_from is not None:
        start, skipped = restore(resume_from, state, optim_state, lm, model, optimizer, scaler, cfg, plan,
                                 prefix_config, train_data)

    if start >= t.max_steps:  # config.yaml stays the config that trained the checkpoints
        log.warning("resume=%s is at step %d, trainer.max_steps=%d: nothing to train; raise trainer.max_steps to go "
                    "on", resume_from, start, t.max_steps)
    metrics = None

    def start_files() -> None:
        nonlocal metrics
        if start >= t.max_steps:  # nothing to train: the run's config, log and plot stay the longer run's
            return
        # output_dir as used: a multirun job's folder is not the configured one
        used = OmegaConf.merge(cfg, {"output_dir": str(out)})
        with writing(out / "config.yaml"):  # written whole: a full disk leaves the previous one
            write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(used, resolve=True))
        if fitted is not None:
            with writing(out / "auto_micro_batch.json"):
                write_text_atomic(out / "auto_micro_batch.json", json.dumps(fitted, indent=2) + "\n")
        with writing(out / "train_log.jsonl"):
            metrics = MetricsLog(out, t.tensorboard, resume_step=start)

    on_rank0(accelerator, start_files)
    # A log line that cannot be appended stops the run; a resume redoes the steps since the last checkpoint.
    def lost_log() -> str:
        if ckpt_io.latest_checkpoint(out) is None:
            return f"; {last_kept(out)}"
        return f"; {last_kept(out)}. Make room (or fix the folder), then go on with {go_on_with(out)}"
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.update(signal=signum))

    def save(step: int) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in params):  # the step's check saw a finite gradient
            raise TrainingError(f"step {step}: the prefix holds NaN or inf after the update and was not saved; "
                                f"{last_kept(out)}. Try {', '.join(steadier(cfg, model.dtype))}")
        def write() -> None:
            trainer_state = {"seed": cfg.seed, "world_size": world, "global_batch": plan.global_batch,
                             "skipped_steps": skipped, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                             "log_window": window.kept(), **train_data,
                             "next_lr": lr_at(step, cfg.optim, t.max_steps)}  # its schedule, for a resume to compare
            try:
                path = ckpt_io.save_checkpoint(out, step, lm.prefix.state_dict(), prefix_config, trainer_state,
                                               optimizer.state_dict())
            except ckpt_io.CheckpointError as e:
                raise TrainingError(f"step {step}: {e}. Make room (or fix the folder), then go on from the last "
                                    f"checkpoint with {go_on_with(out)}") from None
            log.info("saved %s", path)
            metrics.plot()
            if t.keep_last:
                for failure in ckpt_io.prune(out, t.keep_last, up_to_step=step)[1]:
                    log.warning("trainer.keep_last: could not remove %s; training goes on", failure)

        on_rank0(accelerator, write)

    if cfg.optim.warmup_steps > t.max_steps:
        log.warning("optim.warmup_steps=%d is more than trainer.max_steps=%d: the learning rate only reaches %.3g, "
                    "not optim.lr=%g", cfg.optim.warmup_steps, t.max_steps,
                    lr_at(t.max_steps - 1, cfg.optim, t.max_steps), cfg.optim.lr)
    log.info("training %s: %d rows, %d trainable prefix parameters, global batch %d (%d x %d x %d ranks), %d steps, "
             "%d of %d layers recomputed in backward", out, len(rows), sum(p.numel() for p in params),
             plan.global_batch, micro, accum, world, t.max_steps, lm.recomputed_layers, num_layers)
    lm.train()
    bar = tqdm(total=t.max_steps, initial=start, desc="train", disable=not (accelerator.is_main_process and t.progress_bar))

    window = LogWindow(state.get("log_window"))
    stopping = False
    for step in range(start, t.max_steps):
        lr = lr_at(step, cfg.optim, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_targets = plan.target_tokens(step)
        batches = [{k: v.to(device) for k, v in collate([rows[i] for i in micro], tokenizer.pad_token_id,
                                                         t.pad_to_multiple_of).items()}
                   for micro in plan.micro_batches(step, rank)]
        # Dropout masks depend on (seed, step, micro-batch) alone: a resumed run draws what an unbroken one
        # would, and 2 GPUs x 1 accumulation step draw what 1 GPU x 2 does.
        seeds = [cfg.seed + 1_000_003 * (step + 1) + i for i in plan.micro_batch_ids(rank)]
        try:
            result = optimizer_step(loss_fn, params, batches, global_targets, optimizer, scaler,
                                    max_grad_norm=cfg.optim.max_grad_norm, world_size=world, seeds=seeds)
        except torch.OutOfMemoryError as e:
            raise TrainingError(out_of_memory(cfg, step + 1, e, batches, plan.global_batch, out, lm.recomputed_layers,
                                                num_layers)) from None
        # One reduction for the loss, the tokens and whether any rank was signalled: ranks whose signals
        # straddle a step boundary must still stop after the same step, or their collectives part ways.
        totals = sum_across_ranks(accelerator, torch.stack([result.loss_sum.double(), torch.as_tensor(
            result.tokens, dtype=torch.float64, device=result.loss_sum.device), torch.tensor(
            float(stop["signal"] is not None), dtype=torch.float64, device=result.loss_sum.device)]))
        loss_sum, tokens, signalled = totals.tolist()
        # Every rank decides from this sum alone: a signal landing after the reduction waits for the next step's,
        # or this rank would save (a collective) while the others went on into the next step's.
        stopping = signalled > 0
        if stopping and stop["signal"] is None:
            stop["signal"] = signal.SIGTERM  # what torchrun forwards to every rank it stops
        loss, grad_norm = loss_sum / global_targets, result.grad_norm
        if not result.applied and scaler.is_enabled():
            skipped += 1
            log.warning("step %d: fp16 overflow, update skipped (loss scale now %g; %d skipped so far)",
                        step + 1, scaler.get_scale(), skipped)
        elif not result.applied:
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            if step == start == 0:  # before any update: the prefix is as initialised, the base or the data is at fault
                raise TrainingError(
                    f"step 1: non-finite {what} (loss={loss}, grad_norm={grad_norm}) before any update, so not from "
                    f"the learning rate: the base model gives it on this data. Check its weights (python -m "
                    f"ptune.verify_model {cfg.model.path} --full)"
                    + (", or load it as model.dtype=bfloat16 instead of float16" if model.dtype == torch.float16
                       else ""))
            raise TrainingError(f"step {step + 1}: non-finite {what} (loss={loss}, grad_norm={grad_norm}); "
                                f"{last_kept(out)}. Try {', '.join(steadier(cfg, model.dtype))}")

        window.add(loss, grad_norm, int(tokens))  # optimizer_step hands the norm back as a float: no device sync
        done = step + 1
        bar.update(1)
        if done % t.log_steps == 0 or done == t.max_steps:
            record = window.record(done, lr, skipped, device)
            mean_loss, mean_norm = window.means()
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{mean_norm:.2f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['peak_mem_gib']:.2f}G")
            def write_log() -> None:
                with writing(metrics.path, lost_log):
                    metrics.write(record)

            on_rank0(accelerator, write_log)
            log.info("step %d loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f peak_mem %.2f GiB", done,
                     mean_loss, lr, mean_norm, record["tokens_per_s"], record["peak_mem_gib"])
            window = LogWindow()
        if done % t.save_steps == 0 or done == t.max_steps or stopping:
            saving = time.perf_counter()
            save(done)
            window.pause(time.perf_counter() - saving)  # also where a save falls inside a window
        if stopping:
            log.warning("stopped by signal %d after step %d; resume with %s", stop["signal"], done, go_on_with(out))
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # NCCL warns of leaked resources at exit otherwise
    if stopping:  # saved, and stopped early: not a finished run to a script's next command
        sys.exit(128 + stop["signal"])
    return out


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg)

