"""What every checkpoint loader shares: the key check (missing, unexpected, mis-shaped keys), the
rename tables of the original single-file formats, and reading/writing diffusers `transformer/`
directories (config.json + safetensors, sharded with an index above a size)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


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


def block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted block numbers i of the keys `<prefix><i>.<...>`."""
    return sorted({int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


# --- original single-file formats: one rename table drives both directions -------------------------


@dataclass(frozen=True)
class KeyRule:
    """One tensor of an original checkpoint and the tensor(s) of ours it holds.

    how = "copy": the same tensor; "swap": the two halves along dim 0 exchanged (the original
    continuous adaLN stores (shift, scale), ours (scale, shift)); "split": the original is ours
    concatenated along dim 0 (fused q/k/v), in `sizes` rows each (None = equal parts).
    """

    original: str
    ours: tuple[str, ...]
    how: str = "copy"
    sizes: tuple[int, ...] | None = None


def linear_rules(original: str, ours: list[str], how: str = "copy", sizes=None, suffixes=("weight", "bias")):
    """The rules of a layer's weight and bias (or of the given parameter `suffixes`)."""
    return [KeyRule(f"{original}.{s}", tuple(f"{o}.{s}" for o in ours), how, sizes) for s in suffixes]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _raise_on_leftovers(source: str, missing: list[str], unexpected: list[str]) -> None:
    problems = [
        f"{n}: {listing(sorted(k))}" for n, k in (("missing keys", missing), ("unexpected keys", unexpected)) if k
    ]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def from_original_keys(state_dict: Mapping[str, torch.Tensor], rules: list[KeyRule], source: str) -> dict:
    """Original keys -> ours by `rules`; every original key must be used and every rule's key present."""
    out, missing = {}, []
    for rule in rules:
        if rule.original not in state_dict:
            missing.append(rule.original)
            continue
        t = state_dict[rule.original]
        if rule.how == "split":
            parts = t.split(list(rule.sizes), dim=0) if rule.sizes else t.chunk(len(rule.ours), dim=0)
        else:
            parts = (_swap_halves(t) if rule.how == "swap" else t,)
        out.update(zip(rule.ours, parts))
    _raise_on_leftovers(source, missing, sorted(set(state_dict) - {r.original for r in rules}))
    return out


def to_original_keys(state_dict: Mapping[str, torch.Tensor], rules: list[KeyRule], source: str,
                     prefix: str = "") -> dict:
    """Ours -> original keys (with `prefix`); the inverse of `from_original_keys`."""
    out, missing = {}, []
    for rule in rules:
        if any(k not in state_dict for k in rule.ours):
            missing.extend(k for k in rule.ours if k not in state_dict)
            continue
        parts = [state_dict[k] for k in rule.ours]
        if rule.how == "split":
            t = torch.cat(parts, dim=0)
        else:
            t = _swap_halves(parts[0]) if rule.how == "swap" else parts[0]
        out[prefix + rule.original] = t
    _raise_on_leftovers(source, missing, sorted(set(state_dict) - {k for r in rules for k in r.ours}))
    return out


# --- diffusers configs and models ----------------------------------------------------------------------


def diffusers_config_kwargs(args_cls: type, config: dict, class_name: str, family: str) -> dict:
    """The fields of `args_cls` in a diffusers transformer config.json dict; metadata keys (leading `_`)
    are ignored. An unknown non-metadata key raises: it would be an architecture option the port does
    not implement, and silently dropping it could build a different network."""
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"{family} config: _class_name is {found!r}, expected {class_name!r}")
    names = {f.name for f in fields(args_cls)}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
    if unknown:
        raise ValueError(f"{family} config: unsupported keys {unknown}; this port implements only {sorted(names)}")
    return {k: v for k, v in config.items() if k in names}


def build_loaded(model_cls: type, args, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str) -> nn.Module:
    """`model_cls(args)` holding `state_dict`, built on meta so no memory goes to a throwaway init."""
    with torch.device("meta"):
        model = model_cls(args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def state_dict_of(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    return model_or_state_dict


# --- files -----------------------------------------------------------------------------------------


def read_safetensors(files: list[Path], device: torch.device | str, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of the files; on the CPU they stay memory-mapped until a rank copies its shard."""
    tensors = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{what} shard {f} is listed in the index but does not exist")
        with safe_open(str(f), framework="pt", device=str(device)) as reader:
            for key in reader.keys():
                tensors[key] = reader.get_tensor(key)
    return tensors


def transformer_dir(path: Path, what: str) -> Path:
    """The diffusers transformer directory: `path` itself, or `path/transformer` for a pipeline root."""
    for candidate in (path, path / "transformer"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {path} (nor in {path / 'transformer'}): expected a diffusers {what} "
        "directory, a diffusers pipeline directory, or a single-file .safetensors checkpoint"
    )


def load_diffusers_dir(path: Path, what: str, args_from_config: Callable[[dict], object],
                       device: torch.device | str = "cpu") -> tuple[object, dict[str, torch.Tensor], Path]:
    """(args, diffusers-format state dict, transformer directory) of a diffusers directory."""
    directory = transformer_dir(path, what)
    try:
        args = args_from_config(json.loads((directory / CONFIG_NAME).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None
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
    return args, read_safetensors(files, device, f"{what} checkpoint"), directory


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: use bytes (int) or a string like '5GB' or '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def write_diffusers_dir(state_dict: Mapping[str, torch.Tensor], config: dict, out_dir: str | Path,
                        max_shard_size: int | str = "10GB") -> Path:
    """config.json + safetensors (sharded above `max_shard_size`, with diffusers' index) in `out_dir`."""
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
