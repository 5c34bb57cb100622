"""Triton version of kernels.sde_logprob.sde_log_prob_reference: one pass over the tensors each way.

Forward: each program owns one BLOCK-sized chunk of one sample. It forms the step mean in fp32 (fp64 for
fp64 inputs) from inputs of any float dtype, writes the mean when asked, and writes its chunk's sums of
squared distances (to x_next, to the reference mean, to mean_old) into a (B, chunks, 3) buffer. A tiny
second kernel adds each sample's chunk sums in a fixed order and applies the per-sample formulas. No
atomics: the result is deterministic, so re-scoring a rollout step reproduces its log-prob bit for bit
and the on-policy importance ratio is exactly 1.

Backward re-reads (v, x, x_next[, v_ref, mean_old]) rather than saving the (B, ...) mean, and writes
d/dv and, when x requires grad, d/dx. The per-sample coefficients (coef_x, coef_v, std, kl_std) are
constants here (they come from the sigma schedule); x_next, v_ref and mean_old are detached, as in the
reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _triton
from kernels.sde_logprob import HALF_LOG_2PI, LOG_PROB_KINDS, StepLogProb

MAX_BLOCK = 4096  # elements of one sample per program: 16 per thread at 8 warps
MIN_BLOCK = 1024  # ... but small problems get smaller blocks, for enough programs to fill the GPU:
TARGET_PROGRAMS = 1024  # ~8 per SM on an H100 (132 SMs)
MAX_FINISH_BLOCK = 1024  # chunk sums read at once by the per-sample finishing kernel
_SUMS = 3  # per chunk: sum (x_next - mean)^2, sum (mean - mean_ref)^2, sum (mean - mean_old)^2
_HALF_LOG_2PI = tl.constexpr(HALF_LOG_2PI)


@triton.jit
def _forward_kernel(
    v_ptr, x_ptr, x_next_ptr, v_ref_ptr, mean_old_ptr, coef_x_ptr, coef_v_ptr,
    mean_ptr, sums_ptr,
    n_per_sample, n_chunks,
    ACC: tl.constexpr, HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_per_sample
    at = sample.to(tl.int64) * n_per_sample + offs
    cx = tl.load(coef_x_ptr + sample).to(ACC)
    cv = tl.load(coef_v_ptr + sample).to(ACC)
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(ACC)
    mean = x * cx + tl.load(v_ptr + at, mask=inside, other=0.0).to(ACC) * cv
    if WRITE_MEAN:
        tl.store(mean_ptr + at, mean.to(mean_ptr.dtype.element_ty), mask=inside)
    out = sums_ptr + (sample * n_chunks + chunk) * 3
    d = tl.load(x_next_ptr + at, mask=inside, other=0.0).to(ACC) - mean
    # where(), not the zero padding alone: an inf coefficient times a padded 0 would be NaN
    tl.store(out, tl.sum(tl.where(inside, d * d, 0.0), axis=0))
    if HAS_REF:
        d = mean - (x * cx + tl.load(v_ref_ptr + at, mask=inside, other=0.0).to(ACC) * cv)
        tl.store(out + 1, tl.sum(tl.where(inside, d * d, 0.0), axis=0))
    if HAS_OLD:
        d = mean - tl.load(mean_old_ptr + at, mask=inside, other=0.0).to(ACC)
        tl.store(out + 2, tl.sum(tl.where(inside, d * d, 0.0), axis=0))


@triton.jit
def _finish_kernel(
    sums_ptr, std_ptr, kl_std_ptr,
    log_prob_ptr, kl_ptr, ratio_bias_ptr,
    n_per_sample, n_chunks,
    ACC: tl.constexpr, GAUSSIAN: tl.constexpr, HAS_REF: tl.constexpr, HAS_OLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sample = tl.program_id(0)
    to_next = tl.zeros([BLOCK], ACC)
    to_ref = tl.zeros([BLOCK], ACC)
    to_old = tl.zeros([BLOCK], ACC)
    for start in range(0, n_chunks, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        row = sums_ptr + (sample * n_chunks + idx) * 3
        valid = idx < n_chunks
        to_next += tl.load(row, mask=valid, other=0.0)
        if HAS_REF:
            to_ref += tl.load(row + 1, mask=valid, other=0.0)
        if HAS_OLD:
            to_old += tl.load(row + 2, mask=valid, other=0.0)
    std = tl.load(std_ptr + sample).to(ACC)
    msd = tl.sum(to_next, axis=0) / n_per_sample
    if GAUSSIAN:
        log_prob = -msd / (2 * (std * std)) - tl.log(std) - tl.full([], _HALF_LOG_2PI, ACC)
    else:
        log_prob = -msd
    tl.store(log_prob_ptr + sample, log_prob)
    if HAS_REF:
        kl_std = tl.load(kl_std_ptr + sample).to(ACC)
        tl.store(kl_ptr + sample, tl.sum(to_ref, axis=0) / n_per_sample / (2 * (kl_std * kl_std)))
    if HAS_OLD:
        tl.store(ratio_bias_ptr + sample, tl.sum(to_old, axis=0) / n_per_sample / (2 * (std * std)))


@triton.jit
def _backward_kernel(
    v_ptr, x_ptr, x_next_ptr, v_ref_ptr, mean_old_ptr, coef_x_ptr, coef_v_ptr, std_ptr, kl_std_ptr,
    grad_log_prob_ptr, grad_kl_ptr, grad_ratio_bias_ptr, grad_mean_ptr,
    grad_v_ptr, grad_x_ptr,
    n_per_sample,
    ACC: tl.constexpr, GAUSSIAN: tl.constexpr, HAS_GRAD_LOG_PROB: tl.constexpr, HAS_GRAD_KL: tl.constexpr,
    HAS_GRAD_RATIO_BIAS: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr, WRITE_GRAD_V: tl.constexpr,
    WRITE_GRAD_X: tl.constexpr, BLOCK: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_per_sample
    at = sample.to(tl.int64) * n_per_sample + offs
    cx = tl.load(coef_x_ptr + sample).to(ACC)
    cv = tl.load(coef_v_ptr + sample).to(ACC)
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(ACC)
    mean = x * cx + tl.load(v_ptr + at, mask=inside, other=0.0).to(ACC) * cv
    grad_mean = tl.zeros([BLOCK], ACC)
    if HAS_GRAD_LOG_PROB:
        g = tl.load(grad_log_prob_ptr + sample).to(ACC)
        if GAUSSIAN:
            std = tl.load(std_ptr + sample).to(ACC)
            scale = g / ((std * std) * n_per_sample)
        else:
            scale = 2 * g / n_per_sample
        grad_mean += scale * (tl.load(x_next_ptr + at, mask=inside, other=0.0).to(ACC) - mean)
    if HAS_GRAD_RATIO_BIAS:
        std = tl.load(std_ptr + sample).to(ACC)
        scale = tl.load(grad_ratio_bias_ptr + sample).to(ACC) / ((std * std) * n_per_sample)
        grad_mean += scale * (mean - tl.load(mean_old_ptr + at, mask=inside, other=0.0).to(ACC))
    if HAS_GRAD_MEAN:
        grad_mean += tl.load(grad_mean_ptr + at, mask=inside, other=0.0).to(ACC)
    if HAS_GRAD_KL:
        kl_std = tl.load(kl_std_ptr + sample).to(ACC)
        scale = tl.load(grad_kl_ptr + sample).to(ACC) / ((kl_std * kl_std) * n_per_sample)
        grad_kl = scale * (mean - (x * cx + tl.load(v_ref_ptr + at, mask=inside, other=0.0).to(ACC) * cv))
        grad_mean += grad_kl
    if WRITE_GRAD_V:
        tl.store(grad_v_ptr + at, (grad_mean * cv).to(grad_v_ptr.dtype.element_ty), mask=inside)
    if WRITE_GRAD_X:
        grad_x = grad_mean * cx
        if HAS_GRAD_KL:
            # x enters the reference mean too; the two terms cancel (mean - mean_ref = coef_v (v - v_ref)),
            # but are kept apart as in the reference so that an inf in v_ref gives NaN here as well
            grad_x -= grad_kl * cx
        tl.store(grad_x_ptr + at, grad_x.to(grad_x_ptr.dtype.element_ty), mask=inside)


def _block_for(batch: int, n_per_sample: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        return block_size
    for_occupancy = max(MIN_BLOCK, triton.next_power_of_2(triton.cdiv(batch * n_per_sample, TARGET_PROGRAMS)))
    return max(16, min(MAX_BLOCK, for_occupancy, triton.next_power_of_2(n_per_sample)))


def _warps(block: int) -> int:
    return max(1, min(8, block // 512))


class _SdeLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, x, x_next, coef_x, coef_v, std, kl_std, v_ref, mean_old, gaussian, return_mean, block):
        batch, n = v.shape[0], v[0].numel()
        acc = _triton.compute_dtype(v, x, x_next, v_ref, mean_old, coef_x, coef_v, std, kl_std)
        flat = [_triton.flat(t, batch) for t in (v, x, x_next, v_ref, mean_old)]
        fv, fx, fx_next, fv_ref, fmean_old = flat
        n_chunks = triton.cdiv(n, block)
        device = v.device
        sums = _triton.empty((batch, n_chunks, _SUMS), acc, device)
        mean = _triton.empty(v.shape, acc, device) if return_mean else None
        log_prob = _triton.empty((batch,), acc, device)
        kl = _triton.empty((batch,), acc, device) if v_ref is not None else None
        ratio_bias = _triton.empty((batch,), acc, device) if mean_old is not None else None
        tacc = _triton.triton_dtype(acc)
        _forward_kernel[(batch, n_chunks)](
            fv, fx, fx_next, fv if fv_ref is None else fv_ref, fv if fmean_old is None else fmean_old,
            coef_x, coef_v, log_prob if mean is None else mean, sums,
            n, n_chunks,
            ACC=tacc, HAS_REF=fv_ref is not None, HAS_OLD=fmean_old is not None, WRITE_MEAN=return_mean,
            BLOCK=block, num_warps=_warps(block),
        )
        _finish_kernel[(batch,)](
            sums, std, std if kl_std is None else kl_std,
            log_prob, log_prob if kl is None else kl, log_prob if ratio_bias is None else ratio_bias,
            n, n_chunks,
            ACC=tacc, GAUSSIAN=gaussian, HAS_REF=kl is not None, HAS_OLD=ratio_bias is not None,
            BLOCK=min(MAX_FINISH_BLOCK, triton.next_power_of_2(n_chunks)),
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(fv, fx, fx_next, fv_ref, fmean_old, coef_x, coef_v, std, kl_std)
        ctx.meta = (gaussian, block, v.shape, x.shape)
        return log_prob, mean, kl, ratio_bias

    @staticmethod
    def backward(ctx, grad_log_prob, grad_mean, grad_kl, grad_ratio_bias):
        fv, fx, fx_next, fv_ref, fmean_old, coef_x, coef_v, std, kl_std = ctx.saved_tensors
        gaussian, block, v_shape, x_shape = ctx.meta
        want_v, want_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_v or want_x):
            return (None,) * 12
        batch, n = fv.shape
        grad_v = _triton.empty(v_shape, fv.dtype, fv.device) if want_v else None
        grad_x = _triton.empty(x_shape, fx.dtype, fx.device) if want_x else None
        if grad_mean is not None:
            grad_mean = grad_mean.reshape(batch, n).contiguous()
        any_grad = grad_v if grad_v is not None else grad_x
        _backward_kernel[(batch, triton.cdiv(n, block))](
            fv, fx, fx_next, fv if fv_ref is None else fv_ref, fv if fmean_old is None else fmean_old,
            coef_x, coef_v, std, std if kl_std is None else kl_std,
            std if grad_log_prob is None else grad_log_prob.contiguous(),
            std if grad_kl is None else grad_kl.contiguous(),
            std if grad_ratio_bias is None else grad_ratio_bias.contiguous(),
            fv if grad_mean is None else grad_mean,
            any_grad if grad_v is None else grad_v, any_grad if grad_x is None else grad_x,
            n,
            ACC=_triton.triton_dtype(_triton.compute_dtype(*ctx.saved_tensors)),
            GAUSSIAN=gaussian, HAS_GRAD_LOG_PROB=grad_log_prob is not None, HAS_GRAD_KL=grad_kl is not None,
            HAS_GRAD_RATIO_BIAS=grad_ratio_bias is not None, HAS_GRAD_MEAN=grad_mean is not None,
            WRITE_GRAD_V=want_v, WRITE_GRAD_X=want_x, BLOCK=block, num_warps=_warps(block),
        )
        return (grad_v, grad_x) + (None,) * 10


def sde_log_prob_triton(
    v: torch.Tensor,
    x: torch.Tensor,
    x_next: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    std: torch.Tensor,
    kind: str,
    v_ref: torch.Tensor | None = None,
    kl_std: torch.Tensor | None = None,
    mean_old: torch.Tensor | None = None,
    return_mean: bool = False,
    *,
    block_size: int | None = None,
) -> StepLogProb:
    """The fused sde_log_prob_reference: same arguments, same outputs (to fp32 rounding), one pass each way.

    `block_size` (elements of one sample per program, a power of two) is chosen from the size when None;
    the tests set it small to cover many chunks on tiny tensors.
    """
    op = "sde_log_prob"
    if kind not in LOG_PROB_KINDS:
        raise ValueError(f"log-prob kind {kind!r} is not one of {LOG_PROB_KINDS}")
    if v_ref is not None and kl_std is None:
        raise ValueError("kl_std is required with v_ref")
    _triton.check_device(op, v, x, x_next, coef_x, coef_v, std, kl_std, v_ref, mean_old)
    for name, t in (("x", x), ("x_next", x_next), ("v_ref", v_ref), ("mean_old", mean_old)):
        if t is not None and t.shape != v.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but v has {tuple(v.shape)}; they must match")
    if v.dim() < 2 or v.numel() == 0:
        raise ValueError(f"{op}: v must be a non-empty (B, ...) tensor, got shape {tuple(v.shape)}")
    for name, t in (("coef_x", coef_x), ("coef_v", coef_v), ("std", std), ("kl_std", kl_std)):
        if t is not None and t.shape != (v.shape[0],):
            raise ValueError(f"{op}: {name} must have shape (B,) = ({v.shape[0]},), got {tuple(t.shape)}")
    _triton.check_no_grad(op, coef_x=coef_x, coef_v=coef_v, std=std, kl_std=kl_std)
    if v_ref is None:
        kl_std = None  # the reference ignores kl_std without v_ref
    block = _block_for(v.shape[0], v[0].numel(), block_size)
    log_prob, mean, kl, ratio_bias = _SdeLogProb.apply(
        v, x, x_next.detach(), coef_x.contiguous(), coef_v.contiguous(), std.contiguous(),
        None if kl_std is None else kl_std.contiguous(),
        None if v_ref is None else v_ref.detach(), None if mean_old is None else mean_old.detach(),
        kind == "gaussian", return_mean, block,
    )
    return StepLogProb(log_prob, mean, kl, ratio_bias)
