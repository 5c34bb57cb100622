"""The K-repeat distributed sampler: every prompt drawn in a round appears exactly k times over all ranks.

Contract of the reference's DistributedKRepeatSampler (flow_grpo_algorithm.md section 10.2): round
`counter` seeds a generator with seed + counter, picks m = W*B/k distinct prompts, repeats each k
times, shuffles, and rank r takes the r-th chunk of B. All ranks agree with no communication, and
the position is one integer, so resuming is exact.
"""

from __future__ import annotations

import torch


class KRepeatSampler:
    def __init__(self, dataset_size: int, batch_size: int, k: int, world_size: int, rank: int, seed: int):
        total = batch_size * world_size
        if total % k:
            raise ValueError(
                f"sampling.batch_size ({batch_size}) x world size ({world_size}) = {total} must be a multiple "
                f"of sampling.num_image_per_prompt ({k}) so every group is complete"
            )
        self.num_prompts = total // k
        if self.num_prompts > dataset_size:
            raise ValueError(
                f"each round needs {self.num_prompts} distinct prompts but the dataset has only {dataset_size}"
            )
        self.dataset_size, self.batch_size, self.k = dataset_size, batch_size, k
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.counter = 0

    def indices(self, counter: int) -> list[int]:
        """This rank's prompt indices for round `counter`."""
        g = torch.Generator().manual_seed(self.seed + counter)
        chosen = torch.randperm(self.dataset_size, generator=g)[: self.num_prompts]
        repeated = chosen.repeat_interleave(self.k)
        shuffled = repeated[torch.randperm(len(repeated), generator=g)]
        start = self.rank * self.batch_size
        return shuffled[start : start + self.batch_size].tolist()

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        out = self.indices(self.counter)
        self.counter += 1
        return out

    def state_dict(self) -> dict:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])
