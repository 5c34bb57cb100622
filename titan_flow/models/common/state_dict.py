"""What every checkpoint loader shares: the key check (missing, unexpected, mis-shaped keys) and the
diffusers model-directory format (config.json + safetensors, sharded with an index)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


def listing(keys: Iterable[str], limit: int = 20) -> str:
    """The first `limit` keys, comma-separated, and how many there are in all."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_keys(state_dict: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple], what: str) -> None:
    """Raise `ValueError("<what>: missing keys: ...; unexpected keys: ...; wrong shapes: ...")` on any mismatch."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(shape)})"
        for k, shape in sorted(expected_shapes.items())
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    problems = [
        f"{name}: {listing(keys)}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


# --- diffusers model directories: config.json + (sharded) safetensors --------------------------

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def diffusers_config_kwargs(config: Mapping, class_name: str, fields: Iterable[str], family: str) -> dict:
    """The constructor keywords in a diffusers config.json dict; metadata keys (leading `_`) are ignored.

    A different `_class_name` or an unknown non-metadata key raises: the key would be an architecture
    option the port does not implement, and silently dropping it could build a different network.
    """
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"{family} config: _class_name is {found!r}, expected {class_name!r}")
    names = set(fields)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
    if unknown:
        raise ValueError(f"{family} config: unsupported keys {unknown}; this port implements only {sorted(names)}")
    return {k: v for k, v in config.items() if k in names}


def read_safetensors(files: Iterable[Path], device: torch.device | str, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of the files; on the CPU, safetensors' memory maps (a rank that copies only its
    shard reads only that shard's bytes)."""
    from safetensors import safe_open

    tensors = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{what} shard {f} is listed in the index but does not exist")
        with safe_open(str(f), framework="pt", device=str(device)) as reader:
            for key in reader.keys():
                tensors[key] = reader.get_tensor(key)
    return tensors


def find_model_dir(path: Path, hint: str) -> Path:
    """The diffusers model directory: `path` itself, or `path/transformer` for a pipeline root."""
    for candidate in (path, path / "transformer"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {path / 'transformer'}): expected {hint}")


def read_diffusers_weights(directory: Path, device: torch.device | str, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a diffusers model directory: one safetensors file, or shards and their index."""
    if (directory / INDEX_NAME).is_file():
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (or sharded {INDEX_NAME}) in {directory}; it holds: "
            f"{sorted(p.name for p in directory.iterdir())}"
        )
    return read_safetensors(files, device, what)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: use bytes (int) or a string like '5GB' or '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def write_diffusers_weights(
    state_dict: Mapping[str, torch.Tensor], config: dict, out_dir: str | Path, max_shard_size: int | str = "10GB"
) -> Path:
    """Write config.json and the weights (sharded above `max_shard_size`, with diffusers' index) as
    diffusers' `save_pretrained` lays them out."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, t in state_dict.items():
        size = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += size

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("diffusion_pytorch_model*.safetensors*"):  # an older save's shards or index
        stale.unlink()
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, keys in zip(names, shards):
        # clone: views (e.g. q/k/v chunks of a fused tensor) share storage, which safetensors refuses.
        tensors = {k: state_dict[k].detach().to("cpu", copy=True).contiguous() for k in keys}
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: n for n, keys in zip(names, shards) for k in keys},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def load_diffusers_dir(path: Path, args_from_config, check, family: str, hint: str, device: torch.device | str):
    """(args, state dict, directory) of a diffusers model directory (or a pipeline root holding
    `transformer/`): args from its config.json, the weights memory-mapped on the CPU and checked
    against the model the args build (`check(state_dict, args, source=...)`)."""
    directory = find_model_dir(path, hint)
    try:
        args = args_from_config(json.loads((directory / CONFIG_NAME).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None
    state_dict = read_diffusers_weights(directory, device, f"{family} checkpoint")
    check(state_dict, args, source=f"{family} checkpoint {directory}")
    return args, state_dict, directory


def build_with_weights(model_cls, args, state_dict, dtype: torch.dtype, device: torch.device | str):
    """`model_cls(args)` holding `state_dict`, built on meta so no memory goes to a throwaway init."""
    with torch.device("meta"):
        model = model_cls(args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)
