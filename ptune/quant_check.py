"""What a quantized base does to P-tuning, measured on your model and your data.

`python -m ptune.quant_check model.path=<model> data.train_file=<rows.json>` loads the base in float,
then once per entry of `modes` (int8, int4 at a group size), and on the same rows with the same
freshly initialised prefix (what step 0 of training sees) reports, against the float base:
the training loss, the cosine between the prefix gradients, and how often the next-token prediction
at the response positions agrees. Run it before trusting a 4-bit base with a long training run.
"""

from __future__ import annotations

# Run as a command, the config is composed (and --help or a setting Hydra refuses answered) before the
# imports below take their seconds; ptune.command then imports this module again and calls main(cfg).
if __name__ == "__main__":
    from ptune.command import run_command

    run_command("quant_check")

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ptune import settings
from ptune.settings import resolve_device
from ptune.data import IGNORE, collate, training_rows
from ptune.errors import exit_on_user_error
from ptune.logs import setup_logging
from ptune.loss import lm_loss_sum, output_softcap
from ptune.models import load_base, load_model
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

log = logging.getLogger("ptune.quant_check")


def measure(model, batches: list[dict], cfg: DictConfig) -> dict:
    """Loss, prefix gradient and response-position argmax of `model` with a seeded, dropout-free prefix."""
    torch.manual_seed(cfg.seed)
    prefix = PrefixEncoder(PrefixSpec.for_model(model.config, cfg.prefix_length)).to(model.device)
    lm = PrefixLM(model, prefix).train()
    head, softcap = model.get_output_embeddings(), output_softcap(model.config)
    targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    loss, predictions = 0.0, []
    for b in batches:
        hidden = lm.decoder(b["input_ids"], b["attention_mask"])
        total, _ = lm_loss_sum(hidden, b["labels"], head, cfg.loss_chunk_size, softcap)
        (total / targets).backward()
        loss += float(total.detach()) / targets
        with torch.no_grad():
            keep = b["labels"][:, 1:] != IGNORE
            predictions.append(head(hidden[:, :-1][keep]).argmax(-1))
    return {"loss": loss, "grad": prefix.embedding.weight.grad.float().flatten(),
            "predictions": torch.cat(predictions)}


def run(cfg: DictConfig) -> dict:
    settings.quant_check(cfg)
    device = resolve_device(cfg.device)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) | {"quantization": None, "quantization_cache": None}
    model, tokenizer = load_base(OmegaConf.create(model_cfg), device)
    rows = training_rows(cfg.data, cfg.model.template, tokenizer, limit=cfg.rows)
    batches = [{k: v.to(device) for k, v in collate([rows[j] for j in range(i, min(i + cfg.batch_size, len(rows)))],
                                                     tokenizer.pad_token_id).items()}
               for i in range(0, len(rows), cfg.batch_size)]
    ref = measure(model, batches, cfg)
    dtype = str(model.dtype)  # the base's (measure's gradient is made float32 for the comparisons)
    del model
    report = {"model": str(cfg.model.path), "dtype": dtype, "rows": len(rows),
              "response_tokens": int(ref["predictions"].numel()), "float_loss": ref["loss"], "modes": []}
    for mode, group in cfg.modes:
        quantized = load_model(OmegaConf.create(model_cfg | {"quantization": mode, "quantization_group_size": group}),
                               device)
        got = measure(quantized, batches, cfg)
        del quantized
        row = {"mode": mode, "group_size": group if mode == "int4" else None, "loss": got["loss"],
               "loss_change": got["loss"] / ref["loss"] - 1,
               "prefix_grad_cosine": float(F.cosine_similarity(got["grad"], ref["grad"], dim=0)),
               "prefix_grad_norm_ratio": float(got["grad"].norm() / ref["grad"].norm()),
               "top1_agreement": float((got["predictions"] == ref["predictions"]).float().mean())}
        report["modes"].append(row)
        log.info("%s%s: loss %.4f (float %.4f, %+.2f%%), prefix-gradient cosine %.4f (norm ratio %.3f), "
                 "next-token agreement %.1f%%", mode, f"/{group}" if row["group_size"] else "", row["loss"],
                 ref["loss"], 100 * row["loss_change"], row["prefix_grad_cosine"], row["prefix_grad_norm_ratio"],
                 100 * row["top1_agreement"])
    if cfg.out_json:
        out = Path(cfg.out_json).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


@exit_on_user_error
def main(cfg: DictConfig) -> None:
    setup_logging()
    run(cfg)

