"""Qwen-Image checkpoints <-> our model: the diffusers `transformer/` format the HF repos ship.

Our module names are diffusers', so the mapping is the identity; it is still checked key by key and
shape by shape so that a wrong checkpoint fails with the offending keys named. Qwen-Image publishes
only this format (1933 keys, 20.43 B parameters; the RoPE tables are not in it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from titan_flow.models.common.state_dict import (
    build_loaded,
    check_keys,
    load_diffusers_dir,
    state_dict_of,
    write_diffusers_dir,
)
from titan_flow.models.qwen_image.args import QwenImageArgs
from titan_flow.models.qwen_image.model import QwenImageTransformer


def _rope_split(head_dim: int) -> tuple[int, int, int]:
    """An MSRoPE split of the head for shape checks (the split changes no shape): the published
    (16, 56, 56) at head 128, and the same proportions, rounded to even, otherwise."""
    frame = 2 * max(1, head_dim // 16)
    rows = (head_dim - frame) // 4 * 2
    return frame, rows, head_dim - frame - rows


def infer_args(state_dict: dict[str, torch.Tensor]) -> QwenImageArgs:
    """QwenImageArgs from the shapes of a state dict in our (= diffusers) key format; the patch size
    is the published 2 (it is not in the shapes)."""
    try:
        dim, in_channels = state_dict["img_in.weight"].shape
        joint_dim = state_dict["txt_in.weight"].shape[1]
        head_dim = state_dict["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        out_features = state_dict["proj_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a Qwen-Image transformer state dict: key {e} is missing") from None
    layers = {int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")}
    patch = QwenImageArgs.patch_size
    if dim % head_dim:
        raise ValueError(f"not a Qwen-Image transformer state dict: width {dim} is not a multiple of the head {head_dim}")
    return QwenImageArgs(
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_features // patch**2,
        num_layers=max(layers) + 1,
        attention_head_dim=head_dim,
        num_attention_heads=dim // head_dim,
        joint_attention_dim=joint_dim,
        axes_dims_rope=_rope_split(head_dim),
    )


def check_state_dict(state_dict: dict[str, torch.Tensor], args: QwenImageArgs, source: str = "state dict") -> None:
    """Raise naming every missing, unexpected and mis-shaped key against the model `args` builds."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in QwenImageTransformer(args).state_dict().items()}
    check_keys(state_dict, expected, f"{source} does not match the Qwen-Image model of {args}")


def from_diffusers(state_dict: dict[str, torch.Tensor], args: QwenImageArgs | None = None) -> dict[str, torch.Tensor]:
    """Diffusers keys -> ours (identity), validated against `args` or the layout the shapes imply."""
    check_state_dict(state_dict, args or infer_args(state_dict))
    return dict(state_dict)


def to_diffusers(state_dict: dict[str, torch.Tensor], args: QwenImageArgs | None = None) -> dict[str, torch.Tensor]:
    """Our keys -> diffusers (identity), validated like `from_diffusers`."""
    return from_diffusers(state_dict, args)


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[QwenImageArgs, dict[str, torch.Tensor]]:
    """(args, our state dict) from a diffusers transformer directory or a pipeline directory; on the
    CPU the tensors are memory-mapped, so a rank that copies only its shard reads only those bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Qwen-Image checkpoint not found: {path} does not exist")
    args, state_dict, directory = load_diffusers_dir(
        path, "QwenImageTransformer2DModel", QwenImageArgs.from_diffusers_config, device, single_file=False
    )
    check_state_dict(state_dict, args, source=f"Qwen-Image checkpoint {directory}")
    return args, state_dict


def from_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> QwenImageTransformer:
    """Our model with the checkpoint's weights, built on meta so no memory goes to a throwaway init."""
    args, state_dict = load_checkpoint(path, device)
    return build_loaded(QwenImageTransformer, args, state_dict, dtype, device)


def save_diffusers(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: QwenImageArgs,
    out_dir: str | Path,
    max_shard_size: int | str = "10GB",
) -> Path:
    """Write a diffusers transformer directory that `QwenImageTransformer2DModel.from_pretrained` loads."""
    state_dict = to_diffusers(state_dict_of(model_or_state_dict), args)
    return write_diffusers_dir(state_dict, args.to_diffusers_config(), out_dir, max_shard_size)
