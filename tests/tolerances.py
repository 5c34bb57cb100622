"""Numerical tolerances derived from a dtype's precision and the size of the computation.

Never from what one machine printed: CPUs differ in their reduced-precision paths (with or without
AVX512-BF16, other GEMM blocking), and a bound tuned on one of them fails on another.
"""

from __future__ import annotations

import math

import torch

BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: one rounding errs by at most 2^-8 relative


def rounding_bound(
    roundings: int, unit_roundoff: float = BF16_UNIT_ROUNDOFF, elements: int = 1, failure_probability: float = 1e-3
) -> float:
    """Relative error after `roundings` operations in series, each rounding its result once.

    Reductions (matmuls, convolutions, norms) accumulate in fp32 and round once at the end, so a
    reduction's length adds no roundings. Independent rounding errors add like a random walk: the
    probabilistic bound of Higham & Mary (2019) is lambda * sqrt(n) * u, and with
    lambda = sqrt(2 ln(2 * elements / p)) the largest of `elements` such errors exceeds it with
    probability below p.
    """
    lam = math.sqrt(2 * math.log(2 * elements / failure_probability))
    return lam * math.sqrt(roundings) * unit_roundoff


def chain_length(module: torch.nn.Module) -> int:
    """An upper estimate of the roundings in series through a module's forward: its leaf modules (each
    rounds its output once; branches that run in parallel, like q/k/v, are counted as if in series)."""
    return sum(1 for m in module.modules() if not list(m.children()))
