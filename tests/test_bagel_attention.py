"""Packed attention (models/common/attention.py) and Bagel on each of its kernels: FlexAttention == the SDPA loop.

FlexAttention runs (unfused) on the CPU, so its block mask is checked here in fp32 against the SDPA loop's
dense masks, on packed batches with causal, full and noise splits, KV-cache contexts and grouped-query
heads. The two sum in different orders, so they agree to fp32's rounding over the reductions involved:
`rounding_bound` (tests/tolerances.py) with fp32's unit roundoff, over the dot product, the softmax sum and
the weighted sum of every output, times the scale those sums are taken at. flash-attn has no CPU build;
its layout (cu_seqlens, one causal flag) is the `varlen` one tested here.
"""

import pytest
import torch
from test_bagel_model import random_model
from tolerances import chain_length, rounding_bound

from titan_flow.config import ConfigError, JobConfig, build_job_config
from titan_flow.models.bagel.args import FLAVORS
from titan_flow.models.bagel.model import Bagel, LatentSplit, TextSplit, VitSplit
from titan_flow.models.bagel.pipeline import BagelPipeline
from titan_flow.models.common import attention as attn
from titan_flow.models.common.attention import (
    PackedAttention,
    PackedLayout,
    packed_attention,
    resolve_backend,
    split_mask,
    varlen_attention,
)

FP32_UNIT_ROUNDOFF = 2.0**-24
ARGS = FLAVORS["debug"]


def qkv(layout: PackedLayout, heads=4, kv_heads=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(layout.q_lens), heads, head_dim, generator=g)
    k = torch.randn(sum(layout.k_lens), kv_heads, head_dim, generator=g)
    v = torch.randn(sum(layout.k_lens), kv_heads, head_dim, generator=g)
    return q, k, v


def kernel_bound(layout: PackedLayout, q, k, v) -> float:
    """fp32 rounding of one attention output: head_dim + 2 * keys roundings in series, at the scale of the
    largest value times (1 + the largest score) (a score error of e moves a softmax weight by e relative)."""
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    max_score = (torch.einsum("qhd,khd->hqk", q, keys).abs().max() / q.shape[-1] ** 0.5).item()
    roundings = q.shape[-1] + 2 * max(layout.k_lens)
    return rounding_bound(roundings, FP32_UNIT_ROUNDOFF, elements=q.numel()) * v.abs().max().item() * (1 + max_score)


LAYOUTS = {
    # flash-attn varlen's layouts: image blocks over KV-cache contexts (full), prompts appended to contexts (causal)
    "full over contexts": PackedLayout.varlen([10, 10, 7], [16, 10, 12]),
    "causal over contexts": PackedLayout.varlen([5, 9, 3], [12, 9, 7], causal=True),
    "ViT images": PackedLayout.varlen([6, 20, 12]),
    # full-sequence training samples: [text | noised image], [ViT | clean VAE | text | noised], [text | clean VAE]
    "training splits": PackedLayout.from_splits(
        [[5, 8], [6, 6, 4, 8], [3, 5]],
        [["causal", "noise"], ["full", "full", "causal", "noise"], ["causal", "full"]],
    ),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_flex_attention_equals_the_sdpa_loop_in_fp32(name):
    layout = LAYOUTS[name]
    q, k, v = qkv(layout)
    want = packed_attention(q, k, v, layout, "sdpa")
    got = packed_attention(q, k, v, layout, "flex")
    assert got.shape == q.shape
    assert (got - want).abs().max().item() <= kernel_bound(layout, q, k, v)


def test_the_sdpa_loop_is_attention_under_each_segments_dense_mask():
    """The masks themselves, from first principles: dense SDPA over the whole packed batch under the layout's rule."""
    layout = LAYOUTS["training splits"]
    q, k, v = qkv(layout, heads=2, kv_heads=2)
    qm, km = layout.token_meta()
    mask = attn.visible({n: t[:, None] for n, t in qm.items()}, {n: t[None, :] for n, t in km.items()})
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                             attn_mask=mask).transpose(0, 1)
    got = packed_attention(q, k, v, layout, "sdpa")
    assert (got - dense).abs().max().item() <= kernel_bound(layout, q, k, v)
    # varlen causal is bottom-right aligned: the last query of a 3-query segment over 7 keys sees all 7
    causal = LAYOUTS["causal over contexts"].dense_mask(2)
    assert causal.shape == (3, 7) and causal.sum(1).tolist() == [5, 6, 7]
    assert torch.equal(split_mask([2, 3, 2], ["causal", "noise", "full"]),
                       PackedLayout.from_splits([[2, 3, 2]], [["causal", "noise", "full"]]).dense_mask(0))


def test_flash_attn_signature_still_runs_on_every_kernel():
    layout = LAYOUTS["causal over contexts"]
    q, k, v = qkv(layout)
    cu_q = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    cu_k = torch.tensor([0, 12, 21, 28], dtype=torch.int32)
    want = packed_attention(q, k, v, layout, "sdpa")
    assert torch.equal(varlen_attention(q, k, v, cu_q, cu_k, 9, 12, causal=True), want)
    flex = varlen_attention(q, k, v, cu_q, cu_k, 9, 12, causal=True, backend="flex")
    assert (flex - want).abs().max().item() <= kernel_bound(layout, q, k, v)


