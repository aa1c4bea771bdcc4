"""Weight-only int8 / int4 quantization of the frozen base model, in plain PyTorch.

P-tuning trains only the prefix; the base model is read, never updated, so its linear layers can be
stored in 8 or 4 bits and widened back to the compute dtype on the fly. Every ``nn.Linear`` (and
GPT-2's ``Conv1D``) inside the decoder layers becomes a :class:`QuantizedLinear`; the input
embedding, the output layer (``lm_head``) and the norms stay as they are.

* ``int8``: symmetric, one scale per output channel: ``w ~= scale[o] * q``, ``q`` in [-127, 127].
* ``int4``: asymmetric, one scale and one zero point per group of ``group_size`` consecutive input
  features: ``w ~= scale[o, g] * q + offset[o, g]`` with ``q`` in [0, 15] (``offset = -zero_point *
  scale``, kept as a float so the zero point is not rounded). Two values are packed per byte: byte k of a
  group holds its codes k and k + group_size / 2, so a kernel writes both halves as contiguous runs. Each
  group's range is chosen by a small clipping search and two least-squares refinements, which brings
  the output error of a Gaussian 256x512 weight at group 128 from ~9.9% (plain min/max rounding) to
  ~9.3% (Frobenius, relative).
  ``in_features`` that are not a multiple of ``group_size`` are zero-padded to the next multiple
  (the padding is quantized and sliced off again; it costs a little memory on those layers).

Scales and offsets are kept in float32 (they are <7% of the int4 bytes at group 128, <1% for int8).

Why not torchao or bitsandbytes: the GPU machines this project trains on are offline and have neither
installed, and neither can be installed there; this module needs nothing but PyTorch (and, on CUDA, the
triton that comes with it for a one-pass widening kernel, :mod:`ptune.dequant_kernels`). The price is
speed: the weight is widened for every matmul instead of using fused low-bit matmul kernels (except
``torch._weight_int8pack_mm`` for int8 forwards on the CPU where it checks out, and, on CUDA, inputs of
a few rows -- decoding -- for which ptune.dequant_kernels widens the weight in registers only).

The forward and backward go through :class:`_QuantizedMatmul`, an autograd function that dequantizes
the weight into the input's dtype, calls ``F.linear``, and in backward dequantizes it again rather than
saving it: saving it would keep a full-precision copy of every layer alive until backward. Only the
input gets a gradient (the weights are frozen), which is what carries the gradient to the prefix.

Quantizing is done layer by layer, each float layer moved to the device just before (``models.load_model``
keeps the float model in host memory, so the device never holds it whole), freeing each float weight as
soon as its replacement exists. :func:`save_quantized` / :func:`load_quantized` cache the result (one
safetensors file + ``quantization.json``) so a second load skips both the float load and the
quantization; :func:`quantized_base` is the one call ``models.load_model`` needs.

Measured on one H100 (torch 2.11) with the eager dequantize, before the CUDA kernels (which bring int4 to
75% of bf16's speed at micro-batch 1 x 16 and 96% at micro-batch 16, BENCHMARKS.md runs 14 and 17), a
ChatGLM2-6B-shaped GlmForCausalLM with random N(0, 0.02) bf16 weights, prefix 128, rows of 193 tokens:

=========  ==========  ============  ========================  ==========================
base       weights     quantize      train step, micro 16      peak GiB (micro 16 / +ckpt)
=========  ==========  ============  ========================  ==========================
bf16       11.7 GiB    -             0.20 s                    24.0 / 14.0
int8       6.4 GiB     0.2 s         0.27 s (1.35x slower)     18.7 / 8.7
int4/128   4.2 GiB     2.3 s         0.34 s (1.7x slower)      16.5 / 6.5
=========  ==========  ============  ========================  ==========================

(Loading an int4 base with the current code left 4.0 GiB on the device, BENCHMARKS.md run 34.)

Decoding was hit harder (dequantizing a weight costs more than a 16-row matmul with it: ~8x per layer
for int8); since inputs of up to 16 rows are widened in registers only (dequant_kernels.small_matmul),
int8 decodes at bf16's speed and int4 at ~80% of it (BENCHMARKS.md runs 27 and 29). Quantize for memory,
not speed. On such random deep weights the prefix gradient is very sensitive to any weight noise: its
cosine with the bf16 model's was 0.992 for fp32, 0.96 for int8 and 0.15 for int4 at 28 layers (0.86 for
int4 at 2 layers) -- the same as Gaussian noise of the same relative size (9.3%) gives, so it is the
precision, not a defect; check int4 on the real model before training with it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ptune.errors import QuantizationError, first_line
from ptune.settings import DEFAULT_GROUP_SIZE, check_mode

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: int4 nibbles split by group halves (1: interleaved)
WEIGHTS_FILE = "quantized.safetensors"
META_FILE = "quantization.json"

# int4 range search: each group's [min, max] shrunk towards its midpoint by these factors, the one with
# the smallest squared error kept; then _LSQ_STEPS least-squares refits of scale and offset.
_CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)
_LSQ_STEPS = 2
_CHUNK_ELEMENTS = 1 << 24  # rows are quantized in chunks of about this many weights (bounds temporaries)
_TINY = 1e-12


# --------------------------------------------------------------------------------------- kernels


def padded_in_features(in_features: int, mode: str, group_size: int) -> int:
    """Width of the stored int4 weight: `in_features` rounded up to a multiple of `group_size`."""
    if mode == "int8":
        return in_features
    return -(-in_features // group_size) * group_size


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 `(out, in)`, scale float32 `(out,)`), symmetric per output channel."""
    out_f, in_f = weight.shape
    q = torch.empty((out_f, in_f), dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_f, dtype=torch.float32, device=weight.device)
    for rows in _row_chunks(out_f, in_f):
        w = weight[rows].float()
        s = (w.abs().amax(dim=1) / 127).clamp(min=_TINY)
        q[rows] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[rows] = s
    return q, scale


