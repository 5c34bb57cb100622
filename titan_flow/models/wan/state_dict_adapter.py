"""Wan checkpoints <-> our model: diffusers `transformer/` directories and the original Wan-AI layout.

Our module names are diffusers', so the diffusers mapping is the identity, checked key by key and
shape by shape. The original checkpoints (Wan-AI/Wan2.1-T2V-1.3B and -14B, `WanModel` in their
config.json; or a single .safetensors file, optionally under `model.diffusion_model.`) name the same
tensors differently, with no reshaping: one rename table (models/common/state_dict.KeyRule) maps
every key both ways. The only trap is the cross-attention norm, `norm3` in the original and `norm2`
in diffusers (the original calls its norms in the order norm1, norm3, norm2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from titan_flow.models.common.state_dict import (
    CONFIG_NAME,
    KeyRule,
    block_indices,
    check_keys,
    from_original_keys,
    linear_rules,
    load_diffusers_dir,
    read_safetensors,
    to_original_keys,
    write_diffusers_dir,
)
from titan_flow.models.wan.args import DIFFUSERS_CLASS_NAME, WanArgs
from titan_flow.models.wan.model import WanTransformer

ORIGINAL_CLASS_NAME = "WanModel"
ORIGINAL_PREFIX = "model.diffusion_model."
ORIGINAL_HEAD_DIM = 128  # every Wan2.1 model; the original checkpoint's shapes do not record the head split
WEIGHT = ("weight",)


def _original_rules(num_layers: int, cross_attn_norm: bool) -> list[KeyRule]:
    """original key <- our key, for every tensor of a Wan model of `num_layers` blocks."""
    rules = [
        *linear_rules("patch_embedding", ["patch_embedding"]),
        *linear_rules("time_embedding.0", ["condition_embedder.time_embedder.linear_1"]),
        *linear_rules("time_embedding.2", ["condition_embedder.time_embedder.linear_2"]),
        *linear_rules("time_projection.1", ["condition_embedder.time_proj"]),
        *linear_rules("text_embedding.0", ["condition_embedder.text_embedder.linear_1"]),
        *linear_rules("text_embedding.2", ["condition_embedder.text_embedder.linear_2"]),
        *linear_rules("head.head", ["proj_out"]),
        KeyRule("head.modulation", ("scale_shift_table",)),
    ]
    for i in range(num_layers):
        b = f"blocks.{i}"  # the same prefix in both layouts
        rules.append(KeyRule(f"{b}.modulation", (f"{b}.scale_shift_table",)))
        for original, ours in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for short, proj in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
                rules += linear_rules(f"{b}.{original}.{short}", [f"{b}.{ours}.{proj}"])
            for norm in ("norm_q", "norm_k"):
                rules += linear_rules(f"{b}.{original}.{norm}", [f"{b}.{ours}.{norm}"], suffixes=WEIGHT)
        if cross_attn_norm:
            rules += linear_rules(f"{b}.norm3", [f"{b}.norm2"])  # the affine cross-attention norm
        rules += linear_rules(f"{b}.ffn.0", [f"{b}.ffn.net.0.proj"]) + linear_rules(f"{b}.ffn.2", [f"{b}.ffn.net.2"])
    return rules


def infer_args(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> WanArgs:
    """WanArgs from a state dict in our (= diffusers) key format; the heads default to 128-wide ones."""
    try:
        dim, in_channels, *patch = state_dict["patch_embedding.weight"].shape
        text_dim = state_dict["condition_embedder.text_embedder.linear_1.weight"].shape[1]
        freq_dim = state_dict["condition_embedder.time_embedder.linear_1.weight"].shape[1]
        ffn_dim = state_dict["blocks.0.ffn.net.0.proj.weight"].shape[0]
        out_features = state_dict["proj_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a Wan transformer state dict: key {e} is missing") from None
    num_heads = num_heads or dim // ORIGINAL_HEAD_DIM
    if dim % num_heads:
        raise ValueError(f"cannot split the width {dim} into {num_heads} attention heads")
    return WanArgs(
        patch_size=tuple(patch),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=in_channels,
        out_channels=out_features // (patch[0] * patch[1] * patch[2]),
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=block_indices(state_dict, "blocks.")[-1] + 1,
        cross_attn_norm="blocks.0.norm2.weight" in state_dict,
    )


def check_state_dict(state_dict: dict[str, torch.Tensor], args: WanArgs, source: str = "state dict") -> None:
    """Raise naming every missing, unexpected and mis-shaped key against the model `args` builds."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in WanTransformer(args).state_dict().items()}
    check_keys(state_dict, expected, f"{source} does not match the Wan model of {args}")