def test_masks_are_built_once_per_layout():
    a, b = PackedLayout.varlen([10, 10], [14, 10]), PackedLayout.varlen([10, 10], [14, 10])
    assert a == b and a is not b
    first = PackedAttention(a, "flex", "cpu", torch.float32)
    second = PackedAttention(b, "flex", "cpu", torch.float32)
    assert second.device_layout is first.device_layout
    assert second.device_layout.block_mask() is first.device_layout.block_mask()


def test_backend_choice_and_errors(monkeypatch):
    plain, splits = LAYOUTS["full over contexts"], LAYOUTS["training splits"]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", plain, cpu, torch.float32) == "sdpa"
    monkeypatch.setattr(attn, "_flash_varlen", None)
    assert resolve_backend("auto", plain, cuda, torch.bfloat16) == "flex"  # a GPU without a flash-attn build
    with pytest.raises(RuntimeError, match="'flash' but flash-attn is not installed"):
        resolve_backend("flash", plain, cuda, torch.bfloat16)
    monkeypatch.setattr(attn, "_flash_varlen", lambda *a, **kw: None)
    assert resolve_backend("auto", plain, cuda, torch.bfloat16) == "flash"
    assert resolve_backend("auto", plain, cuda, torch.float32) == "flex"  # flash-attn has no fp32 kernel
    assert resolve_backend("auto", splits, cuda, torch.bfloat16) == "flex"  # mixed splits need a mask
    assert resolve_backend("flash", splits, cuda, torch.bfloat16) == "flex"
    with pytest.raises(RuntimeError, match="'flash' needs CUDA tensors in fp16/bf16, got cpu torch.float32"):
        resolve_backend("flash", plain, cpu, torch.float32)
    with pytest.raises(ValueError, match="attention backend 'xformers' is not one of auto, flash, flex, sdpa"):
        resolve_backend("xformers", plain, cpu, torch.float32)
    with pytest.raises(ValueError, match="segment 0 has 3 keys for 5 queries"):
        PackedLayout.varlen([5], [3], causal=True)
    with pytest.raises(ValueError, match="unknown split modes \\['sparse'\\]"):
        PackedLayout.from_splits([[2, 2]], [["causal", "sparse"]])
    q, k, v = (t.requires_grad_() for t in qkv(plain))
    with pytest.raises(RuntimeError, match="'flex' cannot train on the CPU"):
        packed_attention(q, k, v, plain, "flex")


def test_the_backend_is_a_validated_config_field():
    assert JobConfig().model.attention_backend == "auto"
    assert build_job_config(["--model.attention_backend", "flex"]).model.attention_backend == "flex"
    with pytest.raises(ConfigError, match="model.attention_backend: 'flash-attn' is not allowed; choose one of 'auto'"):
        build_job_config(["--model.attention_backend", "flash-attn"])
    with pytest.raises(ValueError, match="model.attention_backend: 'xformers' is not one of"):
        BagelPipeline.load("", device="cpu", resolution=48, attention_backend="xformers")


def model_bound(model: Bagel, max_keys: int, elements: int) -> float:
    """Relative fp32 error of a velocity: the model's chain of roundings plus each layer's attention sums."""
    roundings = chain_length(model) + len(model.layers) * (ARGS.head_dim + 2 * max_keys)
    return rounding_bound(roundings, FP32_UNIT_ROUNDOFF, elements=elements)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_bagel_on_flex_equals_bagel_on_sdpa_in_fp32():
    """Editing (VAE and ViT prefill, causal text over them, the image block with text + image CFG) and the
    full-sequence training path (split masks), each on FlexAttention and on the SDPA loop."""
    model = random_model()
    source = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(4)
    samples = [
        [TextSplit([257, 40, 41, 258]), LatentSplit(torch.randn(6, ARGS.patch_latent_dim, generator=g), 2, 3, 0.4, noised=True)],
        [VitSplit(torch.rand(12, 12, generator=g) * 2 - 1, 3, 4),
         LatentSplit(torch.randn(4, ARGS.patch_latent_dim, generator=g), 2, 2), TextSplit([257, 50, 258]),
         LatentSplit(torch.randn(4, ARGS.patch_latent_dim, generator=g), 2, 2, 0.7, noised=True)],
    ]
    velocities = {}
    for backend in ("sdpa", "flex"):
        pipe = BagelPipeline.load("", device="cpu", resolution=64, image_guidance_scale=1.5, attention_backend=backend)
        with torch.no_grad():
            edit = pipe.encode(["make it blue"], images=[source], model=model)
            x = pipe.initial_noise(1, torch.Generator().manual_seed(2), edit)
            training = model(samples, attention=backend)
            velocities[backend] = [
                pipe.velocity(model, x, torch.tensor([0.7]), edit, 4.0),
                torch.cat(training),
            ]
    keys = 2 * 6 + 2 * 20  # an upper bound on any segment's keys here (image blocks over two images and text)
    for name, got, want in zip(("editing", "training path"), velocities["flex"], velocities["sdpa"]):
        error, bound = relative(got, want), model_bound(model, keys, want.numel())
        print(f"{name}: flex vs sdpa, max |diff| / max |v| = {error:.2e} (bound {bound:.2e})")
        assert error <= bound, name
