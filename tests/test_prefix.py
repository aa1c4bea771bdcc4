"""The prefix reaches every attention layer correctly, for several model families."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, tiny_config, toy_batch
from ptune.loss import lm_loss_sum, output_softcap
from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

VOCAB = 97


def make_lm(family: str, length: int = 5, projection: bool = False, layers: int = 2, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(family, VOCAB)
    cfg.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float()
    spec = PrefixSpec.for_model(model.config, length, projection=projection, projection_hidden_size=24 if projection else None)
    prefix = PrefixEncoder(spec)
    with torch.no_grad():  # the default init is too small to make the prefix matter in a check
        for p in prefix.parameters():
            p.normal_(0, 0.5)
    return PrefixLM(model, prefix)


def reference_layer(lm: PrefixLM, input_ids: torch.Tensor) -> torch.Tensor:
    """One decoder layer by hand: prefix keys/values (no rotary) before the real ones, positions from 0, causal
    among real tokens, every real token seeing the whole prefix. Returns the final normed hidden states."""
    body = lm.base.model
    layer = body.layers[0]
    attn = layer.self_attn
    modeling = importlib.import_module(type(attn).__module__)
    b, t = input_ids.shape
    x = body.embed_tokens(input_ids)
    h = layer.input_layernorm(x)
    hd = attn.head_dim
    q = attn.q_proj(h).view(b, t, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, -1, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, -1, hd).transpose(1, 2)
    pos = torch.arange(t).unsqueeze(0).expand(b, t)
    cos, sin = body.rotary_emb(x, pos)
    q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    (pk, pv), = [lm.prefix(1)[0]]
    pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
    k = torch.cat([pk, k], 2)
    v = torch.cat([pv, v], 2)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    p = pk.shape[2]
    allowed = torch.ones(t, p + t, dtype=torch.bool)
    allowed[:, p:] = torch.ones(t, t).tril().bool()
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
    x = x + attn.o_proj(out)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return body.norm(x)


@pytest.mark.parametrize("family", ["llama", "glm"])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_hand_written_reference(family, projection, attn):
    lm = make_lm(family, projection=projection, layers=1, attn=attn)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        got = lm.decoder(ids)
        want = reference_layer(lm, ids)
        without_prefix = lm.base.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The check has teeth: the prefix changes the output well beyond the tolerance.
    assert (got - without_prefix).abs().max() > 1e-2


def loss_and_grad(lm: PrefixLM, batch):
    lm.prefix.zero_grad(set_to_none=True)
    hidden = lm.decoder(batch["input_ids"], batch["attention_mask"])
    total, n = lm_loss_sum(hidden, batch["labels"], lm.base.get_output_embeddings(), 4, output_softcap(lm.config))
    loss = total / n
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in lm.prefix.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("count", [1, 2])
def test_gradient_checkpointing_same_loss_and_gradient(family, count):
    """Recomputing the first `count` layers (of 2) runs exactly those layers' forward pass a second time in
    backward, and leaves the loss and the prefix gradient as they were."""
    batch = toy_batch(VOCAB)
    lm = make_lm(family, projection=True)
    lm.train()
    loss_off, grad_off = loss_and_grad(lm, batch)
    lm.recompute_layers(count)
    assert lm.recomputed_layers == count
    body = lm.base.get_decoder()
    layers = getattr(body, "layers", None) or body.h
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # counted in forward itself: module hooks stay quiet while recomputing
        layer.mlp.forward = lambda *a, i=i, run=layer.mlp.forward: (calls.__setitem__(i, calls[i] + 1), run(*a))[1]
    loss_on, grad_on = loss_and_grad(lm, batch)
    assert calls == [2 if i < count else 1 for i in range(len(layers))]
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
    for name in grad_off:
        assert grad_off[name].abs().sum() > 0, name
        rel = (grad_on[name] - grad_off[name]).norm() / grad_off[name].norm()
        assert rel < 1e-4, (name, float(rel))
    assert all(p.grad is None for p in lm.base.parameters())
    assert not any(p.requires_grad for p in lm.base.parameters())
    assert not lm.base.training
    lm.recompute_layers(0)
    assert lm.recomputed_layers == 0 and not lm.base.is_gradient_checkpointing
    with pytest.raises(ValueError, match="the model has 2 decoder layers"):
        lm.recompute_layers(3)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_per_row_loss(family):
    lm = make_lm(family)
    batch = toy_batch(VOCAB, 2)
    head, softcap = lm.base.get_output_embeddings(), output_softcap(lm.config)
    with torch.no_grad():
        hidden = lm.decoder(batch["input_ids"], batch["attention_mask"])
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            alone = lm.decoder(batch["input_ids"][i:i + 1, :n])
            got, count = lm_loss_sum(hidden[i:i + 1], batch["labels"][i:i + 1], head, 4, softcap)
            want, count_alone = lm_loss_sum(alone, batch["labels"][i:i + 1, :n], head, 4, softcap)
            assert count == count_alone > 0
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefix_layout_is_layer_major_key_then_value():
    spec = PrefixSpec(num_layers=3, num_kv_heads=2, head_dim=4, length=5)
    enc = PrefixEncoder(spec)
    kv = enc(1)
    flat = enc.embedding.weight.view(5, 3, 2, 2, 4)  # token, layer, key/value, head, dim
    for layer in range(3):
        torch.testing.assert_close(kv[layer][0][0], flat[:, layer, 0].permute(1, 0, 2))
        torch.testing.assert_close(kv[layer][1][0], flat[:, layer, 1].permute(1, 0, 2))


def test_prefix_shape_mismatch_is_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB))
    spec = PrefixSpec(num_layers=3, num_kv_heads=2, head_dim=8, length=4)
    with pytest.raises(ValueError, match=r"layers=3.*layers=2"):
        PrefixLM(model, PrefixEncoder(spec))


def test_training_dropout_per_row_and_off_in_eval():
    spec = PrefixSpec(num_layers=1, num_kv_heads=1, head_dim=8, length=16)
    enc = PrefixEncoder(spec, dropout=0.5)
    enc.train()
    k, _ = enc(2)[0]
    assert k.shape[0] == 2 and not torch.equal(k[0], k[1])
    enc.eval()
    k, _ = enc(2)[0]
    assert k.shape[0] == 1
    torch.testing.assert_close(k[0].permute(1, 0, 2).reshape(16, -1), enc.embedding.weight.view(16, 2, 8)[:, 0])


@pytest.mark.parametrize("family", ["llama", "glm", "qwen2", "gemma2", "gpt2"])
def test_cached_generation_matches_full_recompute_through_the_wrapper(family):
    """Generation keeps the prefix outside the KV cache; greedy tokens must equal recomputing every step
    from scratch through the attention wrapper (the training path), left padding included."""
    from ptune.data import left_pad
    from ptune.generate import generate

    lm = make_lm(family, length=6, projection=True, seed=3)
    with torch.no_grad():
        lm.base.get_output_embeddings().weight.mul_(8)  # peaked logits: no near-ties for argmax to flip on
    prompts = [[5, 9, 11, 40, 3 + 4], [17, 23], [60, 61, 62, 63, 64, 65, 66]]
    batch = left_pad(prompts, pad_token_id=0)
    got = generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=8, eos_token_ids=[],
                   pad_token_id=0)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        for _ in range(8):
            with torch.no_grad():
                nxt = lm(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert got[row].tolist() == ids[0, len(prompt):].tolist(), (family, row)


@pytest.mark.parametrize("family", ["llama", "glm", "qwen2", "gpt2"])
def test_static_cache_sampling_and_eos_match_the_growing_cache(family):
    """The static-cache decoder (a preallocated cache) against the growing cache: same sampled tokens
    from the same row keys, same per-row EOS stop."""
    from ptune.data import left_pad
    from ptune.generate import generate

    lm = make_lm(family, length=5, projection=False, seed=4)
    prompts = [[5, 9, 11, 40, 7], [17, 23], [60, 61, 62, 63, 64, 65, 66], [8]]
    batch = left_pad(prompts, pad_token_id=0)
    keys = [(11, row) for row in range(4)]
    runs = {}
    for static in (True, False):
        runs[static] = generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=12,
                                eos_token_ids=[], pad_token_id=0, do_sample=True, temperature=0.9, top_p=0.95,
                                sample_keys=keys, static_cache=static)
    assert runs[True].shape == (4, 12)
    assert torch.equal(runs[True], runs[False])
    # A token that some row emits becomes EOS: that row stops (pad after it), the others go on.
    eos = int(runs[True][1, 3])
    stopped = {static: generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=12,
                                eos_token_ids=[eos], pad_token_id=0, do_sample=True, temperature=0.9, top_p=0.95,
                                sample_keys=keys, static_cache=static)
               for static in (True, False)}
    assert torch.equal(stopped[True], stopped[False])
    first = runs[True][1].tolist().index(eos)
    assert stopped[True][1, first + 1:].eq(0).all() and stopped[True][1, first] == eos


def test_sampled_tokens_follow_the_temperature_and_top_p_distribution():
    """20000 rows of the same logits, each its own key: token frequencies within 5 standard deviations of
    softmax(logits / temperature) cut to the smallest likeliest set reaching top_p (worked out here with numpy), the
    tokens cut never drawn, and a greedy row in the same batch takes the likeliest token."""
    import numpy as np

    from ptune.generate import Sampler

    rows, logits = 20000, np.array([1.0, 2.0, -3.0, 1.5, 0.2, -1.0])
    p = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
    keep = np.zeros(6, dtype=bool)
    for rank, token in enumerate(np.argsort(-p)):
        keep[token] = True
        if p[np.argsort(-p)[:rank + 1]].sum() >= 0.9:
            break
    want = np.where(keep, p, 0) / p[keep].sum()
    pick = Sampler(rows + 1, [True] * rows + [False], 0.8, 0.9, [(3, i) for i in range(rows)] + [None], 1, "cpu")
    got = pick(torch.tensor(logits, dtype=torch.float32).expand(rows + 1, 6), 0)
    counts = np.bincount(got[:rows].numpy(), minlength=6)
    sigma = np.sqrt(rows * want * (1 - want))
    assert (counts[~keep] == 0).all() and keep.sum() == 3
    assert (np.abs(counts - rows * want) <= 5 * sigma + 1e-9).all(), (counts, rows * want)
    assert got[rows] == 1


def test_a_sampled_row_takes_the_same_tokens_in_any_batch():
    """A row's samples depend on its key, not on the rows beside it, their sampling settings, or its place."""
    from ptune.data import left_pad
    from ptune.generate import generate

    lm = make_lm("llama", length=5, projection=False, seed=4)
    prompts = [[5, 9, 11, 40, 7], [17, 23], [60, 61, 62, 63, 64, 65, 66]]

    def run(rows, **settings):
        batch = left_pad([prompts[r] for r in rows], pad_token_id=0)
        return generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=10, eos_token_ids=[],
                        pad_token_id=0, sample_keys=[(5, r) for r in rows], **settings)

    alone = [run([r], do_sample=True, temperature=1.5, top_p=0.95)[0] for r in range(3)]
    together = run([2, 0, 1], do_sample=True, temperature=1.5, top_p=0.95)
    assert all(torch.equal(together[i], alone[r]) for i, r in enumerate([2, 0, 1]))
    mixed = run([1, 0, 2], do_sample=[True, False, True], temperature=[1.5, 1.0, 0.3], top_p=[0.95, 1.0, 0.5])
    assert torch.equal(mixed[0], alone[1])
    assert torch.equal(mixed[1], run([0])[0])  # greedy beside sampled rows is greedy
    assert len({tuple(t.tolist()) for t in alone}) == 3


