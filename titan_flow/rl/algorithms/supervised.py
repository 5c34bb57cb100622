"""Offline flow matching on the (prompt, image) pairs of a dataset: pretraining, SFT before RL, or
fine-tuning on curated images (`rl.algorithm = "supervised"`).

No rollouts and no rewards in training. A training batch is the data loader's next batch of
`sampling.batch_size` records per rank (data.path's `{split}_metadata.jsonl`, each naming its image
in `data.image_key`, read by the loader's workers; the K-repeat sampler with one image per prompt
draws them, distinct within a batch, and its position is in the checkpoint, so a resumed run reads
the same batches). The family's pipeline turns the images into latents (`Policy.to_latents`: the
VAE's encoder, or the pixels themselves for the shapes flavor) and the loss is Flow-SFT's with every
weight 1 (rl/algorithms/sft.py): a logit-normal noise level per sample, the velocity regressed onto
eps - x_0 without CFG, plus rl.beta times the squared velocity difference to the initial model.

With probability `rl.caption_dropout` a caption is replaced by `sampling.negative_prompt` (the
empty prompt by default), so the model also learns the unconditional velocity that CFG samples with.
An epoch is `sampling.num_batches_per_epoch` batches with an optimizer step every
`training.gradient_accumulation_steps`; eval, EMA, checkpoints and TensorBoard are the trainer's.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from titan_flow.rl.algorithms.base import EpochResult
from titan_flow.rl.algorithms.sft import FlowSFT


class SupervisedFlowMatching(FlowSFT):
    def rollout_policy(self):
        return nullcontext(self.model)  # nothing is sampled; eval uses the model (or its EMA) directly

    def drop_captions(self, prompts: list[str]) -> list[str]:
        """Each prompt replaced by the negative prompt with probability rl.caption_dropout (this rank's seeded
        noise stream, so a resumed run drops the same captions)."""
        p = self.cfg.rl.caption_dropout
        if p <= 0:
            return list(prompts)
        drop = torch.rand(len(prompts), generator=self.noise_generator, device=self.noise_generator.device) < p
        return [self.cfg.sampling.negative_prompt if d else prompt for prompt, d in zip(prompts, drop.tolist())]

    def load_batch(self):
        """(prompts as trained, conditioning, target latents, target images) of the loader's next batch."""
        data = self.next_batch()
        if data.images is None:
            raise ValueError(
                f"rl.algorithm = 'supervised' trains on images, but the records of {self.cfg.data.path!r} name none: "
                f"each line of its {self.cfg.data.train_split}_metadata.jsonl needs an image path in the "
                f"{self.cfg.data.image_key!r} field (data.image_key)"
            )
        sizes = sorted({tuple(im.shape) for im in data.images})
        expected = (3, self.cfg.model.resolution, self.cfg.model.resolution)
        if sizes != [expected]:
            raise ValueError(
                f"rl.algorithm = 'supervised': the dataset's images are {sizes} (C, H, W) but the model trains at "
                f"model.resolution = {self.cfg.model.resolution}; resize the dataset to {expected[1]} x {expected[2]}"
            )
        images = torch.stack(data.images)
        prompts = self.drop_captions(data.prompts)
        with torch.no_grad():
            cond = self.policy.encode(prompts, model=self.model)
            latents = self.policy.to_latents(images)
        return prompts, cond, latents, images

    def run_epoch(self, epoch: int) -> EpochResult:
        t0 = time.perf_counter()
        ga = self.cfg.training.gradient_accumulation_steps
        batches = [self.load_batch() for _ in range(self.cfg.sampling.num_batches_per_epoch)]
        t_data = time.perf_counter() - t0

        def train_batch(batch, stats, bar):
            _, cond, latents, _ = batch
            loss, record = self.flow_matching_loss(latents, cond, torch.ones(len(latents), device=latents.device))
            (loss / ga).backward()
            stats.add_scalars(record)
            bar.update(1)

        t1 = time.perf_counter()
        scalars = self.accumulate(epoch, batches, len(batches), train_batch)
        n_images = sum(len(b[0]) for b in batches) * self.dims.world_size
        scalars["perf/images_per_s"] = n_images / (time.perf_counter() - t0)
        scalars["perf/data_s"] = t_data
        scalars["perf/train_s"] = time.perf_counter() - t1
        scalars["perf/step_s"] = time.perf_counter() - t0
        n_img = self.cfg.metrics.num_log_images
        prompts = [p for b in batches for p in b[0]][:n_img]
        return EpochResult(scalars, torch.cat([b[3] for b in batches])[:n_img].float().cpu(),
                           [f"{p or '(dropped caption)'} | data" for p in prompts], self.summary(scalars))

    def summary(self, sc: dict[str, float]) -> str:
        kl = f"  kl {sc['loss/kl']:.3g}" if "loss/kl" in sc else ""
        return f"fm loss {sc['loss/fm']:.4g}{kl}  grad {sc['optim/grad_norm']:.3g}  {sc['perf/images_per_s']:.1f} img/s"
