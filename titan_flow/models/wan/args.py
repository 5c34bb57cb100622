"""Wan2.1 text-to-video hyper-parameters: the fields of diffusers' `WanTransformer3DModel` config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DIFFUSERS_CLASS_NAME = "WanTransformer3DModel"
QK_NORMS = ("rms_norm_across_heads",)
ROPE_THETA = 10000.0
# Image-to-video fields of the diffusers config; the text-to-video models leave them None.
I2V_FIELDS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


@dataclass(frozen=True)
class WanArgs:
    """Defaults are diffusers' (those of the 14B model), so a config.json that omits a field means the same here."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) per token
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096  # UMT5-XXL width
    freq_dim: int = 256  # sinusoidal timestep features
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention
    qk_norm: str = "rms_norm_across_heads"  # RMSNorm over all heads jointly (weight [D]), q and k
    eps: float = 1e-6
    rope_max_seq_len: int = 1024  # positions per axis the RoPE covers (frames, rows, columns after patching)
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Wan config: {f.name} must be a positive integer, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"Wan config: patch_size must be 3 positive integers (t, h, w), got {self.patch_size}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"Wan config: qk_norm={self.qk_norm!r} is not supported; use one of {QK_NORMS}")
        set_i2v = [name for name in I2V_FIELDS if getattr(self, name) is not None]
        if set_i2v:
            raise ValueError(
                f"Wan config: {set_i2v} are image-to-video fields; this port implements the text-to-video "
                "models (Wan2.1-T2V-1.3B / 14B), where they are None"
            )
        t, h, w = self.rope_axes_dims
        if min(t, h, w) <= 0 or t % 2:
            raise ValueError(
                f"Wan config: attention_head_dim={self.attention_head_dim} gives RoPE bands (t, h, w) = {(t, h, w)}; "
                "each must be a positive even width (head dims of 12, 16, ..., 128 work)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_axes_dims(self) -> tuple[int, int, int]:
        """Head-dim bands of the 3-axis RoPE, in the order (frame, row, column): 44/42/42 for head 128."""
        d = self.attention_head_dim
        h = w = 2 * (d // 6)
        return d - h - w, h, w

    @classmethod
    def from_diffusers_config(cls, config: dict) -> WanArgs:
        """Read a diffusers transformer config.json dict; metadata keys (leading `_`) are ignored.

        An unknown non-metadata key raises: it would be an architecture option this port does not
        implement, and silently dropping it could build a different network.
        """
        class_name = config.get("_class_name", DIFFUSERS_CLASS_NAME)
        if class_name != DIFFUSERS_CLASS_NAME:
            raise ValueError(f"Wan config: _class_name is {class_name!r}, expected {DIFFUSERS_CLASS_NAME!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"Wan config: unsupported keys {unknown}; this port implements only {sorted(names)}")
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("out_channels", 0) is None:  # diffusers: None means "same as in_channels"
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        config = {"_class_name": DIFFUSERS_CLASS_NAME, **asdict(self)}
        config["patch_size"] = list(self.patch_size)
        return config


FLAVORS = {
    # Wan-AI/Wan2.1-T2V-1.3B(-Diffusers): 1,418,996,800 parameters.
    "1.3B": WanArgs(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    # Wan-AI/Wan2.1-T2V-14B(-Diffusers): 14,288,491,584 parameters.
    "14B": WanArgs(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    # Tiny CPU model; the debug pipeline's UMT5 (width 32) and VAE (4 latent channels) are built to match.
    "debug": WanArgs(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=64,
    ),
}