def test_a_last_bit_change_in_the_logits_seldom_changes_a_sampled_token():
    """Batched arithmetic changes a row's logits in the last bits (left padding, another matrix shape). Inverse
    transform over the vocabulary's order moves each token's interval by as little; over probabilities sorted
    first, near-equal tokens swap places and whole intervals move, which changed 7 of 16 rows' 64 sampled tokens
    between a row alone and in a batch of 16 on a CPU."""
    from ptune.generate import Sampler

    g = torch.Generator().manual_seed(0)
    rows, vocab = 512, 32000
    logits = torch.randn(rows, vocab, generator=g) * 0.5  # a random model's: nearly flat
    nudged = logits + torch.randn(rows, vocab, generator=g) * 2e-6
    pick = Sampler(rows, True, 1.0, 0.95, [(9, r) for r in range(rows)], 1, "cpu")
    changed = int((pick(logits, 0) != pick(nudged, 0)).sum())
    assert changed <= 2, f"{changed} of {rows} sampled tokens changed"


def test_row_keys_do_not_share_streams():
    """numpy pads a seed with zero words; ptune's keys are laid out so that (42,) and (42, 0) differ."""
    from ptune.generate import row_draws

    draws = row_draws([(42,), (42, 0), (2**32,), (0, 1), (-1,), (2**64 - 1,)], 4, "cpu")
    assert len({tuple(d.tolist()) for d in draws[:5]}) == 5 and torch.equal(draws[4], draws[5])
    assert ((draws > 0) & (draws <= 1)).all()


