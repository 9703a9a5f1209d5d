"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") and round-to-nearest, per layer and for a whole Qwen model.

Per layer, GPTQ minimises ||W X - Q X||^2 over the calibration inputs X, one input column at a
time, in the Optimal Brain Surgeon way: quantizing column k leaves an error that is spread over
the not-yet-quantized columns through the inverse Hessian H^-1 (H = 2 X X^T / n). The paper's
three practical steps are all here:

* arbitrary order, lazily batched: columns are processed in blocks; inside a block the update is
  applied to the block only, and the accumulated block error updates the rest of the matrix with
  one matmul when the block is done (exact, just cache-friendly);
* the Cholesky reformulation: the rows of H^-1 needed at each step are those of the upper Cholesky
  factor of H^-1, computed once, after dampening H with ``damp_percent`` x mean(diag H);
* act-order (``desc_act``): columns are quantized by decreasing Hessian diagonal, so the columns
  with the largest activations are quantized while the most freedom remains; ``g_idx`` then records
  each input's group (groups follow the processing order unless ``static_groups``).

A group's scale and zero point are chosen when its first column is reached, from the current
(already error-updated) weights of the whole group. Blocks are aligned to groups so this "current"
is exact; AutoGPTQ, for groups smaller than its 128-column block, reads values that miss the
updates from earlier columns of the same block. Everything is deterministic for a given input.

Model level (``quantize_model``): calibration sequences run through the model block by block; for
each block the linear layers are quantized in AutoGPTQ's true-sequential order ([c_attn],
[attn.c_proj], [w1, w2], [mlp.c_proj]), each group with inputs computed by the already-quantized
layers before it, and the quantized block's outputs feed the next block.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .layout import SEQUENTIAL_GROUPS, GPTQConfig, QuantConfigError, effective_group_size, num_groups
from .linear import QuantLinear

logger = logging.getLogger(__name__)

BLOCK_SIZE = 128


@dataclass
class QuantizedWeight:
    """Integer codes q [N, K] with per-group scales and zero points [G, N] and the group of each input [K]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float = 0.0  # GPTQ's sum of squared, H^-1-weighted errors (0 for round-to-nearest)

    def dequantize(self) -> torch.Tensor:
        gi = self.g_idx.long()
        return (self.q.float() - self.zeros[gi].t().float()) * self.scales[gi].t().float()


# ---------------------------------------------------------------------------------------------- grid
def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [N, c] covering the row's range (and 0).

    Symmetric: zero 2^(bits-1) and a step that maps +-max|w| to +-(2^bits - 1)/2, the centre of the
    code range. Asymmetric: the min..max range over 2^bits - 1 steps, zero in [1, 2^bits - 1] (the
    checkpoint stores zero - 1, so zero 0 is not representable). Scales are rounded to float16
    first, so the codes are computed with the exact scale a loader will use.
    """
    maxq = (1 << bits) - 1
    w = w.float()
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        amax = torch.maximum(-lo, hi)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -torch.ones_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
        scale = (hi - lo) / maxq
        zero = None
    scale = _fp16_scale(scale)
    if zero is None:
        zero = torch.clamp(torch.round(-lo / scale), 1, maxq)
    return scale, zero


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(torch.float16).tiny
    return scale.clamp(min=tiny, max=torch.finfo(torch.float16).max).to(torch.float16).float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


