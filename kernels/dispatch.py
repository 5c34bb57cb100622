"""Which implementation runs each fused op: Triton on CUDA tensors, the PyTorch reference elsewhere.

The process-wide choice comes from `training.kernel_backend` (train.py calls `set_backend`); a call's
`backend=` argument overrides it. "triton" forces the fused kernels, which on CPU tensors run only under
Triton's interpreter (TRITON_INTERPRET=1, how the tests run them); "torch" forces the reference. The
Triton modules are imported on first use, so CPU-only runs never import triton.
"""

from __future__ import annotations

import torch

from kernels.ratio_loss import ClippedLoss, clipped_ratio_loss_reference
from kernels.sde_logprob import StepLogProb, sde_log_prob_reference

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKENDS} (training.kernel_backend)")
    return name


def set_backend(name: str) -> None:
    """Process-wide backend of the fused ops: "auto" | "triton" | "torch"."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    return _backend


def _use_triton(backend: str | None, first: torch.Tensor) -> bool:
    name = _check(_backend if backend is None else backend)
    if name == "auto":
        return first.is_cuda
    return name == "triton"


def sde_log_prob(
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
    backend: str | None = None,
) -> StepLogProb:
    """kernels.sde_logprob.sde_log_prob_reference, fused on CUDA (see there for the math)."""
    if _use_triton(backend, v):
        from kernels.sde_logprob_triton import sde_log_prob_triton

        return sde_log_prob_triton(v, x, x_next, coef_x, coef_v, std, kind, v_ref, kl_std, mean_old, return_mean)
    return sde_log_prob_reference(v, x, x_next, coef_x, coef_v, std, kind, v_ref, kl_std, mean_old, return_mean)


def clipped_ratio_loss(
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
    backend: str | None = None,
) -> ClippedLoss:
    """kernels.ratio_loss.clipped_ratio_loss_reference, fused on CUDA (see there for the math)."""
    args = (log_prob, old_log_prob, advantages, clip_lo, clip_hi, adv_clip_max, ratio_scale, ratio_bias, loss_weight)
    if _use_triton(backend, log_prob):
        from kernels.ratio_loss_triton import clipped_ratio_loss_triton

        return clipped_ratio_loss_triton(*args)
    return clipped_ratio_loss_reference(*args)