def test_sampling_without_row_keys_is_refused():
    from ptune.generate import generate

    lm = make_lm("llama", length=5, projection=False, seed=4)
    with pytest.raises(ValueError, match="sample_keys"):
        generate(lm, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), max_new_tokens=2, eos_token_ids=[],
                 pad_token_id=0, do_sample=True)


@pytest.mark.parametrize("family", ["llama", "glm"])
def test_static_prefill_leaves_the_unwritten_cache_out(family, monkeypatch):
    """The prefill attends over the prefix and the prompt, not over the preallocated cache's empty tail;
    a bare model (transformers' own attention, which wants a mask as wide as its keys) decodes as before."""
    import ptune.prefix as prefix_module
    from ptune.data import left_pad
    from ptune.generate import generate

    lm = make_lm(family, length=5, projection=False, seed=4)
    batch = left_pad([[5, 9, 11, 40, 7, 3], [17, 23]], pad_token_id=0)
    seen, real = [], prefix_module.grouped_sdpa

    def spy(module, query, key, *args, **kwargs):
        seen.append((query.shape[2], key.shape[2]))
        return real(module, query, key, *args, **kwargs)

    monkeypatch.setattr(prefix_module, "grouped_sdpa", spy)
    kw = dict(max_new_tokens=7, eos_token_ids=[], pad_token_id=0)
    static = generate(lm, batch["input_ids"], batch["attention_mask"], **kw)
    assert seen == [(6, 5 + 6)] * 2  # both layers' prefill; the decoding steps read the cache in place
    assert torch.equal(static, generate(lm, batch["input_ids"], batch["attention_mask"], static_cache=False, **kw))

    # The wrapped base without a prefix (how a base model is scored), and a bare model
    seen.clear()
    no_prefix = [generate(lm.base, batch["input_ids"], batch["attention_mask"], static_cache=s, **kw)
                 for s in (True, False)]
    assert seen[:2] == [(6, 6)] * 2 and torch.equal(no_prefix[0], no_prefix[1])
    torch.manual_seed(0)
    bare = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB), attn_implementation="sdpa").float()
    outs = [generate(bare, batch["input_ids"], batch["attention_mask"], static_cache=s, **kw) for s in (True, False)]
    assert outs[0].shape == (2, 7) and torch.equal(outs[0], outs[1])


