"""Build the ChatGLM2/3 golden fixtures under tests/golden/chatglm/.

The fixtures are produced by the *original* ChatGLM3 code (tokenizer, model and
prefix encoder), so the tests compare ptune's own tokenizer, its conversion to
transformers' GlmForCausalLM and its prefix encoder against the reference
rather than against themselves.  That code only runs with old transformers, so
this script is meant for a separate, throw-away environment, e.g.:

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 sentencepiece safetensors \
        "tokenizers<0.20" "huggingface_hub<0.25" numpy regex pyyaml packaging \
        filelock requests tqdm
    /tmp/refenv/bin/pip install --no-deps transformers==4.40.2 kolors-sdxl==0.0.2
    /tmp/refenv/bin/python tests/golden/make_chatglm_golden.py

(kolors-sdxl 0.0.2 ships the original ChatGLM3 configuration_chatglm.py,
modeling_chatglm.py and tokenization_chatglm.py under kolors/models/.)  The
script also needs ../shared (the real tokenizer.model and the AdvertiseGen
sample).  Nothing from that environment is committed: only this script and
what it writes.

What is written (all small; the model is tiny and random):

tokenizer_cases.json
    ids of >= 500 strings (AdvertiseGen rows, ChatGLM2 multi-round prompts,
    special-token look-alikes, emoji, whitespace, full-width, English/digits)
    with and without special tokens, decode round trips, ChatGLM3
    build_chat_input results, and a left-padded batch.
tiny_chatglm2/{config.json,model.safetensors}
    a 2-layer ChatGLM2-shaped model in the reference's own format (reference
    parameter names, reference config fields).
tiny_logits.safetensors
    fp32 logits of that model for a plain batch and a left-padded batch, and
    the ids greedy generate() produces.
tiny_rope_ratio.safetensors
    logits of the same weights with rope_ratio=4 (the long-context ChatGLM3
    variants multiply the rotary base by rope_ratio; the reference code here
    predates that field, so it is emulated by passing the scaled base).
ptuning_{noproj,proj}.safetensors
    P-tuning v2 with pre_seq_len=8: prefix encoder weights, loss on a labelled
    batch, the gradient of every prefix encoder parameter, prefix logits, and
    20 greedy tokens generated with the prefix.
real_param_shapes.json
    names and shapes of every tensor of the real ChatGLM2-6B / ChatGLM3-6B state dicts.
ptuning_checkpoint/{config.json,model.safetensors}
    a prefix checkpoint as the original P-tuning scripts save it (only the
    transformer.prefix_encoder.* keys), for the projection-free case.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "chatglm"
SHARED = HERE.parents[2] / "shared"
TOKENIZER_MODEL = SHARED / "chatglm" / "tokenizer.model"
ADGEN = SHARED / "data" / "advertisegen" / "train_5000.json"

sys.path.insert(0, str(HERE))
from chatglm_strings import chatglm2_prompt, load_rows, sha256_text, tokenizer_strings  # noqa: E402
from kolors.models.configuration_chatglm import ChatGLMConfig  # noqa: E402
from kolors.models.modeling_chatglm import ChatGLMForConditionalGeneration, RMSNorm  # noqa: E402
from kolors.models import modeling_chatglm as ref_modeling  # noqa: E402
from kolors.models.tokenization_chatglm import ChatGLMTokenizer  # noqa: E402

VOCAB = 1024  # the tiny model's vocabulary; every test id is below it
SEED = 1234


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def chat_input_cases() -> list[dict]:
    tools = [{"name": "get_weather", "description": "查询天气",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    return [
        {"query": "你好", "history": [], "role": "user"},
        {"query": "Hello, who are you?", "history": None, "role": "user"},
        {"query": "写一个广告", "history": [{"role": "system", "content": "你是一个广告文案助手。"}], "role": "user"},
        {"query": "继续", "history": [
            {"role": "system", "content": "You are ChatGLM3."},
            {"role": "user", "content": "类型#裤*版型#宽松"},
            {"role": "assistant", "content": "宽松的阔腿裤。"},
        ], "role": "user"},
        {"query": "{\"temperature\": 22}", "history": [
            {"role": "system", "content": "Answer with tools.", "tools": tools},
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
        ], "role": "observation"},
        {"query": "system prompt as query", "history": [], "role": "system"},
        {"query": "assistant turn", "history": [{"role": "user", "content": "hi"}], "role": "assistant"},
        {"query": "  spaces \n newline\t tab ", "history": [
            {"role": "user", "content": "😀"}, {"role": "assistant", "content": "👍 ok"}], "role": "user"},
        {"query": "", "history": [], "role": "user"},
        {"query": "<|user|> inside text [gMASK]", "history": [], "role": "user"},
    ]


def make_tokenizer_cases(tok: ChatGLMTokenizer) -> dict:
    texts, prompts = tokenizer_strings(load_rows(ADGEN))
    cases = []
    for text in texts:
        ids = tok.encode(text)
        plain = tok.encode(text, add_special_tokens=False)
        # Hashes, not text: the fixture must not carry the data set's prose (the test rebuilds it).
        cases.append({
            "sha256": sha256_text(text),
            "ids": ids,
            "ids_plain": plain,
            "decoded_sha256": sha256_text(tok.decode(ids)),
            "decoded_plain_sha256": sha256_text(tok.decode(plain)),
        })
    chats = []
    for case in chat_input_cases():
        out = tok.build_chat_input(case["query"], history=case["history"], role=case["role"])
        chats.append({**case, "input_ids": out["input_ids"][0].tolist()})
    batch_texts = ["短", "a somewhat longer English sentence", "类型#裙*颜色#红色"]
    batch = tok(batch_texts, padding=True)
    special_ids = {t: tok.get_command(t) for t in tok.tokenizer.special_tokens}
    return {
        "reference": "kolors-sdxl 0.0.2 kolors/models/tokenization_chatglm.py (ChatGLM3 tokenizer)",
        "versions": {"transformers": version("transformers"), "sentencepiece": version("sentencepiece")},
        "vocab_size": tok.vocab_size,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "special_ids": special_ids,
        "cases": cases,
        "chatglm2_prompts": [sha256_text(p["prompt"]) for p in prompts],
        "chat_inputs": chats,
        "batch": {"texts": batch_texts, **{k: list(v) for k, v in batch.items()}},
    }


# --------------------------------------------------------------------------------------------
# tiny model
# --------------------------------------------------------------------------------------------


def tiny_config(**extra) -> ChatGLMConfig:
    return ChatGLMConfig(
        num_layers=2, padded_vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=160, kv_channels=16,
        num_attention_heads=4, seq_length=256, hidden_dropout=0.0, attention_dropout=0.0,
        layernorm_epsilon=1e-5, rmsnorm=True, apply_residual_connection_post_layernorm=False,
        post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True, multi_query_attention=True,
        multi_query_group_num=2, original_rope=True, torch_dtype="float32", eos_token_id=2, pad_token_id=0,
        use_cache=True, tie_word_embeddings=False, **extra)


def write_config(cfg: ChatGLMConfig, path: Path, extra: tuple[str, ...] = ()) -> None:
    """Write the fields a published ChatGLM2-6B config.json has (same keys, tiny values)."""
    real = json.loads((SHARED / "chatglm" / "chatglm2-6b" / "config.json").read_text())
    full = cfg.to_dict()
    out = {}
    for key in list(real) + list(extra):
        if key in ("_name_or_path", "auto_map", "transformers_version"):
            continue
        out[key] = real[key] if key in ("model_type", "architectures") else full[key]
    path.write_text(json.dumps(out, indent=2) + "\n")


def build_model(cfg: ChatGLMConfig) -> ChatGLMForConditionalGeneration:
    torch.manual_seed(SEED)
    model = ChatGLMForConditionalGeneration(cfg, empty_init=False).float()
    # RMSNorm weights are allocated with torch.empty: give them defined values.  Not all exactly 1,
    # so that a conversion that swapped or dropped a norm would show in the logits.
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
    return model.eval()


def fixed_batches():
    gen = torch.Generator().manual_seed(SEED + 2)
    plain = torch.randint(3, VOCAB, (2, 12), generator=gen)
    padded = torch.randint(3, VOCAB, (3, 10), generator=gen)
    lengths = [10, 7, 4]
    mask = torch.zeros_like(padded)
    for i, n in enumerate(lengths):
        mask[i, -n:] = 1
    padded = padded.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    return plain, padded, mask, position_ids


def greedy_no_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=out, use_cache=False).logits
        out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=-1)
    return out


def make_tiny(tok_prompt: list[int]) -> dict:
    cfg = tiny_config()
    model = build_model(cfg)
    d = OUT / "tiny_chatglm2"
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_config(cfg, d / "config.json")

    plain, padded, mask, pos = fixed_batches()
    with torch.no_grad():
        logits_plain = model(input_ids=plain).logits
        logits_padded = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits
    prompt = torch.tensor([tok_prompt])
    gen = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen.shape[1] == prompt.shape[1] + 20
    assert torch.equal(gen, greedy_no_cache(model, prompt, 20)), "cached and uncached greedy differ"
    save_file({
        "plain_input_ids": plain, "plain_logits": logits_plain.contiguous(),
        "padded_input_ids": padded, "padded_attention_mask": mask, "padded_position_ids": pos,
        "padded_logits": logits_padded.contiguous(),
        "gen_prompt": prompt, "gen_output": gen,
    }, str(OUT / "tiny_logits.safetensors"))

    # rope_ratio: the long-context ChatGLM3 variants compute the rotary table with base 10000 * rope_ratio.
    ratio = 4.0
    rot = model.transformer.rotary_pos_emb
    orig_forward = rot.forward
    rot.forward = lambda max_seq_len, offset=0: rot.forward_impl(
        max_seq_len, rot.dim, dtype=rot.inv_freq.dtype, device=rot.inv_freq.device, base=10000 * ratio)
    with torch.no_grad():
        logits_ratio = model(input_ids=plain).logits
    rot.forward = orig_forward
    save_file({"rope_ratio": torch.tensor([ratio]), "plain_input_ids": plain,
               "plain_logits": logits_ratio.contiguous()}, str(OUT / "tiny_rope_ratio.safetensors"))
    return sd


# --------------------------------------------------------------------------------------------
# P-tuning v2
# --------------------------------------------------------------------------------------------


def labelled_batch():
    """Right-padded prompt+answer rows as the original P-tuning preprocessing builds them."""
    gen = torch.Generator().manual_seed(SEED + 3)
    rows = [(6, 7), (4, 5)]  # (prompt length, answer length)
    length = 16
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = torch.randint(3, VOCAB, (p + a,), generator=gen)
        seq[p + a - 1] = 2  # eos closes the answer
        ids[i, : p + a] = seq
        labels[i, p: p + a] = seq[p:]
    return ids, labels


def make_ptuning(base_sd: dict, projection: bool, tok_prompt: list[int]) -> None:
    cfg = tiny_config(pre_seq_len=8, prefix_projection=projection)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all(k.startswith("transformer.prefix_encoder.") for k in missing), (missing, unexpected)
    torch.manual_seed(SEED + 10 + int(projection))
    enc = model.transformer.prefix_encoder
    with torch.no_grad():
        enc.embedding.weight.normal_(0.0, 1.0)
        if projection:
            for lin in (enc.trans[0], enc.trans[2]):
                lin.weight.normal_(0.0, 0.2)
                lin.bias.normal_(0.0, 0.2)
    model.eval()  # the prefix dropout (p=0.1) off, so loss and gradient are deterministic
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.startswith("transformer.prefix_encoder.") for n in trainable), trainable

    ids, labels = labelled_batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": ids, "labels": labels, "loss": out.loss.detach().reshape(1),
        "logits": out.logits.detach().contiguous(),
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            short = name[len("transformer.prefix_encoder."):]
            tensors[f"weight.{short}"] = p.detach().clone().contiguous()
            tensors[f"grad.{short}"] = p.grad.detach().clone().contiguous()
    model.zero_grad(set_to_none=True)

    prompt = torch.tensor([tok_prompt])
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen.shape[1] == prompt.shape[1] + 20
    assert torch.equal(gen, greedy_no_cache(model, prompt, 20)), "cached and uncached greedy differ"
    tensors["gen_prompt"] = prompt
    tensors["gen_output"] = gen
    name = "proj" if projection else "noproj"
    save_file(tensors, str(OUT / f"ptuning_{name}.safetensors"),
              metadata={"pre_seq_len": "8", "prefix_projection": str(projection)})

    if not projection:
        d = OUT / "ptuning_checkpoint"
        d.mkdir(parents=True, exist_ok=True)
        prefix_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                     if k.startswith("transformer.prefix_encoder.")}
        save_file(prefix_sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        write_config(cfg, d / "config.json", extra=("pre_seq_len", "prefix_projection"))


def dump_one_per_line(obj: dict) -> str:
    """JSON with every list element of the top-level lists on a line of its own (readable diffs)."""
    lines = ["{"]
    items = list(obj.items())
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if isinstance(value, list):
            lines.append(f"{json.dumps(key)}: [")
            for m, elem in enumerate(value):
                lines.append(json.dumps(elem, ensure_ascii=False) + ("," if m < len(value) - 1 else ""))
            lines.append("]" + comma)
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def make_real_shapes() -> None:
    """Parameter names and shapes of the real 6B models (built on the meta device: no memory)."""
    out = {}
    for name in ("chatglm2-6b", "chatglm3-6b"):
        real = json.loads((SHARED / "chatglm" / name / "config.json").read_text())
        cfg = ChatGLMConfig(**{k: v for k, v in real.items() if k not in ("auto_map", "architectures")})
        with torch.device("meta"):
            model = ChatGLMForConditionalGeneration(cfg, empty_init=False)
        out[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    (OUT / "real_param_shapes.json").write_text(json.dumps(out, indent=1) + "\n")


def main() -> int:
    if not TOKENIZER_MODEL.is_file() or not ADGEN.is_file():
        print(f"needs {TOKENIZER_MODEL} and {ADGEN}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    tok = ChatGLMTokenizer(str(TOKENIZER_MODEL))
    cases = make_tokenizer_cases(tok)
    (OUT / "tokenizer_cases.json").write_text(dump_one_per_line(cases), encoding="utf-8")
    print(f"tokenizer: {len(cases['cases'])} strings, {len(cases['chat_inputs'])} chat inputs")

    # a short real prompt, its ids folded into the tiny vocabulary
    prompt_ids = [i % VOCAB for i in tok.encode(chatglm2_prompt("类型#裙*颜色#红色", []))]
    base_sd = make_tiny(prompt_ids)
    make_ptuning(base_sd, projection=False, tok_prompt=prompt_ids)
    make_ptuning(base_sd, projection=True, tok_prompt=prompt_ids)
    make_real_shapes()
    meta = {
        "made_by": "tests/golden/make_chatglm_golden.py",
        "versions": {"torch": torch.__version__, "transformers": version("transformers"),
                     "kolors-sdxl": version("kolors-sdxl"), "sentencepiece": version("sentencepiece")},
        "seed": SEED,
        "tiny_vocab": VOCAB,
        "norm_weights": "1 + 0.1 * N(0, 1)",
    }
    (OUT / "versions.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
