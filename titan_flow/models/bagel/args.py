"""Bagel-7B-MoT hyper-parameters: the Qwen2 MoT language model, the SigLIP ViT and the latent interface.

A released Bagel directory describes itself with `llm_config.json` (Qwen2.5-7B-Instruct style) and
`vit_config.json` (SigLIP-so400m); `BagelArgs.from_configs` reads them the way Bagel's own loader
does (the ViT drops its last layer: Bagel uses penultimate-layer features). The latent interface
(patch size 2, the 64 x 64 latent position table, 70 x 70 ViT table) is not in those files: it is
fixed by the released weights, so it lives in the flavors here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VitArgs:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26  # vit_config.json says 27; Bagel uses the penultimate layer's features
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980  # the learned position table covers (image_size / patch_size)^2 patches
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class BagelArgs:
    # Qwen2 language model (each decoder layer holds an "und" and a "gen" expert of this shape)
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    # latent interface (FLUX VAE latents, patched 2 x 2)
    latent_channels: int = 16
    latent_patch_size: int = 2
    vae_downsample: int = 8
    max_latent_size: int = 64  # latent position ids are row * max_latent_size + col
    # image understanding branch; None = no ViT (text-to-image only, as flow_grpo builds it)
    vit: VitArgs | None = field(default_factory=VitArgs)
    vit_max_num_patch_per_side: int = 70  # ViT position ids are row * this + col
    # special tokens of the Qwen2.5 tokenizer that frame the context and the image blocks
    bos_token_id: int = 151644  # <|im_start|>
    eos_token_id: int = 151645  # <|im_end|>
    start_of_image_id: int = 151652  # <|vision_start|>
    end_of_image_id: int = 151653  # <|vision_end|>

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        ids = {f: getattr(self, f) for f in ("bos_token_id", "eos_token_id", "start_of_image_id", "end_of_image_id")}
        outside = {f: i for f, i in ids.items() if not 0 <= i < self.vocab_size}
        if outside:
            raise ValueError(
                f"special token ids {outside} lie outside the vocabulary of {self.vocab_size}; they come from the "
                "Bagel directory's tokenizer files (tokenizer.json / tokenizer_config.json), which must be present"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_latent_dim(self) -> int:
        """Channels of one latent token: a 2 x 2 patch of the VAE latent."""
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token along each side (VAE downsample x latent patch)."""
        return self.vae_downsample * self.latent_patch_size

    @classmethod
    def from_configs(cls, llm_config: dict, vit_config: dict | None, **overrides) -> "BagelArgs":
        """Args from the dicts of a Bagel directory's llm_config.json / vit_config.json."""
        act = llm_config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"llm_config.json: hidden_act {act!r} is not supported; the Bagel MoT uses 'silu'")
        if llm_config.get("rope_scaling"):
            raise ValueError(f"llm_config.json: rope_scaling {llm_config['rope_scaling']!r} is not supported (Bagel uses none)")
        vit = None
        if vit_config is not None:
            vit_act = vit_config.get("hidden_act", "gelu_pytorch_tanh")
            if vit_act != "gelu_pytorch_tanh":
                raise ValueError(f"vit_config.json: hidden_act {vit_act!r} is not supported; SigLIP uses 'gelu_pytorch_tanh'")
            vit = VitArgs(
                hidden_size=vit_config["hidden_size"],
                intermediate_size=vit_config["intermediate_size"],
                num_layers=vit_config["num_hidden_layers"] - 1,
                num_heads=vit_config["num_attention_heads"],
                patch_size=vit_config["patch_size"],
                image_size=vit_config["image_size"],
                num_channels=vit_config.get("num_channels", 3),
                layer_norm_eps=vit_config.get("layer_norm_eps", 1e-6),
            )
        fields = dict(
            vocab_size=llm_config["vocab_size"],
            hidden_size=llm_config["hidden_size"],
            intermediate_size=llm_config["intermediate_size"],
            num_layers=llm_config["num_hidden_layers"],
            num_heads=llm_config["num_attention_heads"],
            num_kv_heads=llm_config["num_key_value_heads"],
            rope_theta=llm_config.get("rope_theta", 1e6),
            rms_norm_eps=llm_config.get("rms_norm_eps", 1e-6),
            vit=vit,
        )
        return cls(**(fields | overrides))

    def to_configs(self) -> tuple[dict, dict | None]:
        """(llm_config.json, vit_config.json) dicts that `from_configs` reads back into these args."""
        llm = {
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": False,
        }
        if self.vit is None:
            return llm, None
        vit = {
            "model_type": "siglip_vision_model",
            "hidden_size": self.vit.hidden_size,
            "intermediate_size": self.vit.intermediate_size,
            "num_hidden_layers": self.vit.num_layers + 1,
            "num_attention_heads": self.vit.num_heads,
            "patch_size": self.vit.patch_size,
            "image_size": self.vit.image_size,
            "num_channels": self.vit.num_channels,
            "layer_norm_eps": self.vit.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
        }
        return llm, vit


FLAVORS: dict[str, BagelArgs] = {
    # ByteDance-Seed/BAGEL-7B-MoT as released (what from_configs reads from its directory).
    "7b_mot": BagelArgs(),
    # A few-ten-thousand-parameter model that exercises every code path on a CPU in milliseconds:
    # GQA (4 q / 2 kv heads), two layers, a 2-layer ViT, and a vocabulary that fits the byte-level
    # tokenizer of pipeline.py (256 bytes + specials). Special tokens sit past the byte ids.
    "debug": BagelArgs(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        latent_channels=4,
        max_latent_size=8,
        vit=VitArgs(hidden_size=24, intermediate_size=48, num_layers=2, num_heads=2, patch_size=2, image_size=16),
        vit_max_num_patch_per_side=8,
        bos_token_id=257,
        eos_token_id=258,
        start_of_image_id=259,
        end_of_image_id=260,
    ),
}