def test_generation_stops_when_every_row_has_finished():
    """Without streaming the stop check runs every few steps; the columns decoded past the last row's EOS
    are trimmed, so the output is what a per-step check gives."""
    from ptune.data import left_pad
    from ptune.generate import generate

    lm = make_lm("llama", length=3, projection=False, seed=5)
    batch = left_pad([[5, 9, 11], [17, 23]], pad_token_id=0)
    free = generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=30, eos_token_ids=[],
                    pad_token_id=0)
    eos = [int(free[0, 2]), int(free[1, 4])]
    streamed = []
    quiet = generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=30, eos_token_ids=eos,
                     pad_token_id=0)
    per_step = generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=30, eos_token_ids=eos,
                        pad_token_id=0, on_token=streamed.append)
    assert torch.equal(quiet, per_step) and len(streamed) == per_step.shape[1]
    last = max(row.index(t) for row in free.tolist() for t in eos if t in row)
    assert quiet.shape[1] <= last + 1 < 30
    assert all(any(t in eos for t in row) for row in quiet.tolist())


def test_mask_derivation_is_built_once_per_mask_and_freed_with_it():
    """Layers of one forward pass share what is derived from their mask; an in-place change rebuilds it,
    and it is released with the mask (after generation nothing of the prefill's stays behind)."""
    import gc
    import weakref

    from ptune import prefix as P
    from ptune.data import left_pad
    from ptune.generate import generate

    built = []

    def build():
        built.append(1)
        return torch.zeros(3)

    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    first = P._memoised(mask, ("k",), build)
    assert P._memoised(mask, ("k",), build) is first and len(built) == 1
    mask[0, 0, 0, 0] = False
    derived = weakref.ref(P._memoised(mask, ("k",), build))
    assert len(built) == 2
    del mask, first
    gc.collect()
    assert P._MEMO[0] is None and derived() is None

    lm = make_lm("glm", length=4, seed=6)
    batch = left_pad([[5, 9, 11], [17]], pad_token_id=0)
    generate(lm, batch["input_ids"], batch["attention_mask"], max_new_tokens=3, eos_token_ids=[], pad_token_id=0)
    gc.collect()
    assert P._MEMO[0] is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the captured decoding graph needs CUDA"))])
