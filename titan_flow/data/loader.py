"""The training data loader: torchdata's StatefulDataLoader over a dataset of `Record`s.

Batches come from a batch sampler (the K-repeat sampler for rollouts, or any sampler with
state_dict/load_state_dict), items are read in worker processes when the dataset has images to
decode, and `state_dict()` is the position of the last batch handed out (not of the batches the
workers have prefetched), so a checkpoint resumes on exactly the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from titan_flow.data.prompts import Record


@dataclass
class RecordBatch:
    prompts: list[str]
    metadata: list[dict]
    images: list[torch.Tensor] | None  # float (3, H, W) in [0, 1], each at its file's size; None: text only
    keys: list[str]  # group keys (rl/advantage.py groups images by these)


def collate_records(records: list[Record]) -> RecordBatch:
    images = [r.image for r in records]
    return RecordBatch(
        prompts=[r.prompt for r in records],
        metadata=[r.metadata for r in records],
        images=None if all(im is None for im in images) else images,
        keys=[r.key for r in records],
    )


def build_loader(dataset, batch_sampler, num_workers: int, seed: int) -> StatefulDataLoader:
    """Workers only where there is something to load: a text-only dataset is read in the main process."""
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
    workers = num_workers if getattr(dataset, "has_images", False) else 0
    return StatefulDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate_records,
        generator=torch.Generator().manual_seed(seed),  # worker seeds identical on every run
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )
