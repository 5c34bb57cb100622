"""Where the Bagel port rounds in bf16, against reference-shaped computations of one decoder-layer step (issue 15).

ByteDance-Seed/Bagel (modeling/bagel/qwen2_navit.py) rounds differently in its two paths:
`forward_inference` in mode "gen" (every denoising step, and the prefill of a clean VAE image) takes
q and k to fp32 before their norms, applies RoPE in fp32 with bf16 tables and rounds q and k to bf16
once; `forward_train` (and mode "und": text and ViT prefill) norms and rotates in bf16. The functions
below restate those two computations op for op as the reference writes them (index writes into zero
buffers, HF's Qwen2RMSNorm and rotary tables cast to the input dtype, the flash-attn stand-in of the
parity harness), so our layer must agree with them bit for bit. The unmodified reference itself is run
by the opt-in tests/test_bagel_parity.py.
"""

import torch
import torch.nn.functional as F
from test_bagel_model import random_model

from titan_flow.models.bagel.args import FLAVORS
from titan_flow.models.bagel.model import LatentSplit, Routing, TextSplit, VitSplit
from titan_flow.models.bagel.pipeline import BagelPipeline
from titan_flow.models.common.attention import PackedAttention, PackedLayout
from titan_flow.models.common.rope import rope_cos_sin

ARGS = FLAVORS["debug"]
BF16 = torch.bfloat16


# --- the reference's computations, restated ---------------------------------------------------------


def qwen2_rmsnorm(weight: torch.Tensor, eps: float, hidden: torch.Tensor) -> torch.Tensor:
    """HF Qwen2RMSNorm: statistics in fp32, cast back to the input dtype, then times the weight."""
    input_dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def reference_step(layer, x, und_index, gen_index, positions, mode):
    """One Qwen2MoTDecoderLayer step over a lone image block (no cache), as the reference computes it on bf16
    weights: mode "gen" is forward_inference(mode="gen"), mode "train" forward_train's q/k/v. Returns
    (the layer output or None, q, k, v as attended)."""
    und, gen = layer.und, layer.gen
    eps, heads, kv_heads, hd = ARGS.rms_norm_eps, ARGS.num_heads, ARGS.num_kv_heads, ARGS.head_dim
    n = x.shape[0]
    with torch.no_grad():
        h = torch.zeros_like(x)
        h[und_index] = qwen2_rmsnorm(und.input_norm.weight, eps, x[und_index])
        h[gen_index] = qwen2_rmsnorm(gen.input_norm.weight, eps, x[gen_index])
        if mode == "gen":
            h = h.to(BF16)
        q, k, v = h.new_zeros(n, heads * hd), h.new_zeros(n, kv_heads * hd), h.new_zeros(n, kv_heads * hd)
        for index, expert in ((und_index, und), (gen_index, gen)):
            q[index], k[index], v[index] = expert.q_proj(h[index]), expert.k_proj(h[index]), expert.v_proj(h[index])
        q, k, v = q.view(n, heads, hd), k.view(n, kv_heads, hd), v.view(n, kv_heads, hd)
        if mode == "gen":
            q, k = q.to(torch.float32), k.to(torch.float32)
            for index, expert in ((und_index, und), (gen_index, gen)):
                q[index] = qwen2_rmsnorm(expert.q_norm.weight, eps, q[index])
                k[index] = qwen2_rmsnorm(expert.k_norm.weight, eps, k[index])
        else:
            q_, k_ = q.new_zeros(q.shape), k.new_zeros(k.shape)
            for index, expert in ((und_index, und), (gen_index, gen)):
                q_[index] = qwen2_rmsnorm(expert.q_norm.weight, eps, q[index])
                k_[index] = qwen2_rmsnorm(expert.k_norm.weight, eps, k[index])
            q, k = q_, k_
        cos, sin = rope_cos_sin(positions, hd, ARGS.rope_theta)  # HF's fp32 tables (test_bagel_model checks)
        cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]  # Qwen2RotaryEmbedding: .to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        q, k, v = q.to(BF16), k.to(BF16), v.to(BF16)
        if mode != "gen":
            return None, q, k, v
        # the harness's flash_attn_varlen_func: SDPA per segment, kv heads repeated
        rep = heads // kv_heads
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(rep, 0), v.transpose(0, 1).repeat_interleave(rep, 0)
        ).transpose(0, 1).reshape(n, heads * hd)
        for index, expert in ((und_index, und), (gen_index, gen)):
            attn[index] = expert.o_proj(attn[index])
        x = x + attn
        residual = x
        mlp = torch.zeros_like(x).to(BF16)
        for index, expert in ((und_index, und), (gen_index, gen)):
            mlp[index] = expert.mlp(qwen2_rmsnorm(expert.post_attention_norm.weight, eps, x[index]).to(BF16))
        return residual + mlp, q, k, v


