"""Triton version of kernels.ratio_loss.clipped_ratio_loss_reference: loss and statistics in one launch.

The inputs are per-sample vectors (B,), so the op is launch-bound, not bandwidth-bound: eager PyTorch
spends ~20 small kernels on it. Here one program walks the batch in tiles and writes the ratio, the loss
and the four statistics; the backward is one more launch. Plain PPO-clip is the same kernel with
RatioNorm compiled out.

RatioNorm's bias is per sample, log r_i = ratio_scale_i (log_prob_i - old_log_prob_i + ratio_bias_i),
as in the GRPO-Guard paper and the reference here; the upstream Flow-GRPO code averages the bias over
the whole batch by accident (flow_grpo_algorithm.md section 7.1), which this does not reproduce.

The clip bounds, the advantage bound and the loss weight are passed as fp32 scalars; that is what the
reference uses for fp32 inputs (PyTorch casts Python scalars to the tensor's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _triton
from kernels.ratio_loss import ClippedLoss

MAX_BLOCK = 1024  # samples per tile of the single program


@triton.jit
def _clip(x, lo, hi):
    # NaN stays NaN (comparisons with NaN are false), as torch.clamp does
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _log_ratio(log_prob_ptr, old_log_prob_ptr, ratio_scale_ptr, ratio_bias_ptr, i, valid, ACC: tl.constexpr,
               RATIO_NORM: tl.constexpr):
    log_prob = tl.load(log_prob_ptr + i, mask=valid, other=0.0).to(ACC)
    diff = log_prob - tl.load(old_log_prob_ptr + i, mask=valid, other=0.0).to(ACC)
    if RATIO_NORM:
        scale = tl.load(ratio_scale_ptr + i, mask=valid, other=0.0).to(ACC)
        bias = tl.load(ratio_bias_ptr + i, mask=valid, other=0.0).to(ACC)
        log_ratio = scale * (diff + bias)
    else:  # scale and bias are unused without RatioNorm
        scale = diff
        bias = diff
        log_ratio = diff
    return diff, scale, bias, log_ratio


@triton.jit
def _forward_kernel(
    log_prob_ptr, old_log_prob_ptr, advantages_ptr, ratio_scale_ptr, ratio_bias_ptr,
    ratio_ptr, loss_ptr, clipfrac_ptr, clipfrac_gt_ptr, clipfrac_lt_ptr, approx_kl_ptr,
    n, lower, upper, adv_clip_max, loss_weight,
    ACC: tl.constexpr, RATIO_NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    loss = tl.zeros([BLOCK], ACC)
    above = tl.zeros([BLOCK], ACC)
    below = tl.zeros([BLOCK], ACC)
    sq_diff = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        valid = i < n
        diff, scale, bias, log_ratio = _log_ratio(log_prob_ptr, old_log_prob_ptr, ratio_scale_ptr, ratio_bias_ptr,
                                                  i, valid, ACC, RATIO_NORM)
        adv = _clip(tl.load(advantages_ptr + i, mask=valid, other=0.0).to(ACC), -adv_clip_max, adv_clip_max)
        ratio = tl.exp(log_ratio)
        tl.store(ratio_ptr + i, ratio, mask=valid)
        per_sample = tl.maximum(-adv * ratio, -adv * _clip(ratio, lower, upper), propagate_nan=tl.PropagateNan.ALL)
        loss += tl.where(valid, per_sample, 0.0)
        above += tl.where(valid & (ratio > upper), 1.0, 0.0)
        below += tl.where(valid & (ratio < lower), 1.0, 0.0)
        sq_diff += tl.where(valid, diff * diff, 0.0)
    n_above = tl.sum(above, axis=0)
    n_below = tl.sum(below, axis=0)
    tl.store(loss_ptr, loss_weight * (tl.sum(loss, axis=0) / n))
    # counts are exact in fp32; the fractions are fp32 like the reference's (mask.float().mean())
    tl.store(clipfrac_ptr, (n_above + n_below).to(tl.float32) / n)
    tl.store(clipfrac_gt_ptr, n_above.to(tl.float32) / n)
    tl.store(clipfrac_lt_ptr, n_below.to(tl.float32) / n)
    tl.store(approx_kl_ptr, 0.5 * (tl.sum(sq_diff, axis=0) / n))


@triton.jit
def _backward_kernel(
    log_prob_ptr, old_log_prob_ptr, advantages_ptr, ratio_scale_ptr, ratio_bias_ptr, grad_loss_ptr,
    grad_log_prob_ptr, grad_old_log_prob_ptr, grad_advantages_ptr, grad_ratio_scale_ptr, grad_ratio_bias_ptr,
    n, lower, upper, adv_clip_max, loss_weight,
    ACC: tl.constexpr, RATIO_NORM: tl.constexpr, WRITE_LOG_PROB: tl.constexpr, WRITE_OLD_LOG_PROB: tl.constexpr,
    WRITE_ADVANTAGES: tl.constexpr, WRITE_RATIO_SCALE: tl.constexpr, WRITE_RATIO_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # d loss / d per-sample loss; the max and clamp rules below are the ones PyTorch's autograd uses
    # (a tie in the max sends half the gradient each way; clamp passes it on its closed interval)
    g = tl.load(grad_loss_ptr).to(ACC) * loss_weight / n
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        valid = i < n
        diff, scale, bias, log_ratio = _log_ratio(log_prob_ptr, old_log_prob_ptr, ratio_scale_ptr, ratio_bias_ptr,
                                                  i, valid, ACC, RATIO_NORM)
        raw_adv = tl.load(advantages_ptr + i, mask=valid, other=0.0).to(ACC)
        adv = _clip(raw_adv, -adv_clip_max, adv_clip_max)
        ratio = tl.exp(log_ratio)
        clipped_ratio = _clip(ratio, lower, upper)
        unclipped = -adv * ratio
        clipped = -adv * clipped_ratio
        to_unclipped = tl.where(unclipped == clipped, 0.5, tl.where(unclipped < clipped, 0.0, 1.0)) * g
        to_clipped = tl.where(unclipped == clipped, 0.5, tl.where(unclipped > clipped, 0.0, 1.0)) * g
        ratio_in_range = (ratio >= lower) & (ratio <= upper)
        grad_ratio = to_unclipped * -adv + tl.where(ratio_in_range, to_clipped * -adv, 0.0)
        grad_log_ratio = grad_ratio * ratio
        if RATIO_NORM:
            grad_diff = grad_log_ratio * scale
        else:
            grad_diff = grad_log_ratio
        if WRITE_LOG_PROB:
            tl.store(grad_log_prob_ptr + i, grad_diff.to(grad_log_prob_ptr.dtype.element_ty), mask=valid)
        if WRITE_OLD_LOG_PROB:
            tl.store(grad_old_log_prob_ptr + i, (-grad_diff).to(grad_old_log_prob_ptr.dtype.element_ty), mask=valid)
        if WRITE_RATIO_BIAS:
            tl.store(grad_ratio_bias_ptr + i, grad_diff.to(grad_ratio_bias_ptr.dtype.element_ty), mask=valid)
        if WRITE_RATIO_SCALE:
            grad_scale = grad_log_ratio * (diff + bias)
            tl.store(grad_ratio_scale_ptr + i, grad_scale.to(grad_ratio_scale_ptr.dtype.element_ty), mask=valid)
        if WRITE_ADVANTAGES:
            grad_adv = -(to_unclipped * ratio + to_clipped * clipped_ratio)
            adv_in_range = (raw_adv >= -adv_clip_max) & (raw_adv <= adv_clip_max)
            grad_adv = tl.where(adv_in_range, grad_adv, 0.0)
            tl.store(grad_advantages_ptr + i, grad_adv.to(grad_advantages_ptr.dtype.element_ty), mask=valid)


class _ClippedRatioLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, ratio_scale, ratio_bias, bounds, block):
        n = log_prob.numel()
        acc = _triton.compute_dtype(log_prob, old_log_prob, advantages, ratio_scale, ratio_bias)
        device = log_prob.device
        ratio = _triton.empty((n,), acc, device)
        loss, approx_kl = _triton.empty((), acc, device), _triton.empty((), acc, device)
        clipfrac, clipfrac_gt, clipfrac_lt = (_triton.empty((), torch.float32, device) for _ in range(3))
        ratio_norm = ratio_scale is not None
        _forward_kernel[(1,)](
            log_prob, old_log_prob, advantages,
            ratio_scale if ratio_norm else log_prob, ratio_bias if ratio_norm else log_prob,
            ratio, loss, clipfrac, clipfrac_gt, clipfrac_lt, approx_kl,
            n, *bounds,
            ACC=_triton.triton_dtype(acc), RATIO_NORM=ratio_norm, BLOCK=block,
        )
        ctx.save_for_backward(log_prob, old_log_prob, advantages, ratio_scale, ratio_bias)
        ctx.meta = (bounds, block, acc)
        ctx.mark_non_differentiable(ratio, clipfrac, clipfrac_gt, clipfrac_lt, approx_kl)
        return loss, ratio, clipfrac, clipfrac_gt, clipfrac_lt, approx_kl

    @staticmethod
    def backward(ctx, grad_loss, *_):
        log_prob, old_log_prob, advantages, ratio_scale, ratio_bias = ctx.saved_tensors
        bounds, block, acc = ctx.meta
        wanted = ctx.needs_input_grad[:5]
        grads = [
            _triton.empty(t.shape, t.dtype, t.device) if want else None
            for t, want in zip((log_prob, old_log_prob, advantages, ratio_scale, ratio_bias), wanted)
        ]
        if not any(wanted):
            return (None,) * 7
        some = next(t for t in grads if t is not None)
        ratio_norm = ratio_scale is not None
        _backward_kernel[(1,)](
            log_prob, old_log_prob, advantages,
            ratio_scale if ratio_norm else log_prob, ratio_bias if ratio_norm else log_prob,
            grad_loss.contiguous(),
            *[some if t is None else t for t in grads],
            log_prob.numel(), *bounds,
            ACC=_triton.triton_dtype(acc), RATIO_NORM=ratio_norm,
            WRITE_LOG_PROB=wanted[0], WRITE_OLD_LOG_PROB=wanted[1], WRITE_ADVANTAGES=wanted[2],
            WRITE_RATIO_SCALE=wanted[3], WRITE_RATIO_BIAS=wanted[4], BLOCK=block,
        )
        return (*grads, None, None)


def clipped_ratio_loss_triton(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_lo: float,
    clip_hi: float,
    adv_clip_max: float,
    ratio_scale: torch.Tensor | None = None,
    ratio_bias: torch.Tensor | None = None,
    loss_weight: float = 1.0,
    *,
    block_size: int | None = None,
) -> ClippedLoss:
    """The fused clipped_ratio_loss_reference: same arguments and outputs; differentiable in every tensor input.

    `block_size` (samples per tile, a power of two) is chosen from the batch when None; the tests set it
    small to cover several tiles.
    """
    op = "clipped_ratio_loss"
    if (ratio_scale is None) != (ratio_bias is None):
        raise ValueError("RatioNorm needs both ratio_scale and ratio_bias (or neither)")
    named = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages,
             "ratio_scale": ratio_scale, "ratio_bias": ratio_bias}
    _triton.check_device(op, *named.values())
    for name, t in named.items():
        if t is not None and t.shape != log_prob.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but log_prob has {tuple(log_prob.shape)}; "
                             "they must match")
    if log_prob.numel() == 0:
        raise ValueError(f"{op}: the batch is empty")
    if block_size is None:
        block = min(MAX_BLOCK, max(16, triton.next_power_of_2(log_prob.numel())))
    elif block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    else:
        block = block_size
    bounds = (1.0 - clip_lo, 1.0 + clip_hi, float(adv_clip_max), float(loss_weight))
    flat = [None if t is None else t.reshape(-1).contiguous() for t in named.values()]
    out = _ClippedRatioLoss.apply(*flat, bounds, block)
    return ClippedLoss(out[0], out[1].view(log_prob.shape), *out[2:])