def _fit_int4_groups(wg: torch.Tensor):
    """Best (q, scale, offset) for float32 groups `(rows, groups, size)`; q is uint8 in [0, 15]."""
    lo0 = wg.amin(dim=-1, keepdim=True)
    hi0 = wg.amax(dim=-1, keepdim=True)
    mid, half = (hi0 + lo0) / 2, (hi0 - lo0) / 2
    best = None
    for ratio in _CLIP_RATIOS:  # the range with the smallest squared error, per group
        scale = (2 * half * ratio / 15).clamp(min=_TINY)
        offset = mid - half * ratio
        q = torch.round((wg - offset) / scale).clamp_(0, 15)
        err = (q * scale + offset - wg).square_().sum(dim=-1, keepdim=True)
        if best is None:
            best = [scale, offset, err]
        else:
            better = err < best[2]
            best = [torch.where(better, new, old) for new, old in zip((scale, offset, err), best)]
    scale, offset, _ = best
    for step in range(_LSQ_STEPS + 1):
        q = torch.round((wg - offset) / scale).clamp_(0, 15)
        if step == _LSQ_STEPS:
            break
        # Least-squares scale and offset for these integer codes (never worse: re-rounding can only help);
        # the old ones are kept where the fit degenerates (a constant group).
        qm, wm = q.mean(dim=-1, keepdim=True), wg.mean(dim=-1, keepdim=True)
        qc = q - qm
        var = (qc * qc).sum(dim=-1, keepdim=True)
        fit = (qc * (wg - wm)).sum(dim=-1, keepdim=True) / var.clamp(min=_TINY)
        ok = (var > 0) & (fit > _TINY)
        scale = torch.where(ok, fit, scale)
        offset = torch.where(ok, wm - fit * qm, offset)
    return q.to(torch.uint8), scale.squeeze(-1), offset.squeeze(-1)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 `(out, in_pad / 2)`, scale and offset float32 `(out, in_pad / group_size)`)."""
    check_mode("int4", group_size)
    out_f, in_f = weight.shape
    in_pad = padded_in_features(in_f, "int4", group_size)
    groups = in_pad // group_size
    packed = torch.empty((out_f, in_pad // 2), dtype=torch.uint8, device=weight.device)
    scale = torch.empty((out_f, groups), dtype=torch.float32, device=weight.device)
    offset = torch.empty((out_f, groups), dtype=torch.float32, device=weight.device)
    for rows in _row_chunks(out_f, in_pad):
        w = weight[rows].float()
        if in_pad != in_f:
            w = F.pad(w, (0, in_pad - in_f))
        q, s, o = _fit_int4_groups(w.view(w.shape[0], groups, group_size))
        half = group_size // 2  # byte k of a group: code k (low nibble), code k + half (high nibble)
        packed[rows] = (q[..., :half] | (q[..., half:] << 4)).view(w.shape[0], in_pad // 2)
        scale[rows], offset[rows] = s, o
    return packed, scale, offset


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 codes `(out, 2 * cols)` from two-per-byte `(out, cols)`: in each group, the low nibbles are its
    first half and the high nibbles its second half."""
    g = packed.view(packed.shape[0], -1, group_size // 2)
    return torch.cat((g & 0x0F, g >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, in_features: int,
               group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The `(out, in_features)` weight in `dtype` (int8 when `offset` is None, else packed int4).

    Computed in float32 and rounded to `dtype` once, as the CUDA kernels do."""
    if offset is None:
        return (qweight.float() * scale.unsqueeze(1)).to(dtype)
    out_f = qweight.shape[0]
    w = unpack_int4(qweight, group_size).float().view(out_f, -1, group_size)
    w = (w * scale.unsqueeze(-1) + offset.unsqueeze(-1)).to(dtype).view(out_f, -1)
    return w if w.shape[1] == in_features else w[:, :in_features]


# ``torch._weight_int8pack_mm(x, q, scale)`` computes x @ (q * scale).T without widening the weight. It
# exists on CPU in recent PyTorch, where it is ~3x faster than dequantize + matmul for bf16 inputs but
# 7x (fp16) to 30x (fp32) slower (measured, torch 2.13, 2048x2048, 256 rows). So it serves bf16 int8
# forwards on the CPU, after a one-off check against the dequantizing path. False: always dequantize.
USE_INT8PACK_MM = True
_int8pack_checked: dict[tuple[str, torch.dtype], bool] = {}


def _int8pack_ok(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _int8pack_checked:
        ok = False
        if hasattr(torch, "_weight_int8pack_mm") and dtype == torch.bfloat16:
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                x = torch.randn(5, 64, generator=g).to(device=device, dtype=dtype)
                q = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8).to(device)
                s = (torch.rand(48, generator=g) / 100 + 1e-3).to(device)
                with torch.no_grad():
                    got = torch._weight_int8pack_mm(x, q, s.to(dtype)).float()
                    want = F.linear(x, dequantize(q, s, None, 64, 0, dtype)).float()
                ok = bool(((got - want).norm() / want.norm()) < 1e-2)  # bf16 rounding is ~4e-3
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _int8pack_checked[key] = ok
        log.debug("torch._weight_int8pack_mm on %s/%s: %s", device.type, dtype, "used" if ok else "not used")
    return _int8pack_checked[key]


# On CUDA the eager dequantize above writes and rereads full-size temporaries (unpacked codes, widened
# weight, scaled weight); ptune.dequant_kernels does it in one pass (the whole int4 ChatGLM2-6B-shaped base
# on an H100: 77 ms eager, 6 ms there; BENCHMARKS.md run 14). If triton is missing or a launch fails, eager
# it stays, with a warning.
FUSED_DEQUANTIZE = True


def _dequantize_on(device: torch.device) -> Callable:
    return _fused_dequantize if FUSED_DEQUANTIZE and device.type == "cuda" else dequantize


def _fused_dequantize(*args) -> torch.Tensor:
    global FUSED_DEQUANTIZE
    try:
        from ptune import dequant_kernels

        return dequant_kernels.dequantize(*args)
    except Exception as e:  # noqa: BLE001 -- the kernel is an optimisation: fall back, say so once
        log.warning("dequantizing without the fused CUDA kernel from now on: %s: %s", type(e).__name__, e)
        FUSED_DEQUANTIZE = False
        return dequantize(*args)


# A few rows (decoding) are multiplied without widening the weight in memory
# (ptune.dequant_kernels.small_matmul): the widened weight costs 4.5 bytes of traffic a value for int4,
# the codes 0.5. False, or a failed launch (warned once): widen as for any other input.
FUSED_SMALL_MATMUL = True


def _fused_small_matmul(x, qweight, scale, offset, bias, in_features: int, group_size: int) -> torch.Tensor | None:
    """x W^T + bias by ptune.dequant_kernels.small_matmul, or None where it does not serve (or failed)."""
    global FUSED_SMALL_MATMUL
    try:
        from ptune import dequant_kernels

        if not dequant_kernels.small_matmul_fits(x, group_size):
            return None
        out = dequant_kernels.small_matmul(x.reshape(-1, in_features), qweight, scale, offset, in_features, bias)
        return out.view(*x.shape[:-1], qweight.shape[0])
    except Exception as e:  # noqa: BLE001 -- the kernel is an optimisation: fall back, say so once
        log.warning("multiplying small batches by the widened weight from now on: %s: %s", type(e).__name__, e)
        FUSED_SMALL_MATMUL = False
        return None


def _linear_forward(x, qweight, scale, offset, bias, in_features: int, group_size: int) -> torch.Tensor:
    if FUSED_SMALL_MATMUL and x.device.type == "cuda":
        out = _fused_small_matmul(x, qweight, scale, offset, bias, in_features, group_size)
        if out is not None:
            return out
    dtype = x.dtype
    b = bias.to(dtype) if bias is not None else None
    if offset is None and USE_INT8PACK_MM and x.device.type == "cpu" and _int8pack_ok(x.device, dtype):
        out = torch._weight_int8pack_mm(x.reshape(-1, in_features).contiguous(), qweight, scale.to(dtype))
        out = out.view(*x.shape[:-1], qweight.shape[0])
        return out + b if b is not None else out
    return F.linear(x, _dequantize_on(x.device)(qweight, scale, offset, in_features, group_size, dtype), b)


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T + b with W stored quantized; gradient for x only, W re-dequantized in backward."""

    @staticmethod
    def forward(ctx, x, qweight, scale, offset, bias, in_features, group_size):
        ctx.save_for_backward(qweight, scale, offset)  # the stored low-bit tensors: no new memory
        ctx.in_features, ctx.group_size = in_features, group_size
        return _linear_forward(x, qweight, scale, offset, bias, in_features, group_size)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, scale, offset = ctx.saved_tensors
            w = _dequantize_on(grad_out.device)(qweight, scale, offset, ctx.in_features, ctx.group_size,
                                                grad_out.dtype)
            grad_x = grad_out.matmul(w)
        return grad_x, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------- module


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored as int8 (per-channel) or packed int4 (per-group)."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = DEFAULT_GROUP_SIZE, bias: bool = True,
                 bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        check_mode(mode, group_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.mode, self.group_size = mode, int(group_size) if mode == "int4" else 0
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
            self.offset = None
        else:
            in_pad = padded_in_features(in_features, mode, group_size)
            self.register_buffer("qweight", torch.empty(out_features, in_pad // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty(out_features, in_pad // group_size, dtype=torch.float32,
                                                      device=device))
            self.register_buffer("offset", torch.empty(out_features, in_pad // group_size, dtype=torch.float32,
                                                       device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> "QuantizedLinear":
        """Quantize an `nn.Linear` or a transformers `Conv1D` (weight stored transposed) on its device."""
        weight = layer.weight.detach()
        if not isinstance(layer, nn.Linear):  # Conv1D: y = x @ W + b with W (in, out)
            weight = weight.t()
        out_f, in_f = weight.shape
        bias = getattr(layer, "bias", None)
        new = cls(in_f, out_f, mode, group_size, bias=bias is not None, bias_dtype=weight.dtype, device="meta")
        if mode == "int8":
            new.qweight, new.scale = quantize_int8(weight)
        else:
            new.qweight, new.scale, new.offset = quantize_int4(weight, group_size)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize(self.qweight, self.scale, self.offset, self.in_features, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantizedMatmul.apply(x, self.qweight, self.scale, self.offset, self.bias, self.in_features,
                                          self.group_size)
        return _linear_forward(x, self.qweight, self.scale, self.offset, self.bias, self.in_features,
                               self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}, "
                f"bias={self.bias is not None}")


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts or name.endswith("." + s) for s in skip)


def quantizable_layers(model, skip=("lm_head",)) -> list[str]:
    """Qualified names of the linear layers inside the decoder (never the embeddings or the output layer)."""
    if not hasattr(model, "get_decoder"):
        raise QuantizationError(f"{type(model).__name__}: no get_decoder(); pass the transformers base model "
                                "(quantize before wrapping it in a PrefixLM)")
    body = model.get_decoder()
    inside = {id(m) for m in body.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds = _linear_types()
    return [name for name, m in model.named_modules()
            if id(m) in inside and isinstance(m, kinds) and m is not head and not _skipped(name, skip)]


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@torch.no_grad()
def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE, skip=("lm_head",),
                   device: torch.device | str | None = None) -> dict:
    """Replace the decoder's linear layers by :class:`QuantizedLinear`, one at a time, in place.

    With `device`, each float layer is moved there just before it is quantized, so that device never holds
    more than one float layer (the rest of the model stays where it is).

    Returns a summary: layers replaced, those padded to the group size, and weight bytes before/after.
    """
    check_mode(mode, group_size)
    names = quantizable_layers(model, skip)
    if not names:
        raise QuantizationError(f"{type(model).__name__}: no linear layers found inside the decoder to quantize")
    t0 = time.perf_counter()
    before = after = padded = 0
    on_cuda = False
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if layer.weight.device.type == "meta":
            raise QuantizationError(f"{name}: weight on the meta device; load the weights first (or use "
                                    "load_quantized for a cached model)")
        if device is not None:
            layer.to(device)
        on_cuda |= layer.weight.device.type == "cuda"
        before += _tensor_bytes(layer.weight)
        new = QuantizedLinear.from_float(layer, mode, group_size)
        setattr(parent, child, new)  # the float layer is now unreferenced and freed
        del layer
        after += sum(_tensor_bytes(t) for t in (new.qweight, new.scale, new.offset))
        padded += padded_in_features(new.in_features, mode, group_size) != new.in_features
    if on_cuda:
        torch.cuda.empty_cache()
    model.ptune_quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    summary = {"mode": mode, "group_size": group_size if mode == "int4" else None, "layers": len(names),
               "padded_layers": padded, "bytes_before": before, "bytes_after": after,
               "seconds": round(time.perf_counter() - t0, 3)}
    log.info("quantized %d decoder linear layers to %s: %.1f MiB -> %.1f MiB in %.1fs%s", len(names), mode,
             before / 2**20, after / 2**20, summary["seconds"],
             f" ({padded} padded to a multiple of {group_size})" if padded else "")
    return summary


# ----------------------------------------------------------------------------------------- cache


def source_fingerprint(path: str | Path) -> dict:
    """Size and mtime of a model folder's config and weight files: a cache made from them is still valid
    while these are unchanged."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")))
    return {"path": str(path.resolve()), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


# What a cache folder holds (save_quantized); files of an interrupted write start with a dot.
CACHE_FILES = (WEIGHTS_FILE, META_FILE, "config.json", "generation_config.json")


def check_cache_folder(directory: Path) -> None:
    """Refuse a cache folder that holds files of its own (another model, say): a save writes over config.json."""
    others = sorted(p.name for p in directory.iterdir() if p.name not in CACHE_FILES
                    and not p.name.startswith(".")) if directory.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise QuantizationError(f"model.quantization_cache={directory}: holds {shown}, so it is not a quantized "
                                "cache, and writing one there would replace its config.json; give an empty or new "
                                "folder")


def cache_matches(directory: str | Path, mode: str, group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype | None = None,
                  source: dict | None = None) -> bool:
    """Whether `directory` holds a complete cache of this mode/group size (and dtype, and source when given)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    if meta is None or not (directory / WEIGHTS_FILE).is_file() or meta.get("format_version") != FORMAT_VERSION:
        return False
    if meta.get("mode") != mode or (mode == "int4" and meta.get("group_size") != int(group_size)):
        return False
    if dtype is not None and meta.get("dtype") != str(dtype).removeprefix("torch."):
        return False
    return source is None or meta.get("source") == source


def save_quantized(model, directory: str | Path, source: dict | None = None) -> Path:
    """Write a quantized model to `directory`: every parameter and buffer (one copy of tied tensors) in
    `quantized.safetensors`, plus `config.json`, `generation_config.json` and `quantization.json`
    (mode, group size, dtype, the quantized layers, tied names, `source` as given)."""
    from ptune.files import save_tensors

    info = getattr(model, "ptune_quantization", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if info is None or not layers:
        raise QuantizationError("save_quantized: the model has no quantized layers; call quantize_model first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # the cache is invalid until complete
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    save_tensors(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    float_dtype = next((t.dtype for n, t in named if t.is_floating_point() and not n.endswith((".scale", ".offset"))),
                       torch.float32)
    meta = {
        "format_version": FORMAT_VERSION,
        "mode": info["mode"],
        "group_size": info["group_size"],
        "dtype": str(float_dtype).removeprefix("torch."),
        "architecture": type(model).__name__,
        "layers": {n: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
                   for n, m in layers.items()},
        "tied": tied,
        "source": source,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return directory


def _skeleton(directory: Path, attn_implementation: str | None, meta: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if type(model).__name__ != meta.get("architecture"):
        raise QuantizationError(f"{directory}: config builds a {type(model).__name__}, the cache holds a "
                                f"{meta.get('architecture')}")
    return model


def load_quantized(directory: str | Path, model=None, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """A quantized model from a :func:`save_quantized` folder, without any float weights or quantization.

    `model`: optional skeleton of the same architecture (e.g. built on the meta device) to fill; by default
    one is built on the meta device from the folder's `config.json`. `dtype` casts the float tensors
    (embeddings, norms, biases, output layer); scales stay float32. Returns the model, frozen, in eval mode.
    """
    from safetensors import safe_open

    directory = Path(directory)
    meta = _read_meta(directory)
    if meta is None or not (directory / WEIGHTS_FILE).is_file():
        raise QuantizationError(f"{directory}: no complete quantized model here ({META_FILE} + {WEIGHTS_FILE})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(f"{directory}: cache format {meta.get('format_version')}, this ptune reads "
                                f"{FORMAT_VERSION}; delete the folder to rebuild it")
    if model is None:
        model = _skeleton(directory, attn_implementation, meta)
    mode, group = meta["mode"], meta["group_size"] or 0
    for name, spec in meta["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear(spec["in_features"], spec["out_features"], mode, group or DEFAULT_GROUP_SIZE,
                                               bias=spec["bias"], device="meta"))
    device = torch.device(device)
    loaded: set[str] = set()
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if dtype is not None and t.is_floating_point() and not (
                    isinstance(parent, QuantizedLinear) and attr in ("scale", "offset")):
                t = t.to(dtype)
            t = t.to(device)
            if attr in parent._parameters:
                parent._parameters[attr] = nn.Parameter(t, requires_grad=False)
            elif attr in parent._buffers:
                parent._buffers[attr] = t
            else:
                raise QuantizationError(f"{directory}: {name} has no place in {type(model).__name__}")
            loaded.add(name)
    for name, source in meta["tied"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        src_parent, _, src_attr = source.rpartition(".")
        src = model.get_submodule(src_parent) if src_parent else model
        if src_attr in src._parameters:
            parent._parameters[attr] = src._parameters[src_attr]
        else:
            parent._buffers[attr] = src._buffers[src_attr]
    left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) +
            list(model.named_buffers(remove_duplicate=False)) if t is not None and t.device.type == "meta"]
    if left:
        raise QuantizationError(f"{directory}: the cache lacks {left[:5]}{' ...' if len(left) > 5 else ''}")
    gen = directory / "generation_config.json"
    if gen.is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.ptune_quantization = {"mode": mode, "group_size": meta["group_size"]}
    model.requires_grad_(False)
    model.eval()
    return model


def quantized_base(load_float: Callable[[], nn.Module], mode: str, group_size: int = DEFAULT_GROUP_SIZE, *,
                   cache_dir: str | Path | None = None, source: str | Path | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                   attn_implementation: str | None = None):
    """The quantized base: from `cache_dir` when it holds this mode/group/dtype of `source`'s current
    files, else `load_float()` quantized layer by layer onto `device` (and saved to `cache_dir` when given)."""
    check_mode(mode, group_size)
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        check_cache_folder(cache_dir)
    fingerprint = source_fingerprint(source) if source is not None else None
    if cache_dir is not None and cache_matches(cache_dir, mode, group_size, dtype, fingerprint):
        log.info("loading the %s-quantized base from %s", mode, cache_dir)
        try:
            return load_quantized(cache_dir, device=device, dtype=dtype, attn_implementation=attn_implementation)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- damaged after it was written (a cut copy, a full disk, an edit):
            # whatever it is, the base it was made from makes it again
            log.warning("the quantized cache in %s cannot be read (%s: %s); rebuilding it from the base model",
                        cache_dir, type(e).__name__, first_line(e))
    model = load_float()
    quantize_model(model, mode, group_size, device=device)
    model.to(device)
    if cache_dir is not None:
        try:
            save_quantized(model, cache_dir, source=fingerprint)
            log.info("cached the quantized base in %s", cache_dir)
        except OSError as e:  # a folder recorded on another machine, a file in the way, a full disk: the quantized
            # model is here all the same, and minutes of quantizing are not thrown away for want of a cache
            log.warning("could not cache the quantized base in model.quantization_cache=%s (%s); going on without "
                        "the cache: fix that folder, or set model.quantization_cache=null", cache_dir,
                        e.strerror or e)
    return model