# ---------------------------------------------------------------------------------------------- RTN
def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest with the same grid as GPTQ (the baseline GPTQ improves on)."""
    w = weight.detach()
    n, k = w.shape
    g = effective_group_size(k, group_size)
    groups = num_groups(k, group_size)
    maxq = (1 << bits) - 1
    q = torch.empty(n, k, dtype=torch.int32, device=w.device)
    scales = torch.empty(groups, n, device=w.device)
    zeros = torch.empty(groups, n, device=w.device)
    full = k // g
    # Several whole groups per step, as one [N * groups, g] problem: few Python steps, bounded temporaries.
    step = max(1, (1 << 24) // max(n * g, 1))
    for g0 in range(0, full, step):
        g1 = min(g0 + step, full)
        part = w[:, g0 * g : g1 * g].float().reshape(n * (g1 - g0), g)
        scale, zero = find_params(part, bits, sym)
        codes = quantize_codes(part, scale[:, None], zero[:, None], maxq)
        q[:, g0 * g : g1 * g] = codes.reshape(n, (g1 - g0) * g).to(torch.int32)
        scales[g0:g1] = scale.reshape(n, g1 - g0).t()
        zeros[g0:g1] = zero.reshape(n, g1 - g0).t()
    if full < groups:  # a last, shorter group (group size not dividing K)
        part = w[:, full * g :].float()
        scale, zero = find_params(part, bits, sym)
        q[:, full * g :] = quantize_codes(part, scale[:, None], zero[:, None], maxq).to(torch.int32)
        scales[full], zeros[full] = scale, zero
    g_idx = (torch.arange(k, device=w.device) // g).to(torch.int32)
    return QuantizedWeight(q, scales, zeros.to(torch.int32), g_idx)


# ---------------------------------------------------------------------------------------------- GPTQ
class HessianAccumulator:
    """H = 2 X X^T / n over every input row seen (the layer-wise GPTQ objective's Hessian)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.device != self.hessian.device:
            x = x.to(self.hessian.device)
        rows = x.shape[0]
        if rows == 0:
            return
        # A running mean keeps H's scale independent of the number of calibration tokens.
        self.hessian.mul_(self.count / (self.count + rows))
        self.count += rows
        x = x * math.sqrt(2 / self.count)
        self.hessian.addmm_(x.t(), x)


def _block_size(group: int) -> int:
    """A block size such that no group starts inside a block (so a group's scale sees updated weights)."""
    if group <= BLOCK_SIZE:
        return (BLOCK_SIZE // group) * group
    return max(d for d in range(1, BLOCK_SIZE + 1) if group % d == 0)


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    eye = torch.eye(hessian.shape[0], device=hessian.device)
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + (damp * 10**attempt) * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            if attempt == 5:
                raise
            logger.warning("GPTQ: Hessian not positive definite with damping %.3g; retrying with 10x more",
                           damp * 10**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    static_groups: bool = False,
) -> QuantizedWeight:
    """GPTQ for one linear layer: weight [N, K], hessian [K, K] from its calibration inputs."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n, k = w.shape
    maxq = (1 << bits) - 1
    g = effective_group_size(k, group_size)
    groups = num_groups(k, group_size)

    # Inputs that were always zero carry no information: fix their Hessian entry, zero their weights.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    scales = torch.zeros(groups, n, device=w.device)
    zeros = torch.zeros(groups, n, device=w.device)
    if static_groups:
        # Groups of the original column order, parameters fixed before any update (AutoGPTQ's static_groups).
        for i in range(groups):
            scales[i], zeros[i] = find_params(w[:, i * g : (i + 1) * g], bits, sym)

    if desc_act:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(k, device=w.device)
    group_at = perm // g if static_groups else torch.arange(k, device=w.device) // g  # group of each position

    damp = damp_percent * float(torch.mean(torch.diagonal(h)))
    hinv = _upper_cholesky_of_inverse(h, damp)
    del h

    q = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    losses = torch.zeros(n, device=w.device)
    block = BLOCK_SIZE if static_groups else _block_size(g)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            pos = b0 + i
            if not static_groups and pos % g == 0:
                # The group's current weights: in-block columns from w_blk, later ones from w (up to
                # date, since groups never start inside a block).
                end = min(pos + g, k)
                current = torch.cat([w_blk[:, i:], w[:, b1:end]], dim=1)[:, : end - pos]
                scales[pos // g], zeros[pos // g] = find_params(current, bits, sym)
            grp = int(group_at[pos])
            col = w_blk[:, i]
            codes = quantize_codes(col, scales[grp], zeros[grp], maxq)
            q[:, pos] = codes.to(torch.int32)
            d = hinv_blk[i, i]
            err = (col - scales[grp] * (codes - zeros[grp])) / d
            losses += err.square() / 2
            # OBS update of the block's remaining columns (row i of the Cholesky factor of H^-1).
            w_blk[:, i:].sub_(err[:, None] * hinv_blk[i, i:][None, :])
            err_blk[:, i] = err
        # Lazy batch update: everything after the block at once.
        w[:, b1:].sub_(err_blk @ hinv[b0:b1, b1:])

    inverse = torch.argsort(perm)
    q = q[:, inverse]
    g_idx = group_at[inverse].to(torch.int32)
    return QuantizedWeight(q, scales, zeros.to(torch.int32), g_idx, loss=float(losses.sum()))


# ---------------------------------------------------------------------------------------------- model
class _StopForward(Exception):
    pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from ..checkpoint import progress_bar

    return progress_bar(total, desc, enabled, unit="layer", leave=False, disable=None)


def quantized_layer_names(model: nn.Module) -> list[str]:
    names = []
    for i in range(len(model.transformer.h)):
        for group in SEQUENTIAL_GROUPS:
            names += [f"transformer.h.{i}.{m}" for m in group]
    return names


def check_quantizable(model: nn.Module, config: GPTQConfig) -> None:
    """Raise QuantConfigError when a layer's shape does not fit the config (named, with valid group sizes)."""
    per = 32 // config.bits
    for name in quantized_layer_names(model):
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise QuantConfigError(f"{name} is a {type(layer).__name__}, expected nn.Linear (already quantized?)")
        k, n = layer.in_features, layer.out_features
        if k % per or n % per:
            raise QuantConfigError(f"{name} ({k} -> {n}): {config.bits}-bit packing needs both sizes to be "
                                   f"multiples of {per}")
        if config.group_size != -1 and k % config.group_size:
            sizes = _common_group_sizes(model)
            raise QuantConfigError(
                f"group_size {config.group_size} does not divide {name}'s {k} inputs; exllama and vLLM need "
                f"whole groups. Group sizes that divide every layer: {sizes} or -1 (one group per row)"
            )


def _common_group_sizes(model: nn.Module) -> list[int]:
    ks = {model.get_submodule(n).in_features for n in quantized_layer_names(model)}
    gcd = 0
    for k in ks:
        gcd = math.gcd(gcd, k)
    return [d for d in range(gcd, 0, -1) if gcd % d == 0][:8]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _to_quant_linear(linear: nn.Linear, result: QuantizedWeight, config: GPTQConfig) -> QuantLinear:
    return QuantLinear.from_codes(result.q.cpu(), result.scales.cpu(), result.zeros.cpu(), result.g_idx.cpu(),
                                  config.bits, config.group_size,
                                  bias=None if linear.bias is None else linear.bias.detach().float().cpu())


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, config: GPTQConfig, progress: bool = True) -> nn.Module:
    """Round-to-nearest quantization of every block linear, in place; returns the model."""
    check_quantizable(model, config)
    names = quantized_layer_names(model)
    bar = _progress(len(names), "RTN", progress)
    for name in names:
        linear = model.get_submodule(name)
        result = quantize_rtn(linear.weight, config.bits, config.group_size, config.sym)
        _replace(model, name, _to_quant_linear(linear, result, config))
        bar.update(1)
    bar.close()
    _mark_quantized(model, config)
    return model


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module,
    config: GPTQConfig,
    calibration: Sequence[torch.Tensor],
    progress: bool = True,
    device: torch.device | str | None = None,
    on_layer: Callable[[str, QuantizedWeight], None] | None = None,
) -> nn.Module:
    """GPTQ-quantize every block linear of ``model`` in place with the calibration sequences (1-D id tensors).

    Each block runs in float32 on ``device`` (default: where the block is); the model may be stored
    in bf16/fp16 to save memory. Peak memory: the model + the calibration hidden states in fp32
    (samples x tokens x hidden x 4 bytes, twice) + one block in fp32 + one Hessian (K x K fp32).
    """
    if not calibration:
        raise QuantConfigError("GPTQ needs calibration data (at least one sequence)")
    check_quantizable(model, config)
    was_training = model.training
    model.eval()
    blocks = model.transformer.h
    compute = torch.device(device) if device is not None else next(blocks[0].parameters()).device

    # Capture block 0's inputs (hidden states + the positional arguments the model passes) per sequence.
    inputs: list[tuple[torch.Tensor, tuple, dict]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args[0], args[1:], kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in calibration:
            ids = ids.reshape(1, -1).to(model.transformer.wte.weight.device)
            try:
                model(ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    states = [x.to(compute, torch.float32) for x, _, _ in inputs]
    extras = [(_move(a, compute), _move(kw, compute)) for _, a, kw in inputs]
    inputs.clear()

    names = quantized_layer_names(model)
    bar = _progress(len(names), "GPTQ", progress)
    for index, block in enumerate(blocks):
        work = copy.deepcopy(block).to(compute, torch.float32)
        groups = SEQUENTIAL_GROUPS if config.true_sequential else (tuple(m for grp in SEQUENTIAL_GROUPS for m in grp),)
        results: dict[str, QuantizedWeight] = {}
        for group in groups:
            hessians = _collect_hessians(work, group, states, extras, compute)
            for sub in group:
                linear = work.get_submodule(sub)
                full = f"transformer.h.{index}.{sub}"
                if hasattr(bar, "set_postfix_str"):
                    bar.set_postfix_str(full)
                acc = hessians[sub]
                result = quantize_gptq(linear.weight, acc.hessian, config.bits, config.group_size, config.sym,
                                       config.damp_percent, config.desc_act, config.static_groups)
                # Later groups and the next block must see this layer's quantized output.
                linear.weight.copy_(result.dequantize().to(linear.weight.dtype))
                results[sub] = result
                if on_layer is not None:
                    on_layer(full, result)
                bar.update(1)
            del hessians
        states = [work(x, *a, **kw) for x, (a, kw) in zip(states, extras)]
        for sub, result in results.items():
            original = block.get_submodule(sub)
            _replace(block, sub, _to_quant_linear(original, result, config).to(_device_of(original)))
        del work
    bar.close()
    _mark_quantized(model, config)
    model.train(was_training)
    return model


def _collect_hessians(block: nn.Module, group: Sequence[str], states: list[torch.Tensor],
                      extras: list[tuple[tuple, dict]], device: torch.device) -> dict[str, HessianAccumulator]:
    """Run the block on every sequence up to the last layer of ``group``, accumulating each layer's H."""
    accs = {sub: HessianAccumulator(block.get_submodule(sub).in_features, device) for sub in group}
    seen: set[str] = set()
    handles = []

    def hook_for(sub: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            accs[sub].add(args[0])
            seen.add(sub)
            if len(seen) == len(group):
                raise _StopForward  # the rest of the block is not needed for this group
        return hook

    for sub in group:
        handles.append(block.get_submodule(sub).register_forward_pre_hook(hook_for(sub)))
    try:
        for x, (a, kw) in zip(states, extras):
            seen.clear()
            try:
                block(x, *a, **kw)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return accs


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, torch.float32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def _mark_quantized(model: nn.Module, config: GPTQConfig) -> None:
    model.config = model.config.update(quantization_config=config.to_config_entry())


__all__ = ["QuantizedWeight", "find_params", "quantize_codes", "quantize_rtn", "quantize_gptq", "HessianAccumulator",
           "quantize_model_rtn", "quantize_model_gptq", "check_quantizable", "quantized_layer_names"]
