"""Prompt datasets: one prompt per line (`{split}.txt`), or GenEval-style jsonl (`{split}_metadata.jsonl`).

Items are (prompt, metadata) pairs; metadata is the whole jsonl record (the GenEval reward server
scores against it) or {} for text prompts. The datasets of the reference repository
(flow_grpo/dataset/<name>/) load as they are: point `data.path` at the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("auto", "text", "geneval")

# The embedded default job's prompts: short, varied, no download needed.
DEBUG_PROMPTS = [
    "a red cube on a table", "a photo of a cat", "a blue car in the snow", "two apples and a banana",
    "a lighthouse at sunset", "a bowl of soup", "a green bird on a branch", "a city street at night",
    "a wooden chair", "a mountain lake", "a sign that says \"hello\"", "a yellow umbrella in the rain",
    "a plate of pasta", "a black dog running", "an old clock tower", "a field of sunflowers",
]


class PromptDataset:
    def __init__(self, prompts: list[str], metadata: list[dict] | None = None, source: str = "built-in"):
        if not prompts:
            raise ValueError(f"{source}: no prompts found")
        self.prompts = prompts
        self.metadata = metadata if metadata is not None else [{} for _ in prompts]
        self.source = source

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[str, dict]:
        return self.prompts[i], self.metadata[i]


def read_text_prompts(path: Path) -> PromptDataset:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return PromptDataset(prompts, source=str(path))


def read_geneval_prompts(path: Path) -> PromptDataset:
    prompts, metadata = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path}:{n}: each line must be a JSON object with a string "prompt" field')
        prompts.append(record["prompt"])
        metadata.append(record)
    return PromptDataset(prompts, metadata, source=str(path))


def load_prompt_dataset(path: str, split: str, fmt: str = "auto") -> PromptDataset:
    """`path` = folder holding `{split}.txt` or `{split}_metadata.jsonl`; empty = the built-in debug prompts."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format: {fmt!r} is not one of {FORMATS}")
    if not path:
        return PromptDataset(list(DEBUG_PROMPTS))
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path: {folder} is not a directory")
    candidates = {"text": folder / f"{split}.txt", "geneval": folder / f"{split}_metadata.jsonl"}
    if fmt == "auto":
        found = [f for f, p in candidates.items() if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"data.path: {folder} has neither {split}.txt nor {split}_metadata.jsonl (split {split!r})"
            )
        fmt = found[-1]  # a folder with both is a GenEval set; its jsonl carries the metadata
    file = candidates[fmt]
    if not file.is_file():
        raise FileNotFoundError(f"data.path: {file} does not exist (data.format = {fmt!r}, split {split!r})")
    return read_text_prompts(file) if fmt == "text" else read_geneval_prompts(file)
