"""FLUX checkpoints <-> our model: diffusers `transformer/` directories and BFL single files.

Our module names are diffusers', so the diffusers mapping is the identity; it is still checked key
by key and shape by shape so that a wrong checkpoint fails with the offending keys named. The BFL
single-file format (`flux1-dev.safetensors`, `flux1-kontext-dev.safetensors`; keys without prefix,
or under `model.diffusion_model.` in ComfyUI-style bundles) fuses q/k/v of the double blocks, fuses
q/k/v and the MLP input of the single blocks (`linear1`), and stores the final adaLN halves as
(shift, scale); one rename table drives both directions.
"""

from __future__ import annotations

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
from titan_flow.models.flux.args import FluxArgs
from titan_flow.models.flux.model import FluxTransformer

BUNDLE_PREFIX = "model.diffusion_model."
BFL_AXES_DIMS = {128: (16, 56, 56)}  # RoPE split per head width; BFL's checkpoints do not record it
MLP_RATIO = 4


def check_state_dict(state_dict: dict[str, torch.Tensor], args: FluxArgs, source: str = "state dict") -> None:
    """Raise naming every missing, unexpected and mis-shaped key against the model `args` builds."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in FluxTransformer(args).state_dict().items()}
    check_keys(state_dict, expected, f"{source} does not match the FLUX model of {args}")


def infer_args(state_dict: dict[str, torch.Tensor], axes_dims_rope: tuple[int, ...] | None = None) -> FluxArgs:
    """FluxArgs from a state dict in our (= diffusers) key format.

    Widths and depths are in the shapes; the head width is the qk-norm width. The RoPE split per
    axis is not stored: BFL's (16, 56, 56) for 128-wide heads, else `axes_dims_rope` must be given.
    """
    try:
        dim, in_channels = state_dict["x_embedder.weight"].shape
        joint_dim = state_dict["context_embedder.weight"].shape[1]
        pooled_dim = state_dict["time_text_embed.text_embedder.linear_1.weight"].shape[1]
        out_channels = state_dict["proj_out.weight"].shape[0]
        head_dim = state_dict["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a FLUX transformer state dict: key {e} is missing") from None
    if axes_dims_rope is None:
        if head_dim not in BFL_AXES_DIMS:
            raise ValueError(
                f"the checkpoint's heads are {head_dim} wide, and its RoPE split per axis is not stored (BFL's "
                f"(16, 56, 56) is for 128-wide heads); pass axes_dims_rope, or use a diffusers directory with a config.json"
            )
        axes_dims_rope = BFL_AXES_DIMS[head_dim]
    return FluxArgs(
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=len(block_indices(state_dict, "transformer_blocks.")),
        num_single_layers=len(block_indices(state_dict, "single_transformer_blocks.")),
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in state_dict,
        axes_dims_rope=tuple(axes_dims_rope),
    )


def from_diffusers(state_dict: dict[str, torch.Tensor], args: FluxArgs | None = None) -> dict[str, torch.Tensor]:
    """Diffusers keys -> ours (identity), validated against `args` or the layout the shapes imply."""
    if args is None:
        head = state_dict.get("transformer_blocks.0.attn.norm_q.weight")
        width = head.shape[0] if head is not None else 2
        args = infer_args(state_dict, BFL_AXES_DIMS.get(width, (2, 2, width - 4)))  # RoPE changes no shape
    check_state_dict(state_dict, args)
    return dict(state_dict)


def to_diffusers(state_dict: dict[str, torch.Tensor], args: FluxArgs | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers (identity), validated like `from_diffusers`."""
    return from_diffusers(state_dict, args)


# --- BFL single-file format -------------------------------------------------------------------


