"""Checks of a local diffusers pipeline directory before any component is loaded from it."""

from __future__ import annotations

import json
from pathlib import Path

# subfolder -> (what it holds, alternatives: tuples of files that must all exist)
Layout = dict[str, tuple[str, list[tuple[str, ...]]]]


def check_layout(root: Path, layout: Layout, pipeline_class: str, example: str) -> None:
    """Raise FileNotFoundError naming the first subfolder that lacks what `layout` says it holds."""
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


def pipeline_class_name(root: Path) -> str | None:
    """`_class_name` of the directory's model_index.json (None when there is none)."""
    index = root / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def scheduler_config(root: Path, unsupported: tuple[str, ...], family: str) -> tuple[Path, dict]:
    """(path, dict) of scheduler/scheduler_config.json; raises if a flag in `unsupported` is set."""
    path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    enabled = [flag for flag in unsupported if config.get(flag)]
    if enabled:
        raise ValueError(f"{path}: {enabled} are not supported for {family}")
    return path, config
