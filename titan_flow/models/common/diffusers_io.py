"""Reading and writing diffusers model directories (config.json + safetensors, sharded or not).

Every diffusers-format family (SD3, Wan, ...) loads its `transformer/` and exports it through these,
so the sharded index, memory-mapped reads and shard sizes are handled once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def read_safetensors(files: list[Path], device: torch.device | str, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of the files; on the CPU these are safetensors' memory maps (nothing copied yet)."""
    tensors = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{what} shard {f} is listed in the index but does not exist")
        with safe_open(str(f), framework="pt", device=str(device)) as reader:
            for key in reader.keys():
                tensors[key] = reader.get_tensor(key)
    return tensors


def transformer_dir(path: Path, expected: str) -> Path:
    """The diffusers model directory: `path` itself, or `path/transformer` for a pipeline root;
    `expected` says what the caller accepts, for the error."""
    for candidate in (path, path / "transformer"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {path / 'transformer'}): expected {expected}")


def read_config(directory: Path) -> dict:
    return json.loads((directory / CONFIG_NAME).read_text())


def read_weights(directory: Path, device: torch.device | str, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of a diffusers directory: the sharded index when there is one, else the single file."""
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


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: use bytes (int) or a string like '5GB' or '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def write_diffusers_dir(
    state_dict: dict[str, torch.Tensor], config: dict, out_dir: str | Path, max_shard_size: int | str = "10GB"
) -> Path:
    """Write config.json and the safetensors (sharded above `max_shard_size`, with diffusers' index), as
    `ModelMixin.save_pretrained` lays them out, so the family's diffusers class loads the directory."""
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
