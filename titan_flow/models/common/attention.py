"""Attention dispatch shared by every backbone.

Dense attention goes through `F.scaled_dot_product_attention`.

Packed attention (several sequences laid end to end in one (tokens, heads, head_dim) tensor, each
attending only within itself) is described once by a `PackedLayout` and runs on one of three kernels:
  - "flash": flash-attn's varlen kernel (the optional GPU extra; CUDA, fp16/bf16). It knows one
    causal flag per call, so layouts with mixed splits (a training sequence) go to "flex";
  - "flex": torch's FlexAttention with a block mask built from the layout and cached per layout,
    compiled on CUDA: the fallback on GPUs without a flash-attn build. It also runs, unfused, on CPU;
  - "sdpa": a loop over the segments with one SDPA call each (a dense mask where one is needed): the
    CPU path, and the reference the other two are tested against.
"auto" picks flash when installed and applicable, else flex on CUDA, else sdpa. The three give the
same result up to the order of floating-point sums.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except ImportError:  # pragma: no cover - depends on the environment
    _flash_varlen = None

ATTENTION_BACKENDS = ("auto", "flash", "flex", "sdpa")
SPLIT_MODES = ("causal", "full", "noise")
_HALF = (torch.float16, torch.bfloat16)


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


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class PackedLayout:
    """Which keys each query of a packed batch sees.

    Segment i holds q_lens[i] queries and k_lens[i] keys; queries and keys are packed segment after
    segment. The queries are laid out as `splits[i]` = ((length, mode), ...) and are also the last
    q_lens[i] keys of their segment; the k_lens[i] - q_lens[i] keys before them are its context
    (e.g. a KV cache), seen by every query of the segment. Among the segment's own tokens a split sees
    itself causally ("causal") or entirely ("full", "noise") and every earlier split except "noise"
    ones, which only see themselves. Segments never see each other. A segment of one "full" split
    sees all its keys, whatever their number (cross attention).
    """

    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]
    splits: tuple[tuple[tuple[int, str], ...], ...]

    def __post_init__(self):
        if not (len(self.q_lens) == len(self.k_lens) == len(self.splits)) or not self.q_lens:
            raise ValueError(
                f"PackedLayout needs one q length, k length and split list per segment, got {len(self.q_lens)}, "
                f"{len(self.k_lens)} and {len(self.splits)}"
            )
        for i, (nq, nk, splits) in enumerate(zip(self.q_lens, self.k_lens, self.splits)):
            if sum(n for n, _ in splits) != nq or any(n <= 0 for n, _ in splits):
                raise ValueError(f"segment {i}: splits {splits} must be positive lengths summing to its {nq} queries")
            bad = [m for _, m in splits if m not in SPLIT_MODES]
            if bad:
                raise ValueError(f"segment {i}: unknown split modes {bad}; use {', '.join(SPLIT_MODES)}")
            if nk < nq and splits != ((nq, "full"),):
                raise ValueError(
                    f"segment {i} has {nk} keys for {nq} queries: its queries must be its last keys unless it is one "
                    "'full' split"
                )

    @classmethod
    def varlen(cls, q_lens: Sequence[int], k_lens: Sequence[int] | None = None, causal: bool = False) -> PackedLayout:
        """flash-attn varlen's layout: query segment i attends to key segment i, bottom-right causal if `causal`."""
        k_lens = q_lens if k_lens is None else k_lens
        mode = "causal" if causal else "full"
        return cls(tuple(int(n) for n in q_lens), tuple(int(n) for n in k_lens), tuple(((int(n), mode),) for n in q_lens))

    @classmethod
    def from_splits(cls, split_lens: Sequence[Sequence[int]], split_modes: Sequence[Sequence[str]]) -> PackedLayout:
        """Self-attention of packed samples, each a list of splits (the full-sequence training layout)."""
        splits = tuple(tuple((int(n), m) for n, m in zip(lens, modes)) for lens, modes in zip(split_lens, split_modes))
        lens = tuple(sum(n for n, _ in s) for s in splits)
        return cls(lens, lens, splits)

    @property
    def varlen_causal(self) -> bool | None:
        """flash-attn varlen's causal flag if it can run this layout (every segment one split, one kind), else None."""
        if any(len(s) != 1 for s in self.splits):
            return None
        modes = {s[0][1] for s in self.splits}
        if modes == {"causal"}:
            return True
        return False if "causal" not in modes else None

    def token_meta(self, device: torch.device | str | None = None) -> tuple[dict, dict]:
        """Per query token and per key token: segment, split id (-1 = context), and what the mask rule needs."""
        q = {"segment": [], "split": [], "causal": [], "index": []}
        k = {"segment": [], "split": [], "hidden": [], "index": []}
        split_id = 0
        for seg, (nq, nk, splits) in enumerate(zip(self.q_lens, self.k_lens, self.splits)):
            context = nk if splits == ((nq, "full"),) else nk - nq
            k["segment"] += [seg] * nk
            k["split"] += [-1] * context
            k["hidden"] += [False] * context
            k["index"] += [-1] * context
            index = 0
            for n, mode in splits:
                q["segment"] += [seg] * n
                q["split"] += [split_id] * n
                q["causal"] += [mode == "causal"] * n
                q["index"] += range(index, index + n)
                if context < nk:
                    k["split"] += [split_id] * n
                    k["hidden"] += [mode == "noise"] * n
                    k["index"] += range(index, index + n)
                index += n
                split_id += 1

        def tensors(meta: dict) -> dict:
            return {name: torch.tensor(values, device=device) for name, values in meta.items()}

        return tensors(q), tensors(k)

    def dense_mask(self, segment: int) -> torch.Tensor:
        """Bool (q_lens[i], k_lens[i]) mask of one segment (True = attend)."""
        sub = PackedLayout((self.q_lens[segment],), (self.k_lens[segment],), (self.splits[segment],))
        q, k = sub.token_meta()
        return visible({n: t[:, None] for n, t in q.items()}, {n: t[None, :] for n, t in k.items()})


