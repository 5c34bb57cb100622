"""SD3 checkpoints <-> our model: diffusers `transformer/` directories and SAI single files.

Our module names are diffusers', so the diffusers mapping is the identity; it is still checked key
by key and shape by shape so that a wrong checkpoint fails with the offending keys named. The SAI
single-file format (`sd3.5_medium.safetensors`, keys under `model.diffusion_model.`) fuses q/k/v
and stores the continuous adaLN halves as (shift, scale); one key table drives both directions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from titan_flow.models.common.state_dict import (
    KeyRule,
    block_indices,
    build_loaded,
    check_keys,
    from_original_keys,
    linear_rules,
    load_diffusers_dir,
    read_safetensors,
    state_dict_of,
    to_original_keys,
    write_diffusers_dir,
)
from titan_flow.models.sd3.args import SD3Args
from titan_flow.models.sd3.model import SD3Transformer

ORIGINAL_PREFIX = "model.diffusion_model."
SAI_HEAD_DIM = 64  # every SAI MMDiT uses 64-wide heads (hidden = 64 * depth)


def infer_args(state_dict: dict[str, torch.Tensor], head_dim: int | None = None) -> SD3Args:
    """SD3Args from a state dict in our (= diffusers) key format.

    Everything but the head split and `sample_size` is in the shapes. The head width is the qk-norm
    width when the checkpoint has qk-norm (SD3.5), else SAI's 64. `sample_size` only scales the
    coordinates of the pos-embed table, which the checkpoint carries, so SAI's 128 is used.
    """
    try:
        dim, in_channels, patch_size, _ = state_dict["pos_embed.proj.weight"].shape
        grid_len = state_dict["pos_embed.pos_embed"].shape[1]
        joint_dim = state_dict["context_embedder.weight"].shape[1]
        caption_dim = state_dict["context_embedder.weight"].shape[0]
        pooled_dim = state_dict["time_text_embed.text_embedder.linear_1.weight"].shape[1]
        out_features = state_dict["proj_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an SD3 transformer state dict: key {e} is missing") from None
    layers = block_indices(state_dict, "transformer_blocks.")
    if not layers:
        raise ValueError("not an SD3 transformer state dict: no transformer_blocks.* keys")
    norm_q = state_dict.get("transformer_blocks.0.attn.norm_q.weight")
    if head_dim is None:
        head_dim = norm_q.shape[0] if norm_q is not None else SAI_HEAD_DIM
    if dim % head_dim:
        raise ValueError(
            f"cannot infer the attention heads: inner dim {dim} is not a multiple of the head width {head_dim} "
            "(a checkpoint without qk-norm weights does not record it); use a diffusers directory with a config.json"
        )
    side = math.isqrt(grid_len)
    return SD3Args(
        patch_size=patch_size,
        in_channels=in_channels,
        num_layers=layers[-1] + 1,
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        joint_attention_dim=joint_dim,
        caption_projection_dim=caption_dim,
        pooled_projection_dim=pooled_dim,
        out_channels=out_features // patch_size**2,
        pos_embed_max_size=side,
        dual_attention_layers=tuple(i for i in layers if f"transformer_blocks.{i}.attn2.to_q.weight" in state_dict),
        qk_norm="rms_norm" if norm_q is not None else None,
    )


def check_state_dict(state_dict: dict[str, torch.Tensor], args: SD3Args, source: str = "state dict") -> None:
    """Raise naming every missing, unexpected and mis-shaped key against the model `args` builds."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in SD3Transformer(args).state_dict().items()}
    check_keys(state_dict, expected, f"{source} does not match the SD3 model of {args}")


def from_diffusers(state_dict: dict[str, torch.Tensor], args: SD3Args | None = None) -> dict[str, torch.Tensor]:
    """Diffusers keys -> ours (identity), validated against `args` or the layout the shapes imply."""
    if args is None:
        # The head split changes no shape, so without qk-norm weights a single head validates the keys.
        proj = state_dict.get("pos_embed.proj.weight")
        has_qk_norm = "transformer_blocks.0.attn.norm_q.weight" in state_dict
        args = infer_args(state_dict, head_dim=None if has_qk_norm or proj is None else proj.shape[0])
    check_state_dict(state_dict, args)
    return dict(state_dict)


