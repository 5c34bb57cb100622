"""Qwen-Image hyper-parameters: the fields of diffusers' `QwenImageTransformer2DModel` config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from titan_flow.models.common.state_dict import diffusers_config_kwargs

DIFFUSERS_CLASS_NAME = "QwenImageTransformer2DModel"
# Flags of later diffusers releases that change the network; Qwen-Image and Qwen-Image-Edit (v1)
# publish them all False. zero_cond_t (Qwen-Image-Edit-2511) modulates condition tokens with t = 0.
UNSUPPORTED_FLAGS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclass(frozen=True)
class QwenImageArgs:
    """Defaults are diffusers' defaults (= the published Qwen-Image config), so a config.json that
    omits a field means the same here."""

    patch_size: int = 2
    in_channels: int = 64  # packed latent channels: 4 x the VAE's z_dim (2x2 patches)
    out_channels: int = 16  # unpacked latent channels; proj_out writes patch_size**2 x this
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # width of the Qwen2.5-VL hidden states
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # MSRoPE (frame, row, column) dims of each head
    guidance_embeds: bool = False
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Qwen-Image config: {f.name} must be a positive integer, got {value!r}")
        enabled = [flag for flag in UNSUPPORTED_FLAGS if getattr(self, flag)]
        if enabled:
            raise ValueError(
                f"Qwen-Image config: {enabled} = True is not supported by this port (Qwen-Image and "
                "Qwen-Image-Edit v1 set them False); check the checkpoint's transformer/config.json"
            )
        if len(self.axes_dims_rope) != 3 or any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"Qwen-Image config: axes_dims_rope={list(self.axes_dims_rope)} must be three positive even "
                "numbers (frame, row, column)"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"Qwen-Image config: axes_dims_rope {list(self.axes_dims_rope)} sum to {sum(self.axes_dims_rope)}, "
                f"but must equal attention_head_dim={self.attention_head_dim} (MSRoPE rotates the whole head)"
            )
        if self.in_channels % self.patch_size**2:
            raise ValueError(
                f"Qwen-Image config: in_channels={self.in_channels} must be divisible by patch_size**2="
                f"{self.patch_size**2} (packed 2x2 latent patches)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """The VAE's z_dim: the packed input holds patch_size**2 latent pixels of this many channels."""
        return self.in_channels // self.patch_size**2

    @classmethod
    def from_diffusers_config(cls, config: dict) -> QwenImageArgs:
        """Read a diffusers transformer config.json dict (see `diffusers_config_kwargs`)."""
        kwargs = diffusers_config_kwargs(cls, config, DIFFUSERS_CLASS_NAME, "Qwen-Image")
        if kwargs.get("out_channels", 0) is None:  # diffusers: None means "same as in_channels"
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        config = {"_class_name": DIFFUSERS_CLASS_NAME, **asdict(self)}
        config["axes_dims_rope"] = list(self.axes_dims_rope)
        return config


FLAVORS = {
    # Qwen/Qwen-Image and Qwen/Qwen-Image-Edit (v1) publish this same transformer config: 20.43 B.
    "qwen-image": QwenImageArgs(),
    # Tiny CPU model (backbones.md section 1.3); the debug pipeline's text encoder (hidden 32) and
    # VAE (z_dim 4) are built to match.
    "debug": QwenImageArgs(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
}
