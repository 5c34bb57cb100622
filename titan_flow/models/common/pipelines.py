"""What the Policy pipelines of the diffusers families share: checking a pipeline directory, the
scheduler config, drawing initial noise, and seeding the tiny random components."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from titan_flow.models.common.schedules import NUM_TRAIN_TIMESTEPS

T = TypeVar("T")
# Subfolder -> (what it holds, alternatives: tuples of files that must all exist).
Layout = dict[str, tuple[str, list[tuple[str, ...]]]]


def check_pipeline_dir(root: Path, layout: Layout, pipeline_class: str, example: str) -> None:
    """Raise FileNotFoundError naming the first subfolder of a diffusers pipeline directory that lacks its files."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"model.pretrained_path: {str(root)!r} is not a directory; give a local diffusers {pipeline_class} "
            f"directory (e.g. a snapshot of {example}), or '' for the tiny random one"
        )
    for sub, (what, alternatives) in layout.items():
        if not any(all((root / sub / name).is_file() for name in files) for files in alternatives):
            expected = " or ".join("+".join(files) for files in alternatives)
            raise FileNotFoundError(
                f"model.pretrained_path: {root / sub} must hold the {what} ({expected}), but it does not; "
                f"is this a diffusers {pipeline_class} directory?"
            )


def check_scheduler_config(config: dict, unsupported: Sequence[str], source: str, family: str) -> None:
    """The options of a FlowMatchEulerDiscreteScheduler config that the family's `sigmas()` does not reproduce."""
    enabled = [flag for flag in unsupported if config.get(flag)]
    if enabled:
        raise ValueError(f"{source}: {enabled} are not supported for {family}")
    if config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"{source}: num_train_timesteps must be {NUM_TRAIN_TIMESTEPS}, got {config['num_train_timesteps']}"
        )


def gaussian_noise(
    n: int,
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """N(0, I) of shape (n, *shape), drawn on the generator's device as diffusers' randn_tensor draws it, then
    moved to `device`; a list of generators draws sample i from generator i alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"initial_noise: got {len(generator)} generators for {n} samples; pass one per sample")
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
    else:
        noise = torch.randn((n, *shape), generator=generator, device=generator.device if generator else device)
    return noise.to(device)


def seeded(seed: int, build: Callable[[], T]) -> T:
    """`build()` under torch's global RNG seeded with `seed`, restoring the RNG afterwards (random init of a
    tiny component that does not depend on what ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