def visible(q: dict, k: dict) -> torch.Tensor:
    """The layout's mask rule on (broadcastable) token metadata: the one definition the dense and block masks share."""
    same_segment = q["segment"] == k["segment"]
    earlier = (k["split"] < q["split"]) & ~k["hidden"]  # context keys have split -1
    own = (k["split"] == q["split"]) & (~q["causal"] | (k["index"] <= q["index"]))
    return same_segment & (earlier | own)


def split_mask(split_lens: Sequence[int], split_modes: Sequence[str]) -> torch.Tensor:
    """Bool (L, L) self-attention mask of one sample made of splits (Bagel's `prepare_attention_mask_per_sample`)."""
    return PackedLayout.from_splits([split_lens], [split_modes]).dense_mask(0)


# ---------------------------------------------------------------------------------------------
# Kernels


class _DeviceLayout:
    """What each kernel needs of one layout on one device, built once (cached in `_LAYOUTS`)."""

    def __init__(self, layout: PackedLayout, device: torch.device):
        self.layout, self.device = layout, device
        self.bounds_q = [0, *itertools.accumulate(layout.q_lens)]
        self.bounds_k = [0, *itertools.accumulate(layout.k_lens)]
        self.cu_q = torch.tensor(self.bounds_q, dtype=torch.int32).to(device)
        self.cu_k = torch.tensor(self.bounds_k, dtype=torch.int32).to(device)
        self._dense: dict[int, torch.Tensor | None] = {}
        self._block_mask = None

    def dense_mask(self, segment: int) -> torch.Tensor | None:
        """The SDPA mask of a segment; None where every key is visible (SDPA's unmasked kernel)."""
        if segment not in self._dense:
            splits = self.layout.splits[segment]
            self._dense[segment] = None if splits[0][1] != "causal" and len(splits) == 1 else (
                self.layout.dense_mask(segment).to(self.device)
            )
        return self._dense[segment]

    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            q, k = self.layout.token_meta(self.device)

            def mask_mod(b, h, q_idx, kv_idx):
                return visible({n: t[q_idx] for n, t in q.items()}, {n: t[kv_idx] for n, t in k.items()})

            self._block_mask = create_block_mask(
                mask_mod, None, None, sum(self.layout.q_lens), sum(self.layout.k_lens), device=self.device,
                _compile=self.device.type == "cuda",
            )
        return self._block_mask


