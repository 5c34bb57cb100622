"""FLUX.1 hyper-parameters: the fields of diffusers' `FluxTransformer2DModel` config.

FLUX.1-dev and FLUX.1-Kontext-dev publish the same transformer config; Kontext differs only in how
the pipeline feeds it (condition-image tokens appended to the noisy ones).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from titan_flow.models.common.state_dict import diffusers_config_kwargs

DIFFUSERS_CLASS_NAME = "FluxTransformer2DModel"


@dataclass(frozen=True)
class FluxArgs:
    """Defaults are diffusers' defaults, so a config.json that omits a field means the same here."""

    patch_size: int = 1  # the pipeline packs 2x2 latent patches itself; the backbone sees tokens
    in_channels: int = 64  # packed width: 4 x VAE latent channels
    out_channels: int | None = None  # None = in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5 width
    pooled_projection_dim: int = 768  # CLIP-L pooled width
    guidance_embeds: bool = False  # guidance-distilled models (dev, Kontext-dev) embed the guidance scale
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # RoPE dims per position axis (frame, row, col)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "int | None") and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"FLUX config: {f.name} must be a positive integer, got {value!r}")
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"FLUX config: guidance_embeds must be true or false, got {self.guidance_embeds!r}")
        if self.patch_size != 1:
            raise ValueError(
                f"FLUX config: patch_size={self.patch_size} is not supported; FLUX packs latents in the pipeline "
                "and every published FLUX transformer uses patch_size 1"
            )
        if len(self.axes_dims_rope) != 3 or any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"FLUX config: axes_dims_rope={list(self.axes_dims_rope)} must be three positive even numbers "
                "(frame, row, col)"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"FLUX config: axes_dims_rope {list(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, "
                f"but it must equal attention_head_dim={self.attention_head_dim} (RoPE rotates the whole head)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers_config(cls, config: dict) -> FluxArgs:
        """Read a diffusers transformer config.json dict; metadata keys (leading `_`) are ignored.

        An unknown non-metadata key raises: it would be an architecture option this port does not
        implement, and silently dropping it could build a different network.
        """
        return cls(**diffusers_config_kwargs(cls, config, DIFFUSERS_CLASS_NAME, "FLUX"))

    def to_diffusers_config(self) -> dict:
        config = {"_class_name": DIFFUSERS_CLASS_NAME, **asdict(self)}
        config["axes_dims_rope"] = list(self.axes_dims_rope)
        return config


DEV = FluxArgs(guidance_embeds=True)
DEBUG = FluxArgs(
    in_channels=16,  # the debug VAE's 4 latent channels, packed 2x2
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

# Flavors starting with "kontext" build the same backbone; the pipeline then runs FLUX.1-Kontext
# editing (condition images) instead of text-to-image.
FLAVORS = {
    "flux.1-dev": DEV,
    "flux.1-kontext-dev": DEV,
    "flux.1-schnell": FluxArgs(guidance_embeds=False),
    # Tiny CPU models; the debug pipeline's text encoders/VAE are built to match joint 32, pooled 24, 16 packed channels.
    "debug": DEBUG,
    "kontext-debug": DEBUG,
}


def is_kontext_flavor(flavor: str) -> bool:
    return "kontext" in flavor
