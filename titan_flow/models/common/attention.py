"""Attention dispatch shared by every backbone.

Dense attention goes through `F.scaled_dot_product_attention`. Packed variable-length attention
uses flash-attn's varlen kernel when it is installed and the tensors are on CUDA, and otherwise
loops over the packed segments with SDPA, so CPU runs and GPU runs take the same code path in the
model files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:  # pragma: no cover - depends on the environment
    _flash_varlen = None


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*Dh) -> (B, H, L, Dh)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, Dh) -> (B, L, H*Dh)."""
    return x.transpose(1, 2).flatten(2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Dense attention on (B, heads, L, head_dim) tensors; `mask` is bool (True = attend) or additive."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
) -> torch.Tensor:
    """Attention over packed sequences laid out as (total_tokens, heads, head_dim).

    Segment i spans cu_seqlens[i]:cu_seqlens[i+1]. Grouped-query attention (fewer k/v heads than
    q heads) is supported. Causal masking is bottom-right aligned, as in flash-attn.
    """
    if _flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_varlen(
            q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k, causal=causal
        )
    n_rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1 = bounds_q[i], bounds_q[i + 1]
        k0, k1 = bounds_k[i], bounds_k[i + 1]
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        mask = None
        if causal:
            lq, lk = q1 - q0, k1 - k0
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        out[q0:q1] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1)
    return out
