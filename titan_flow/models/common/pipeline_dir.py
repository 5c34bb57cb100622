"""Checks of a local diffusers pipeline directory shared by the families' Policy loaders."""

from __future__ import annotations

import json
from pathlib import Path

from titan_flow.models.common.schedules import NUM_TRAIN_TIMESTEPS


def check_layout(root: Path, layout: dict[str, tuple[str, list[tuple[str, ...]]]], pipeline: str, example: str) -> None:
    """Raise FileNotFoundError naming the first subfolder of `layout` that lacks its files.

    `layout` maps a subfolder to (what it holds, alternatives), an alternative being a tuple of files
    that must all exist; `pipeline` is the diffusers class and `example` a published snapshot, for
    the message.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"model.pretrained_path: {str(root)!r} is not a directory; give a local diffusers {pipeline} "
            f"directory (e.g. a snapshot of {example}), or '' for the tiny random one"
        )
    for sub, (what, alternatives) in layout.items():
        if not any(all((root / sub / name).is_file() for name in files) for files in alternatives):
            expected = " or ".join("+".join(files) for files in alternatives)
            raise FileNotFoundError(
                f"model.pretrained_path: {root / sub} must hold the {what} ({expected}), but it does not; "
                f"is this a diffusers {pipeline} directory?"
            )


def read_scheduler_config(root: Path, unsupported: tuple[str, ...], family: str, supported: str) -> dict:
    """scheduler/scheduler_config.json, checked to set none of the `unsupported` options (the family's
    `sigmas()` would not reproduce them; `supported` says what it does reproduce) and to count the
    1000 training timesteps every family's time embedding assumes."""
    path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    enabled = [flag for flag in unsupported if config.get(flag)]
    if enabled:
        raise ValueError(f"{path}: {enabled} are not supported for {family}; only {supported} is")
    if config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"{path}: num_train_timesteps must be {NUM_TRAIN_TIMESTEPS}, got {config['num_train_timesteps']}"
        )
    return config
