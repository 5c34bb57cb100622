"""Memory the weights and optimizer state need, per GPU, from parameter counts and precisions.

    python -m titan_flow.bench.memory [--gpus 8] [--master float32] [--compute bfloat16] [--no-ema]

Every count comes from the model built on the meta device: our SD3, FLUX.1, Wan and Bagel ports, and
diffusers' and transformers' classes with the published configs for Qwen-Image and the text encoders /
VAEs. Per GPU, with FSDP2 sharding over G GPUs (bytes per parameter in brackets):

    trained        P_train  x (master + grad [= master] + AdamW m, v [2 x 4] + EMA [4, if on]) / G
    frozen, in the trained model (LoRA base, Bagel's und expert)    P_frozen x master / G
    gathered       (2 largest blocks [current + prefetched] + the root's own params) x compute
    encoders, VAE  replicated on every GPU: P_enc x encoder dtype + P_vae x VAE dtype
    (+ a frozen reference copy, full fine-tune with a KL or DPO/SFT: P_model x master / G)

Activations are not included: they scale with batch, resolution and activation checkpointing and
are what `python -m titan_flow.bench` measures on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_BYTES, EMA_BYTES = 8, 4
SD3_LORA = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def n_params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --- the published models, on the meta device ---------------------------------------------------


def _clip_l():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768))


def _clip_l_pooled():  # FLUX reads CLIP-L's pooled output: no projection layer
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12))


def _clip_g():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280))


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


def _qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
        vocab_size=152064, tie_word_embeddings=False))


def _umt5_xxl():  # Wan's text encoder (google/umt5-xxl's encoder)
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, relative_attention_num_buckets=32,
                                       relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                                       tie_word_embeddings=False))


def _wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan()


def _sd3_vae():  # the SD3 and FLUX VAE (16 latent channels)
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         use_quant_conv=False, use_post_quant_conv=False)


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage()


def _sd35_medium():
    from titan_flow.models import get_model_spec

    spec = get_model_spec("sd3")
    return spec.model_cls(spec.args("sd3.5-medium"))


def _flux_dev():  # FLUX.1-Kontext-dev has the same transformer
    from titan_flow.models import get_model_spec

    spec = get_model_spec("flux")
    return spec.model_cls(spec.args("flux.1-dev"))


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584)


def _wan(flavor: str):
    from titan_flow.models import get_model_spec

    spec = get_model_spec("wan")
    return spec.model_cls(spec.args(flavor))


def _bagel():
    from titan_flow.models import get_model_spec

    spec = get_model_spec("bagel")
    return spec.model_cls(spec.args("7b_mot"))


@dataclass(frozen=True)
class Family:
    name: str
    backbone: Callable[[], nn.Module]
    block_lists: Callable[[nn.Module], list[nn.ModuleList]]  # the FSDP units
    encoders: tuple[Callable[[], nn.Module], ...]
    vae: Callable[[], nn.Module]
    lora_targets: tuple[str, ...]  # the reference's LoRA recipe
    lora_rank: int
    full_trainable: Callable[[nn.Module], list[nn.Parameter]] = lambda m: list(m.parameters())


FAMILIES = (
    Family("SD3.5-Medium", _sd35_medium, lambda m: [m.transformer_blocks], (_clip_l, _clip_g, _t5_xxl), _sd3_vae,
           tuple(SD3_LORA), 32),
    Family("FLUX.1-dev", _flux_dev, lambda m: [m.transformer_blocks, m.single_transformer_blocks],
           (_clip_l_pooled, _t5_xxl),
           _sd3_vae, (*SD3_LORA, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"), 64),
    Family("Qwen-Image", _qwen_image, lambda m: [m.transformer_blocks], (_qwen25_vl_7b,), _qwen_vae,
           (*SD3_LORA, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"), 64),
    Family("Wan2.1-T2V-1.3B", lambda: _wan("1.3B"), lambda m: [m.blocks], (_umt5_xxl,), _wan_vae,
           ("to_q", "to_k", "to_v", "to_out.0"), 32),
    Family("Wan2.1-T2V-14B", lambda: _wan("14B"), lambda m: [m.blocks], (_umt5_xxl,), _wan_vae,
           ("to_q", "to_k", "to_v", "to_out.0"), 32),
    # Bagel trains its generation expert (the reference's "full" mode); its LLM is also its text encoder.
    Family("Bagel-7B-MoT", _bagel, lambda m: [m.layers, m.vit.layers], (), _sd3_vae,
           ("gen.q_proj", "gen.k_proj", "gen.v_proj", "gen.o_proj", "gen.mlp.gate_proj", "gen.mlp.up_proj",
            "gen.mlp.down_proj"), 64, lambda m: m.gen_expert_parameters()),
)


@dataclass
class Counts:
    total: int  # backbone parameters
    full_trainable: int  # trained by a full fine-tune
    lora_trainable: int  # adapter parameters of the reference's LoRA recipe
    largest_block: int
    root: int  # parameters outside the FSDP blocks (they stay gathered with the root)
    encoders: int
    vae: int


def count(family: Family) -> Counts:
    from titan_flow.peft.lora import apply_lora, lora_parameters

    with torch.device("meta"):
        model = family.backbone()
        total = n_params([model])
        full = sum(p.numel() for p in family.full_trainable(model))
        blocks = [b for blocks in family.block_lists(model) for b in blocks]
        largest = max(n_params([b]) for b in blocks)
        root = total - n_params(blocks)
        apply_lora(model, family.lora_rank, 2.0 * family.lora_rank, list(family.lora_targets))
        lora = sum(p.numel() for p in lora_parameters(model))
        encoders = sum(n_params([make()]) for make in family.encoders)
        vae = n_params([family.vae()])
    return Counts(total, full, lora, largest, root, encoders, vae)


def per_gpu(c: Counts, lora: bool, gpus: int, master: str = "float32", compute: str = "bfloat16",
            encoder: str = "bfloat16", vae: str = "float32", ema: bool = True) -> dict[str, float]:
    """GiB per GPU of each part (see the module docstring for the formula)."""
    m = BYTES[master]
    trained = c.lora_trainable if lora else c.full_trainable
    frozen = c.total - c.full_trainable  # frozen parts of the backbone itself (Bagel's und expert, ViT)
    frozen += c.full_trainable if lora else 0  # LoRA: the base weights are frozen too
    parts = {
        "trained state": trained * (m + m + ADAM_BYTES + (EMA_BYTES if ema else 0)) / gpus,
        "frozen weights": frozen * m / gpus,
        "gathered": (2 * c.largest_block + c.root) * BYTES[compute],
        "encoders + VAE": c.encoders * BYTES[encoder] + c.vae * BYTES[vae],
    }
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["reference copy"] = c.total * m / gpus / GIB
    return parts


def table(gpus: int = 8, **precision) -> str:
    rows = [
        "| model | params (trained: full / LoRA) | mode | trained state | frozen weights | gathered | "
        "encoders + VAE | total per GPU (of 80 GB) | + reference copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family in FAMILIES:
        c = count(family)
        for lora in (False, True):
            g = per_gpu(c, lora, gpus, **precision)
            params = f"{c.total / 1e9:.2f} B ({c.full_trainable / 1e9:.2f} B / {c.lora_trainable / 1e6:.0f} M)"
            mode = f"LoRA r={family.lora_rank}" if lora else "full"
            reference = "-" if lora else f"{g['reference copy']:.1f}"
            rows.append(
                f"| {family.name} | {params} | {mode} | {g['trained state']:.1f} | {g['frozen weights']:.1f} | "
                f"{g['gathered']:.1f} | {g['encoders + VAE']:.1f} | {g['total']:.1f} GiB | {reference} |"
            )
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="FSDP shard degree")
    p.add_argument("--master", default="float32", choices=sorted(BYTES), help="model.dtype (master weights)")
    p.add_argument("--compute", default="bfloat16", choices=sorted(BYTES), help="model.compute_dtype")
    p.add_argument("--encoder", default="bfloat16", choices=sorted(BYTES), help="model.encoder_dtype")
    p.add_argument("--vae", default="float32", choices=sorted(BYTES), help="model.vae_dtype")
    p.add_argument("--no-ema", action="store_true", help="training.ema = false")
    a = p.parse_args(argv)
    print(f"GiB per GPU, FSDP over {a.gpus} GPUs; master {a.master}, compute {a.compute}, encoders {a.encoder}, "
          f"VAE {a.vae}, EMA {'off' if a.no_ema else 'on'}; activations not included\n")
    print(table(a.gpus, master=a.master, compute=a.compute, encoder=a.encoder, vae=a.vae, ema=not a.no_ema))
    return 0


if __name__ == "__main__":
    sys.exit(main())