def from_diffusers(state_dict: dict[str, torch.Tensor], args: WanArgs | None = None) -> dict[str, torch.Tensor]:
    """Diffusers keys -> ours (identity), validated against `args` or the layout the shapes imply."""
    check_state_dict(state_dict, args or infer_args(state_dict))
    return dict(state_dict)


def to_diffusers(state_dict: dict[str, torch.Tensor], args: WanArgs | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers (identity), validated like `from_diffusers`."""
    return from_diffusers(state_dict, args)


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the original Wan-AI keys (no prefix), tensors unchanged; inverse of `from_original`."""
    layers = block_indices(state_dict, "blocks.")
    if not layers:
        raise ValueError("not a Wan state dict in our layout: no blocks.* keys")
    rules = _original_rules(layers[-1] + 1, "blocks.0.norm2.weight" in state_dict)
    return to_original_keys(state_dict, rules, "Wan state dict")


def from_original(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, torch.Tensor]:
    """Original Wan-AI keys (with or without `model.diffusion_model.`) -> ours, checked against the
    model the shapes imply (`num_heads` heads, else 128-wide ones)."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        state_dict = {k[len(ORIGINAL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    layers = block_indices(state_dict, "blocks.")
    if "patch_embedding.weight" not in state_dict or not layers:
        raise ValueError("not an original Wan checkpoint: no patch_embedding.weight or blocks.* keys")
    rules = _original_rules(layers[-1] + 1, "blocks.0.norm3.weight" in state_dict)
    out = from_original_keys(state_dict, rules, "original Wan checkpoint")
    check_state_dict(out, infer_args(out, num_heads), "original Wan checkpoint")
    return out


# --- files ------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[WanArgs, dict[str, torch.Tensor]]:
    """(args, our state dict) from a diffusers directory (transformer/ or a pipeline root), an original
    Wan-AI directory (config.json `_class_name` "WanModel"), or a single original .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Wan checkpoint not found: {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"Wan checkpoint {path}: a single file must be an original-layout .safetensors file")
        try:
            state_dict = from_original(read_safetensors([path], device, "Wan checkpoint"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return infer_args(state_dict), state_dict

    # Read the config as it is, then tell the two layouts apart by its class name.
    config, weights, directory = load_diffusers_dir(path, "Wan transformer", lambda config: config, device)
    if config.get("_class_name", DIFFUSERS_CLASS_NAME) == ORIGINAL_CLASS_NAME:
        try:
            state_dict = from_original(weights, config.get("num_heads"))
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from None
        return infer_args(state_dict, config.get("num_heads")), state_dict
    try:
        args = WanArgs.from_diffusers_config(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None
    check_state_dict(weights, args, source=f"Wan checkpoint {directory}")
    return args, weights


def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> WanTransformer:
    """Our model with the checkpoint's weights, built on meta so no memory goes to a throwaway init."""
    args, state_dict = load_checkpoint(path, device)
    with torch.device("meta"):
        model = WanTransformer(args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def save_diffusers(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: WanArgs,
    out_dir: str | Path,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Write a diffusers transformer directory that `WanTransformer3DModel.from_pretrained(out_dir)` loads."""
    state_dict = model_or_state_dict
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
    return write_diffusers_dir(to_diffusers(state_dict, args), args.to_diffusers_config(), out_dir, max_shard_size)