_LAYOUTS: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 64  # layouts of recent calls: the denoising steps of a batch all share one


def _device_layout(layout: PackedLayout, device: torch.device) -> _DeviceLayout:
    key = (layout, str(device))
    if key in _LAYOUTS:
        _LAYOUTS.move_to_end(key)
        return _LAYOUTS[key]
    entry = _DeviceLayout(layout, device)
    _LAYOUTS[key] = entry
    if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return entry


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention on packed (tokens, heads, head_dim) tensors: compiled on CUDA, unfused elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        out = _compiled_flex(*args, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    else:
        with warnings.catch_warnings():  # the unfused CPU path is intended: it is the CPU test of the mask
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(*args, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dl: _DeviceLayout) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    outs = []
    for i in range(len(dl.layout.q_lens)):
        q0, q1, k0, k1 = dl.bounds_q[i], dl.bounds_q[i + 1], dl.bounds_k[i], dl.bounds_k[i + 1]
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=dl.dense_mask(i)).transpose(0, 1))
    return torch.cat(outs)


def resolve_backend(backend: str, layout: PackedLayout, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel a backend setting means for this layout, device and dtype; a wrong explicit choice raises."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    flash_fits = layout.varlen_causal is not None
    if backend == "auto":
        if _flash_varlen is not None and device.type == "cuda" and dtype in _HALF and flash_fits:
            return "flash"
        return "flex" if device.type == "cuda" else "sdpa"
    if backend == "flash":
        if _flash_varlen is None:
            raise RuntimeError(
                "model.attention_backend = 'flash' but flash-attn is not installed; install the GPU extra "
                "(pip install -e '.[gpu]') or choose 'flex' or 'auto'"
            )
        if device.type != "cuda" or dtype not in _HALF:
            raise RuntimeError(
                f"model.attention_backend = 'flash' needs CUDA tensors in fp16/bf16, got {device.type} {dtype}; "
                "choose 'auto', 'flex' or 'sdpa'"
            )
        if not flash_fits:
            return "flex"  # flash-attn has one causal flag per call; mixed splits need a mask
    return backend


class PackedAttention:
    """A layout bound to a kernel on one device: attention(q, k, v) on packed (tokens, heads, head_dim) tensors.

    Resolving the backend and building the masks happen here, once, outside the model's layers (which
    may be compiled); the masks themselves are cached per layout, so the denoising steps of a batch
    build them once. Grouped-query attention (fewer k/v heads than q heads) is supported.
    """

    def __init__(self, layout: PackedLayout, backend: str, device: torch.device | str, dtype: torch.dtype):
        device = torch.device(device)
        self.backend = resolve_backend(backend, layout, device, dtype)
        self.device_layout = _device_layout(layout, device)
        if self.backend == "flex":
            self.device_layout.block_mask()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dl = self.device_layout
        if self.backend == "flash":
            return _flash_varlen(
                q, k, v, dl.cu_q, dl.cu_k, max(dl.layout.q_lens), max(dl.layout.k_lens), causal=dl.layout.varlen_causal
            )
        if self.backend == "flex":
            if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise RuntimeError(
                    "model.attention_backend = 'flex' cannot train on the CPU (FlexAttention has no CPU backward); "
                    "choose 'sdpa' or 'auto' there"
                )
            return _flex(q, k, v, dl.block_mask())
        return _sdpa_loop(q, k, v, dl)


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, backend: str = "auto"
) -> torch.Tensor:
    """Attention over a packed batch, (total queries, heads, head_dim) -> the same shape."""
    return PackedAttention(layout, backend, q.device, q.dtype)(q, k, v)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """flash-attn varlen's signature: segment i spans cu_seqlens[i]:cu_seqlens[i+1]; causal is bottom-right aligned.

    Callers that know their segment lengths as Python ints should build a `PackedLayout` and call
    `packed_attention` instead: this entry reads the lengths back from `cu_seqlens` on the other kernels.
    """
    if backend in ("auto", "flash") and _flash_varlen is not None and q.is_cuda and q.dtype in _HALF:
        return _flash_varlen(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k, causal=causal)
    layout = PackedLayout.varlen(cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist(), causal)
    return packed_attention(q, k, v, layout, backend)