def _bfl_rules(num_layers: int, num_single_layers: int, guidance: bool, dim: int) -> list[KeyRule]:
    """The rules of every BFL key (diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, both ways)."""
    rules = []

    def add(original: str, ours: list[str], how: str = "copy", sizes=None, suffixes=("weight", "bias")):
        rules.extend(linear_rules(original, ours, how, sizes, suffixes))

    embed = "time_text_embed"
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    for original, ours in embedders + ([("guidance_in", "guidance_embedder")] if guidance else []):
        add(f"{original}.in_layer", [f"{embed}.{ours}.linear_1"])
        add(f"{original}.out_layer", [f"{embed}.{ours}.linear_2"])
    add("txt_in", ["context_embedder"])
    add("img_in", ["x_embedder"])
    for i in range(num_layers):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        add(f"{d}.img_mod.lin", [f"{b}.norm1.linear"])
        add(f"{d}.txt_mod.lin", [f"{b}.norm1_context.linear"])
        add(f"{d}.img_attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], "split")
        add(f"{d}.txt_attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], "split")
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            add(f"{d}.{stream}_attn.norm.query_norm", [f"{b}.attn.{q}"], suffixes=("scale",))
            add(f"{d}.{stream}_attn.norm.key_norm", [f"{b}.attn.{k}"], suffixes=("scale",))
        add(f"{d}.img_attn.proj", [f"{b}.attn.to_out.0"])
        add(f"{d}.txt_attn.proj", [f"{b}.attn.to_add_out"])
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            add(f"{d}.{stream}_mlp.0", [f"{b}.{ff}.net.0.proj"])
            add(f"{d}.{stream}_mlp.2", [f"{b}.{ff}.net.2"])
    for i in range(num_single_layers):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        add(f"{s}.modulation.lin", [f"{b}.norm.linear"])
        add(f"{s}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"], "split",
            sizes=(dim, dim, dim, MLP_RATIO * dim))
        add(f"{s}.norm.query_norm", [f"{b}.attn.norm_q"], suffixes=("scale",))
        add(f"{s}.norm.key_norm", [f"{b}.attn.norm_k"], suffixes=("scale",))
        add(f"{s}.linear2", [f"{b}.proj_out"])
    add("final_layer.linear", ["proj_out"])
    add("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap")
    # BFL names a norm's weight `scale`; ours is `weight`.
    return [KeyRule(r.original, tuple(o.replace(".scale", ".weight") for o in r.ours), r.how, r.sizes) for r in rules]


def from_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL single-file keys -> ours. With the `model.diffusion_model.` prefix present, keys outside it
    (VAE, text encoders bundled in the same file) are ignored."""
    if any(k.startswith(BUNDLE_PREFIX) for k in state_dict):
        state_dict = {k[len(BUNDLE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BUNDLE_PREFIX)}
    if "img_in.weight" not in state_dict or not block_indices(state_dict, "double_blocks."):
        raise ValueError("not a FLUX (BFL) single-file checkpoint: no img_in.weight or double_blocks.* keys")
    rules = _bfl_rules(
        len(block_indices(state_dict, "double_blocks.")),
        len(block_indices(state_dict, "single_blocks.")),
        guidance="guidance_in.in_layer.weight" in state_dict,
        dim=state_dict["img_in.weight"].shape[0],
    )
    return from_original_keys(state_dict, rules, "FLUX single-file checkpoint")


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> BFL single-file keys (no prefix, as `flux1-dev.safetensors`); inverse of from_original."""
    if "x_embedder.weight" not in state_dict:
        raise ValueError("not a FLUX transformer state dict: no x_embedder.weight")
    rules = _bfl_rules(
        len(block_indices(state_dict, "transformer_blocks.")),
        len(block_indices(state_dict, "single_transformer_blocks.")),
        guidance="time_text_embed.guidance_embedder.linear_1.weight" in state_dict,
        dim=state_dict["x_embedder.weight"].shape[0],
    )
    return to_original_keys(state_dict, rules, "FLUX state dict")


# --- files ------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", axes_dims_rope: tuple[int, ...] | None = None
) -> tuple[FluxArgs, dict[str, torch.Tensor]]:
    """(args, our state dict) from a diffusers directory (a pipeline root or its `transformer/`) or a BFL
    single-file checkpoint (`axes_dims_rope` only for single files whose heads are not 128 wide)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FLUX checkpoint not found: {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"FLUX checkpoint {path}: a single file must be a BFL .safetensors checkpoint")
        try:
            state_dict = from_original(read_safetensors([path], device, "FLUX checkpoint"))
            args = infer_args(state_dict, axes_dims_rope)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        check_state_dict(state_dict, args, source=f"FLUX single-file checkpoint {path}")
        return args, state_dict

    args, state_dict, directory = load_diffusers_dir(path, "FLUX transformer", FluxArgs.from_diffusers_config, device)
    check_state_dict(state_dict, args, source=f"FLUX checkpoint {directory}")
    return args, state_dict


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    axes_dims_rope: tuple[int, ...] | None = None,
) -> FluxTransformer:
    """Our model with the checkpoint's weights, built on meta so no memory goes to a throwaway init."""
    args, state_dict = load_checkpoint(path, device, axes_dims_rope)
    return build_loaded(FluxTransformer, args, state_dict, dtype, device)


def save_diffusers(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: FluxArgs,
    out_dir: str | Path,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Write a diffusers transformer directory (config.json + safetensors, sharded above
    `max_shard_size`) that `FluxTransformer2DModel.from_pretrained(out_dir)` loads."""
    state_dict = to_diffusers(dict(state_dict_of(model_or_state_dict)), args)
    return write_diffusers_dir(state_dict, args.to_diffusers_config(), out_dir, max_shard_size)
