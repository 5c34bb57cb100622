"""Wan checkpoints <-> our model: diffusers `transformer/` directories and the original Wan-AI layout.

Our module names are diffusers', so the diffusers mapping is the identity, checked key by key and
shape by shape. The original checkpoints (Wan-AI/Wan2.1-T2V-1.3B and -14B, `WanModel` in their
config.json; or a single .safetensors file, optionally under `model.diffusion_model.`) name the same
tensors differently, with no reshaping: one table maps every key both ways. The only trap is the
cross-attention norm, `norm3` in the original and `norm2` in diffusers (the original calls its
norms in the order norm1, norm3, norm2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from titan_flow.models.common.diffusers_io import (
    CONFIG_NAME,
    read_config,
    read_safetensors,
    read_weights,
    transformer_dir,
    write_diffusers_dir,
)
from titan_flow.models.common.state_dict import check_keys, listing, materialize
from titan_flow.models.wan.args import DIFFUSERS_CLASS_NAME, WanArgs
from titan_flow.models.wan.model import WanTransformer

ORIGINAL_CLASS_NAME = "WanModel"
ORIGINAL_PREFIX = "model.diffusion_model."
ORIGINAL_HEAD_DIM = 128  # every Wan2.1 model; the original checkpoint's shapes do not record the head split

# Our (= diffusers) module path -> the original one. Block-level entries apply to every `blocks.{i}.`.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_IN_BLOCK = {
    "scale_shift_table": "modulation",
    "norm2": "norm3",  # the affine cross-attention norm
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    **{
        f"{ours}.{proj}": f"{original}.{short}"
        for ours, original in (("attn1", "self_attn"), ("attn2", "cross_attn"))
        for proj, short in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"),
                            ("norm_q", "norm_q"), ("norm_k", "norm_k"))
    },
}


_TOP_LEVEL_BACK = {original: ours for ours, original in _TOP_LEVEL.items()}
_IN_BLOCK_BACK = {original: ours for ours, original in _IN_BLOCK.items()}


def _rename(key: str, top: dict[str, str], in_block: dict[str, str]) -> str:
    """Rename the module path of `key` by the table (block entries under `blocks.{i}.`); KeyError if none applies."""
    index, rest, table = None, key, top
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        table = in_block
    for name, new in table.items():
        if rest == name or rest.startswith(name + "."):
            renamed = new + rest[len(name):]
            return renamed if index is None else f"blocks.{index}.{renamed}"
    raise KeyError(key)


def _expected_shapes(args: WanArgs) -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanTransformer(args).state_dict().items()}


def _block_indices(keys, prefix: str = "blocks.") -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


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
    layers = _block_indices(state_dict)
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
        num_layers=layers[-1] + 1,
        cross_attn_norm="blocks.0.norm2.weight" in state_dict,
    )


def check_state_dict(state_dict: dict[str, torch.Tensor], args: WanArgs, source: str = "state dict") -> None:
    """Raise naming every missing, unexpected and mis-shaped key against the model `args` builds."""
    check_keys(state_dict, _expected_shapes(args), f"{source} does not match the Wan model of {args}")


def from_diffusers(state_dict: dict[str, torch.Tensor], args: WanArgs | None = None) -> dict[str, torch.Tensor]:
    """Diffusers keys -> ours (identity), validated against `args` or the layout the shapes imply."""
    check_state_dict(state_dict, args or infer_args(state_dict))
    return dict(state_dict)


def to_diffusers(state_dict: dict[str, torch.Tensor], args: WanArgs | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers (identity), validated like `from_diffusers`."""
    return from_diffusers(state_dict, args)


def _rename_all(state_dict: dict[str, torch.Tensor], top, in_block) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(renamed state dict, the keys no rule applies to)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            out[_rename(key, top, in_block)] = value
        except KeyError:
            unknown.append(key)
    return out, unknown


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the original Wan-AI keys (no prefix), tensors unchanged; inverse of `from_original`."""
    out, unknown = _rename_all(state_dict, _TOP_LEVEL, _IN_BLOCK)
    if unknown:
        raise ValueError(f"not a Wan state dict in our layout: no original name for {listing(unknown)}")
    return out


def from_original(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, torch.Tensor]:
    """Original Wan-AI keys (with or without `model.diffusion_model.`) -> ours, checked against the
    model the shapes imply (`num_heads` heads, else 128-wide ones)."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        state_dict = {k[len(ORIGINAL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    out, unknown = _rename_all(state_dict, _TOP_LEVEL_BACK, _IN_BLOCK_BACK)
    if unknown:
        raise ValueError(
            f"original Wan checkpoint: unexpected keys {listing(unknown)} (image-to-video or other variants are "
            "not supported)"
        )
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

    directory = transformer_dir(
        path, "a diffusers Wan transformer or pipeline directory, or an original Wan-AI checkpoint directory"
    )
    config = read_config(directory)
    weights = read_weights(directory, device, "Wan checkpoint")
    class_name = config.get("_class_name", DIFFUSERS_CLASS_NAME)
    if class_name == ORIGINAL_CLASS_NAME:
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
    return materialize(WanTransformer, args, state_dict, dtype, device)


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