def to_diffusers(state_dict: dict[str, torch.Tensor], args: SD3Args | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers (identity), validated like `from_diffusers`."""
    return from_diffusers(state_dict, args)


# --- SAI single-file format -------------------------------------------------------------------


def _original_key_table(num_layers: int, dual_layers: set[int], qk_norm: bool) -> list[KeyRule]:
    """The rules of every original key: fused q/k/v are split in three, the continuous adaLN halves swapped."""
    table = []

    def add(original: str, ours: list[str], how: str = "copy", suffixes=("weight", "bias")):
        table.extend(linear_rules(original, ours, how, suffixes=suffixes))

    table.append(KeyRule("pos_embed", ("pos_embed.pos_embed",)))
    add("x_embedder.proj", ["pos_embed.proj"])
    add("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"])
    add("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"])
    add("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"])
    add("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"])
    add("context_embedder", ["context_embedder"])
    for i in range(num_layers):
        last = i == num_layers - 1
        x, c, b = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        add(f"{x}.attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], "split")
        add(f"{c}.attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], "split")
        if qk_norm:
            add(f"{x}.attn.ln_q", [f"{b}.attn.norm_q"], suffixes=("weight",))
            add(f"{x}.attn.ln_k", [f"{b}.attn.norm_k"], suffixes=("weight",))
            add(f"{c}.attn.ln_q", [f"{b}.attn.norm_added_q"], suffixes=("weight",))
            add(f"{c}.attn.ln_k", [f"{b}.attn.norm_added_k"], suffixes=("weight",))
        add(f"{x}.attn.proj", [f"{b}.attn.to_out.0"])
        if not last:
            add(f"{c}.attn.proj", [f"{b}.attn.to_add_out"])
        if i in dual_layers:
            add(f"{x}.attn2.qkv", [f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"], "split")
            if qk_norm:
                add(f"{x}.attn2.ln_q", [f"{b}.attn2.norm_q"], suffixes=("weight",))
                add(f"{x}.attn2.ln_k", [f"{b}.attn2.norm_k"], suffixes=("weight",))
            add(f"{x}.attn2.proj", [f"{b}.attn2.to_out.0"])
        add(f"{x}.adaLN_modulation.1", [f"{b}.norm1.linear"])
        add(f"{c}.adaLN_modulation.1", [f"{b}.norm1_context.linear"], "swap" if last else "copy")
        add(f"{x}.mlp.fc1", [f"{b}.ff.net.0.proj"])
        add(f"{x}.mlp.fc2", [f"{b}.ff.net.2"])
        if not last:
            add(f"{c}.mlp.fc1", [f"{b}.ff_context.net.0.proj"])
            add(f"{c}.mlp.fc2", [f"{b}.ff_context.net.2"])
    add("final_layer.linear", ["proj_out"])
    add("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap")
    return table


def from_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAI single-file keys -> ours. With the `model.diffusion_model.` prefix present, keys outside
    it (VAE, text encoders bundled in the same file) are ignored."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        state_dict = {k[len(ORIGINAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    layers = block_indices(state_dict, "joint_blocks.")
    if not layers:
        raise ValueError("not an SD3 single-file checkpoint: no (model.diffusion_model.)joint_blocks.* keys")
    dual = set(block_indices([k for k in state_dict if ".x_block.attn2." in k], "joint_blocks."))
    table = _original_key_table(layers[-1] + 1, dual, qk_norm=any(".ln_q." in k for k in state_dict))
    return from_original_keys(state_dict, table, "SD3 single-file checkpoint")


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> SAI single-file keys (with the `model.diffusion_model.` prefix); inverse of from_original."""
    layers = block_indices(state_dict, "transformer_blocks.")
    if not layers:
        raise ValueError("not an SD3 transformer state dict: no transformer_blocks.* keys")
    dual = set(block_indices([k for k in state_dict if ".attn2." in k], "transformer_blocks."))
    table = _original_key_table(layers[-1] + 1, dual, qk_norm=any(".attn.norm_q." in k for k in state_dict))
    return to_original_keys(state_dict, table, "SD3 state dict", prefix=ORIGINAL_PREFIX)


# --- files ------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[SD3Args, dict[str, torch.Tensor]]:
    """(args, our state dict) from a diffusers directory or an SAI single-file checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SD3 checkpoint not found: {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"SD3 checkpoint {path}: a single file must be an SAI .safetensors checkpoint")
        try:
            state_dict = from_original(read_safetensors([path], device, "SD3 checkpoint"))
            args = infer_args(state_dict)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        check_state_dict(state_dict, args, source=f"SD3 single-file checkpoint {path}")
        return args, state_dict

    args, state_dict, directory = load_diffusers_dir(path, "SD3 transformer", SD3Args.from_diffusers_config, device)
    check_state_dict(state_dict, args, source=f"SD3 checkpoint {directory}")
    return args, state_dict


def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SD3Transformer:
    """Our model with the checkpoint's weights, built on meta so no memory goes to a throwaway init."""
    args, state_dict = load_checkpoint(path, device)
    return build_loaded(SD3Transformer, args, state_dict, dtype, device)


def save_diffusers(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: SD3Args,
    out_dir: str | Path,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Write a diffusers transformer directory (config.json + safetensors, sharded above
    `max_shard_size`) that `SD3Transformer2DModel.from_pretrained(out_dir)` loads."""
    state_dict = to_diffusers(dict(state_dict_of(model_or_state_dict)), args)
    return write_diffusers_dir(state_dict, args.to_diffusers_config(), out_dir, max_shard_size)