@pytest.mark.parametrize("family", ["llama", "glm"])
def test_kept_decoder_gives_the_tokens_of_a_fresh_one(family, device):
    """generate(keep_decoder=True), as chat and serve call it: later calls of the same batch size restart the
    kept decoder (on CUDA its captured graph) on other prompts, lengths and prefix weights, and every call's
    tokens are those of a fresh decoder; a bare call on the same base keeps its own."""
    from ptune.data import left_pad
    from ptune.generate import generate

    lm = make_lm(family, length=5, projection=True, seed=4)  # the prefix is computed, not a view of a weight
    lm.base.to(device)
    lm.prefix.to(device)
    with torch.no_grad():
        lm.base.get_output_embeddings().weight.mul_(8)  # peaked logits: no near-ties between kernels
    calls = [([[5, 9, 11, 40, 7], [17, 23]], 9), ([[60, 61, 62], [8, 9, 10, 11, 12, 13, 14]], 12),
             ([[3], [4, 4]], 5), ([[5, 9, 11, 40, 7], [17, 23]], 9)]
    kept = lm.base.__dict__.get("_ptune_kept_decoders", {})
    first, outs = None, []
    for i, (prompts, new) in enumerate(calls):
        if i == 2:  # other prefix weights, as when chat switches to another checkpoint of the same base
            with torch.no_grad():
                for p in lm.prefix.parameters():
                    p.normal_(0, 3, generator=torch.Generator(device=p.device).manual_seed(9))
        batch = {k: v.to(device) for k, v in left_pad(prompts, pad_token_id=0).items()}
        kw = dict(max_new_tokens=new, eos_token_ids=[], pad_token_id=0)
        got = generate(lm, batch["input_ids"], batch["attention_mask"], keep_decoder=True, **kw)
        assert torch.equal(got, generate(lm, batch["input_ids"], batch["attention_mask"], **kw)), (family, i)
        outs.append(got)
        kept = lm.base.__dict__["_ptune_kept_decoders"]
        assert len(kept) == 1  # one batch size, one length step: every call restarted the same decoder
        decoder = next(iter(kept.values()))
        first = first or decoder
        assert decoder is first
        if device == "cuda" and new > 2:
            assert decoder.graph is not None
    assert not torch.equal(outs[0], outs[3])  # same prompts, other prefix: the prefix does reach the tokens
    bare = generate(lm.base, batch["input_ids"], batch["attention_mask"], keep_decoder=True, **kw)
    assert torch.equal(bare, generate(lm.base, batch["input_ids"], batch["attention_mask"], **kw))
    assert len(lm.base.__dict__["_ptune_kept_decoders"]) == 2  # the prefix-less one is a decoder of its own


def test_kept_decoder_never_writes_into_a_prefix_encoder():
    """Without projection the prefix is a view of the encoder's weights; two prefixes on one base, taking
    turns with a kept decoder, each give their own tokens and keep their weights."""
    from ptune.data import left_pad
    from ptune.generate import generate

    a = make_lm("llama", length=5, projection=False, seed=4)
    b = PrefixLM(a.base, PrefixEncoder(a.prefix.spec))
    with torch.no_grad():
        a.base.get_output_embeddings().weight.mul_(8)
        b.prefix.embedding.weight.normal_(0, 3, generator=torch.Generator().manual_seed(9))
    b.eval()
    weights = {id(m): m.prefix.embedding.weight.clone() for m in (a, b)}
    batch = left_pad([[5, 9, 11, 40, 7], [17, 23]], pad_token_id=0)
    kw = dict(max_new_tokens=9, eos_token_ids=[], pad_token_id=0)
    fresh = {id(m): generate(m, batch["input_ids"], batch["attention_mask"], **kw) for m in (a, b)}
    assert not torch.equal(fresh[id(a)], fresh[id(b)])
    for m in (a, b, a, b):
        assert torch.equal(generate(m, batch["input_ids"], batch["attention_mask"], keep_decoder=True, **kw),
                           fresh[id(m)])
        assert all(torch.equal(x.prefix.embedding.weight, weights[id(x)]) for x in (a, b))

