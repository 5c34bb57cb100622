"""SD3 / SD3.5 MMDiT hyper-parameters: the fields of diffusers' `SD3Transformer2DModel` config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from titan_flow.models.common.state_dict import diffusers_config_kwargs

DIFFUSERS_CLASS_NAME = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class SD3Args:
    """Defaults are diffusers' defaults, so a config.json that omits a field means the same here."""

    sample_size: int = 128  # training latent size; only sets the pos-embed coordinate scale
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text-encoder sequence (CLIP||T5)
    caption_projection_dim: int = 1152  # must equal num_attention_heads * attention_head_dim
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96  # side of the stored pos-embed grid; inputs are centre-cropped from it
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 blocks with a second, image-only attention
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"SD3 config: {f.name} must be a positive integer, got {value!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3 config: qk_norm={self.qk_norm!r} is not supported; use one of {QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"SD3 config: caption_projection_dim={self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim} (the context stream shares the width)"
            )
        if self.inner_dim % 4:
            raise ValueError(f"SD3 config: the inner dim {self.inner_dim} must be divisible by 4 (2-D sin-cos table)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"SD3 config: dual_attention_layers {bad} are outside the {self.num_layers} layers (0..{self.num_layers - 1})"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"SD3 config: sample_size={self.sample_size} must be divisible by patch_size={self.patch_size}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers_config(cls, config: dict) -> SD3Args:
        """Read a diffusers transformer config.json dict (see `diffusers_config_kwargs`)."""
        kwargs = diffusers_config_kwargs(cls, config, DIFFUSERS_CLASS_NAME, "SD3")
        if kwargs.get("out_channels", 0) is None:  # diffusers: None means "same as in_channels"
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        if kwargs.get("pos_embed_max_size", 0) is None:
            raise ValueError("SD3 config: pos_embed_max_size=None (no cropped pos-embed) is not supported")
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        config = {"_class_name": DIFFUSERS_CLASS_NAME, **asdict(self)}
        config["dual_attention_layers"] = list(self.dual_attention_layers)
        return config


FLAVORS = {
    "sd3-medium": SD3Args(
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=192,
    ),
    "sd3.5-medium": SD3Args(
        num_layers=24,
        num_attention_heads=24,
        caption_projection_dim=1536,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "sd3.5-large": SD3Args(
        num_layers=38,
        num_attention_heads=38,
        caption_projection_dim=2432,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
    # Tiny CPU model; the debug pipeline's text encoders/VAE are built to match joint 32, pooled 24, 4 channels.
    "debug": SD3Args(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    # Pixel-space MMDiT of the shapes world (models/sd3/shapes.py): 16 x 16 RGB in 2 x 2 patches (64 tokens),
    # text = one-hot words (21) + positions (8) in 32 wide, pooled = bag of words in 24; 2.3 M parameters.
    "shapes": SD3Args(
        sample_size=16,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        caption_projection_dim=128,
        joint_attention_dim=32,
        pooled_projection_dim=24,
        pos_embed_max_size=8,
        qk_norm="rms_norm",
    ),
}
