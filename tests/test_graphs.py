"""The graph-capturable micro-batch loss is the eager one, and replayed graphs train like eager passes."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import FAMILIES, toy_batch
from ptune.graphs import GraphedMicroBatchLoss, micro_batch_loss
from ptune.loss import output_softcap
from ptune.step import MicroBatchLoss, optimizer_step
from test_prefix import VOCAB, make_lm


def loss_and_grads(fn, lm, batch, seed: int = 0):
    lm.prefix.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lm.prefix.parameters()]


@pytest.mark.parametrize("family", FAMILIES)
def test_capturable_loss_equals_eager_loss(family):
    """4-D mask and every position through the loss: the same sum and prefix gradient as the eager path."""
    lm = make_lm(family, projection=True)
    lm.train()
    batch = toy_batch(VOCAB)
    softcap = output_softcap(lm.config)
    want, want_grads = loss_and_grads(MicroBatchLoss(lm, 4, softcap), lm, batch)
    got, got_grads = loss_and_grads(MicroBatchLoss(lm, 4, softcap, capturable=True), lm, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # The loss counts the labelled tokens only: dropping a row's labels changes it.
    fewer = dict(batch, labels=batch["labels"].clone())
    fewer["labels"][0] = -100
    less, _ = loss_and_grads(MicroBatchLoss(lm, 4, softcap, capturable=True), lm, fewer)
    assert less < want - 1e-3


def test_graphs_stay_off_where_they_cannot_run():
    lm = make_lm("llama")
    assert isinstance(micro_batch_loss(lm, 4, None, cuda_graphs=True, max_shapes=4), MicroBatchLoss)  # CPU
    assert isinstance(micro_batch_loss(lm, 4, None, cuda_graphs=False, max_shapes=4), MicroBatchLoss)


def test_optimizer_step_keeps_gradient_buffers():
    """Gradients accumulate into buffers made before the first micro-batch and are zeroed, not dropped, after."""
    lm = make_lm("llama")
    lm.train()
    params = list(lm.prefix.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = toy_batch(VOCAB)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    before = [p.detach().clone() for p in params]
    result = optimizer_step(MicroBatchLoss(lm, 4, None), params, halves, 20, opt, scaler, max_grad_norm=1.0)
    assert result.applied and result.grad_norm > 0
    assert all(p.grad is not None and not p.grad.any() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "glm"])
def test_replayed_graphs_match_eager_steps(family):
    """Two optimizer steps of 3 micro-batches in 2 shapes, with prefix dropout: graphs vs eager, same seeds."""
    assert_graphed_steps_match_eager(family)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("mode", [None, "int4"])
def test_training_graphs_after_a_freed_decoding_graph(mode):
    """Every capture runs on torch's one default capture stream. Training graphs captured after a decoding
    graph had been freed used the cuBLAS workspace that graph had made in its own pool; once that pool went
    back to the driver, their replay hit an illegal memory access (bf16 and int4 bases alike). Each capture
    now makes its own."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from ptune import quant
    from ptune.data import left_pad
    from ptune.generate import generate
    from ptune.prefix import PrefixEncoder, PrefixLM, PrefixSpec

    model = AutoModelForCausalLM.from_config(tiny_config("glm", VOCAB)).to("cuda", torch.bfloat16)
    if mode:
        quant.quantize_model(model, mode, 32)
    lm = PrefixLM(model, PrefixEncoder(PrefixSpec.for_model(model.config, 4)).to("cuda", torch.bfloat16))
    batch = left_pad([[5, 9, 11, 40, 7], [17, 23]], pad_token_id=0)
    tokens = generate(lm, batch["input_ids"].cuda(), batch["attention_mask"].cuda(), max_new_tokens=6,
                      eos_token_ids=[], pad_token_id=0)
    assert tokens.shape == (2, 6)
    del lm, model
    gc.collect()

    def release_free_memory():  # what torch holds unused, a freed graph's pool included, back to the driver
        gc.collect()
        torch.cuda.empty_cache()

    assert_graphed_steps_match_eager("llama", between_steps=release_free_memory)


def assert_graphed_steps_match_eager(family, between_steps=lambda: None):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for graphed in (False, True):
        lm = make_lm(family, projection=True)
        lm.base.cuda()
        lm.prefix.cuda()
        lm.prefix.dropout.p = 0.2
        lm.train()
        params = list(lm.prefix.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        fn = (GraphedMicroBatchLoss(lm, 4, None, max_shapes=8) if graphed else MicroBatchLoss(lm, 4, None))
        batch = {k: v.cuda() for k, v in toy_batch(VOCAB).items()}
        micro = [{k: v[:2] for k, v in batch.items()}, {k: v[2:, :8] for k, v in batch.items()},
                 {k: v[:2] for k, v in batch.items()}]
        losses = []
        for step in range(2):
            r = optimizer_step(fn, params, micro, 25, opt, scaler, max_grad_norm=1.0,
                               seeds=[100 * step + i for i in range(3)])
            losses.append(float(r.loss_sum))
            between_steps()
        if graphed:
            assert len(fn.graphed) == 2 and not fn.failed
        results.append((losses, [p.detach().cpu() for p in params]))
    (want_losses, want), (got_losses, got) = results
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_each_captured_shape_keeps_no_cublas_workspace():
    """Every capture warms up on a new stream, and cuBLAS keeps a workspace (tens of MiB) per stream it has
    seen; they are dropped after each capture, so memory stays flat as new shapes are captured."""
    lm = make_lm("llama", projection=True)
    lm.base.cuda()
    lm.prefix.cuda()
    lm.train()
    params = list(lm.prefix.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    fn = GraphedMicroBatchLoss(lm, 4, None, max_shapes=8)
    batch = {k: v.cuda() for k, v in toy_batch(VOCAB).items()}
    allocated = []
    for width in (6, 8, 10, 12):
        optimizer_step(fn, params, [{k: v[:2, :width] for k, v in batch.items()}], 10, opt, scaler, max_grad_norm=1.0)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated() / 2**20)
    assert len(fn.graphed) == 4 and not fn.failed
    assert allocated[-1] - allocated[0] < 4, allocated  # MiB; each kept workspace pair was ~64 MiB on an H100