# --- the tests ----------------------------------------------------------------------------------------


def our_step(layer, x, gen_mask, positions, gen_mode):
    captured = {}
    kernel = PackedAttention(PackedLayout.varlen([x.shape[0]]), "sdpa", x.device, x.dtype)

    def attend(layer_id, q, k, v):
        captured.update(q=q, k=k, v=v)
        return kernel(q, k, v), k, v

    cos, sin = rope_cos_sin(positions, ARGS.head_dim, ARGS.rope_theta)
    with torch.no_grad():
        out, _, _ = layer(x, Routing(gen_mask), cos, sin, attend, gen_mode=gen_mode)
    return out, captured["q"], captured["k"], captured["v"]


def image_block(n_latents=12, position=11, seed=1):
    """Hidden states of [<|vision_start|>, latents, <|vision_end|>] at one RoPE position (as in a denoising step)."""
    x = torch.randn(n_latents + 2, ARGS.hidden_size, generator=torch.Generator().manual_seed(seed)).to(BF16)
    gen_mask = torch.ones(n_latents + 2, dtype=torch.bool)
    gen_mask[0] = gen_mask[-1] = False
    return x, gen_mask, torch.full((n_latents + 2,), position)


def test_generation_step_rounds_where_the_reference_does_in_bf16():
    layer = random_model().to(BF16).layers[0]
    x, gen_mask, positions = image_block()
    und_index, gen_index = (~gen_mask).nonzero().squeeze(1), gen_mask.nonzero().squeeze(1)
    want = reference_step(layer, x, und_index, gen_index, positions, "gen")
    got = our_step(layer, x, gen_mask, positions, gen_mode=True)
    for name, a, b in zip(("layer output", "q", "k", "v"), got, want):
        assert a.dtype == b.dtype == BF16 and torch.equal(a, b), name

    # The training path's rounding is another computation: rounding after the norm and after each RoPE
    # operation moves a large share of q and k by an ulp or more (the issue measured 41% of q on the real model).
    _, q_train, k_train, _ = our_step(layer, x, gen_mask, positions, gen_mode=False)
    differ = (q_train != got[1]).float().mean().item()
    assert differ > 0.05, differ
    assert not torch.equal(k_train, got[2])


def test_training_path_rounds_where_the_reference_forward_train_does_in_bf16():
    layer = random_model(seed=2).to(BF16).layers[1]
    x, gen_mask, positions = image_block(position=23, seed=3)
    und_index, gen_index = (~gen_mask).nonzero().squeeze(1), gen_mask.nonzero().squeeze(1)
    _, *want = reference_step(layer, x, und_index, gen_index, positions, "train")
    _, *got = our_step(layer, x, gen_mask, positions, gen_mode=False)
    for name, a, b in zip("qkv", got, want):
        assert torch.equal(a, b), name


def test_each_entry_runs_in_the_reference_mode():
    """Denoising and VAE-image prefill in generation mode; text and ViT prefill and the full-sequence pass in
    understanding mode (the reference's forward_cache_update_vae is mode "gen", _vit and _text mode "und")."""
    model = random_model()
    modes = []
    decode = model.decode

    def recording(*args, gen_mode=False, **kwargs):
        modes.append(gen_mode)
        return decode(*args, gen_mode=gen_mode, **kwargs)

    model.decode = recording
    pipe = BagelPipeline.load("", device="cpu", resolution=48, image_guidance_scale=1.5)
    cond = pipe.encode(["add a hat"], images=[torch.rand(3, 32, 32)], model=model)
    assert modes == [True, False, False, False]  # VAE image, ViT image, instruction, instruction alone
    modes.clear()
    with torch.no_grad():
        pipe.velocity(model, pipe.initial_noise(1, torch.Generator().manual_seed(0), cond), torch.tensor([0.5]), cond, 4.0)
        model([[TextSplit([1, 2]), LatentSplit(torch.zeros(4, ARGS.patch_latent_dim), 2, 2, 0.5, noised=True)]])
        model([[VitSplit(torch.zeros(4, 12), 2, 2), TextSplit([3])]])
    assert modes == [True, False, False]
