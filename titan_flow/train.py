"""Entry point: `torchrun ... -m titan_flow.train --job.config_file train_configs/debug_cpu.toml`.

Builds every component from the JobConfig and runs the RL loop. With no arguments at all it runs the
shapes demo (train_configs/shapes_demo.toml on the package's shipped shapes model and prompts); any
argument starts from the config defaults instead, which are the tiny debug job (debug_cpu.toml).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.stateful import Stateful

import kernels

from titan_flow.checkpoint.manager import CheckpointManager, ModelState, OptimizerState
from titan_flow.checkpoint.pretrained import load_full_into_shards
from titan_flow.config import JobConfig, build_job_config, to_dict
from titan_flow.data.loader import build_loader
from titan_flow.data.prompts import load_prompt_dataset
from titan_flow.data.sampler import KRepeatSampler
from titan_flow.distributed.parallelize import DTYPES, shard_frozen_encoders
from titan_flow.distributed.utils import ParallelDims, destroy_distributed, init_distributed
from titan_flow.metrics import MetricsLogger, setup_logging
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora, initial_adapter_state, mark_only_lora_trainable
from titan_flow.rewards import MultiReward
from titan_flow.rl.algorithms import (
    OnlineAlgorithm, build_algorithm, is_online, needs_frozen_copy, needs_lora_reference_slot,
)
from titan_flow.rl.ema import EMA
from titan_flow.rl.evaluate import evaluate

logger = logging.getLogger("titan_flow")


def run_dir(cfg: JobConfig) -> Path:
    return Path(cfg.job.output_dir) / cfg.job.run_name


def build_policy(cfg: JobConfig, device: torch.device):
    spec = get_model_spec(cfg.model.name)
    return spec.pipeline_cls.load(
        cfg.model.pretrained_path,
        device=device,
        encoder_dtype=DTYPES[cfg.model.encoder_dtype],
        vae_dtype=DTYPES[cfg.model.vae_dtype],
        resolution=cfg.model.resolution,
        max_sequence_length=cfg.model.max_sequence_length,
        negative_prompt=cfg.sampling.negative_prompt,
        seed=cfg.job.seed,
        **spec.pipeline_options(cfg),
    )


def build_model(cfg: JobConfig, dims: ParallelDims, trainable: bool, load_weights: bool = True) -> torch.nn.Module:
    """The backbone, sharded with FSDP2 (left out where it would shard and cast nothing: fsdp_is_a_no_op):
    pretrained weights, or a random init identical on every rank.

    Pretrained weights: the model (LoRA adapters included) is built and sharded on the meta device,
    then each rank reads only its shards of the weights and of the adapters' initial values. With
    `load_weights=False` the model is only built (meta, then empty memory) for a checkpoint to fill.
    """
    spec = get_model_spec(cfg.model.name)
    dtype = DTYPES[cfg.model.dtype]
    path = cfg.model.pretrained_path
    lora = trainable and cfg.lora.enable
    on_meta = not load_weights or bool(path)
    if on_meta:
        args, weights = spec.load_checkpoint(path) if path else (spec.args(cfg.model.flavor), None)
        with torch.device("meta"):
            model = spec.model_cls(args).to(dtype)
    else:
        torch.manual_seed(cfg.job.seed)  # the same random init on every rank
        model = spec.build(cfg.model.flavor, device=dims.device, dtype=dtype)
    model.requires_grad_(trainable)
    if lora:  # before parallelize: AC, compile and FSDP2 then wrap the adapters with their layers
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, seed=cfg.job.seed,
                   with_reference=needs_lora_reference_slot(cfg))
    model = spec.parallelize(model, dims, cfg, trainable=trainable)
    if lora:  # a family's plan may pick its own trainable set (Bagel: the gen expert); LoRA trains adapters only
        mark_only_lora_trainable(model)
    if on_meta:
        model.to_empty(device="cpu" if cfg.parallelism.fsdp_cpu_offload else dims.device)
        if load_weights:
            if lora:
                weights = {**weights, **initial_adapter_state(model, cfg.job.seed)}
            load_full_into_shards(model, weights, source=f"model.pretrained_path {path}")
    return model


class TrainState(Stateful):
    """What is identical on every rank besides the weights: epoch, the data loader's position, the
    algorithm's counters."""

    def __init__(self, algo: OnlineAlgorithm, loader):
        self.algo, self.loader = algo, loader
        self.epoch = 0

    def state_dict(self):
        return {"epoch": self.epoch, "algorithm": self.algo.state_dict(), "data": self.loader.state_dict()}

    def load_state_dict(self, sd):
        self.epoch = sd["epoch"]
        self.algo.load_state_dict(sd["algorithm"])
        self.loader.load_state_dict(sd["data"])


def build_dataset(cfg: JobConfig, split: str):
    return load_prompt_dataset(cfg.data.path, split, cfg.data.format, cfg.data.image_key)


SHAPES_ASSETS = Path(__file__).resolve().parent / "assets" / "shapes"
DEMO_JOB = Path(__file__).resolve().parents[1] / "train_configs" / "shapes_demo.toml"


def demo_job_args() -> list[str]:
    """The no-argument job: the shapes demo, its asset paths taken from the package so it runs from any folder."""
    if not DEMO_JOB.is_file():
        raise SystemExit(f"titan_flow.train without arguments runs the shapes demo, but {DEMO_JOB} is missing: install "
                         "titan_flow from its repository (pip install -e .) or pass --job.config_file")
    return ["--job.config_file", str(DEMO_JOB), "--model.pretrained_path", str(SHAPES_ASSETS / "model"),
            "--data.path", str(SHAPES_ASSETS / "prompts")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = build_job_config(argv or demo_job_args())
    kernels.set_backend(cfg.training.kernel_backend)
    dims = init_distributed(cfg)
    setup_logging(dims.rank)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True)
    out = run_dir(cfg)
    if dims.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    logger.info("run %s: world size %d on %s", cfg.job.run_name, dims.world_size, dims.device)

    policy = build_policy(cfg, dims.device)
    if cfg.parallelism.encoder_placement == "shard":
        logger.info("text encoders sharded with FSDP2: %s", ", ".join(shard_frozen_encoders(policy, dims)) or "none")
    model = build_model(cfg, dims, trainable=True)
    frozen_copy = build_model(cfg, dims, trainable=False) if needs_frozen_copy(cfg) else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(
        trainable, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps,
        fused=o.implementation == "fused", foreach=o.implementation == "foreach",
    )
    ema = (
        EMA(trainable, max_decay=cfg.training.ema_max_decay, update_interval=cfg.training.ema_update_interval)
        if cfg.training.ema
        else None
    )
    r = cfg.reward
    reward_fn = MultiReward(
        r.fns, r.model_paths, r.device or dims.device, urls=r.urls, timeout_seconds=r.timeout_seconds,
        max_retries=r.max_retries, retry_backoff_seconds=r.retry_backoff_seconds, options=r.options,
    )
    dataset = build_dataset(cfg, cfg.data.train_split)
    s = cfg.sampling
    sampler = KRepeatSampler(
        len(dataset), s.batch_size, s.num_image_per_prompt, dims.world_size, dims.rank, cfg.job.seed
    )
    loader = build_loader(dataset, sampler, cfg.data.num_workers, cfg.job.seed)
    noise_generator = torch.Generator(device=dims.device).manual_seed(cfg.job.seed * 1000 + dims.rank)
    algo = build_algorithm(cfg, dims, policy, model, frozen_copy, optimizer, ema, reward_fn, loader, noise_generator)
    metrics = MetricsLogger(out, cfg.metrics.enable_tensorboard, dims.is_main)

    train_state = TrainState(algo, loader)
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "train": train_state}
    if ema is not None:
        states["ema"] = ema
    if frozen_copy is not None and is_online(cfg):  # a reference that moves during training (online DPO/SFT)
        states["reference"] = ModelState(frozen_copy)
    ckpt = CheckpointManager(
        out / cfg.checkpoint.folder, states, {"noise": noise_generator},
        cfg.checkpoint.interval, cfg.checkpoint.keep_latest_k, cfg.checkpoint.async_mode == "async",
        enable=cfg.checkpoint.enable,
    )
    algo.guard.last_good = ckpt.last_good if cfg.checkpoint.enable else lambda: "none (checkpoint.enable = false)"
    if cfg.checkpoint.enable:
        resume = ckpt.resolve_step(cfg.checkpoint.load_step)
        if resume is not None:
            ckpt.load(resume)

    test_set = build_dataset(cfg, cfg.data.test_split) if cfg.eval.freq > 0 or cfg.eval.at_end else None
    n_trained, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    logger.info("training %s of %s parameters for %d epochs; outputs in %s", f"{n_trained:,}", f"{n_total:,}",
                cfg.training.steps, out)

    def run_eval(step: int) -> None:
        scalars, images, captions = evaluate(cfg, dims, policy, model, ema, reward_fn, test_set)
        metrics.log_scalars(scalars, step)
        metrics.log_images("eval/images", images, captions, step)
        logger.info("eval at epoch %d: %s", step, "  ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()))

    try:
        for epoch in range(train_state.epoch, cfg.training.steps):
            if test_set is not None and cfg.eval.freq > 0 and epoch % cfg.eval.freq == 0:
                run_eval(epoch)
            t0 = time.perf_counter()
            result = algo.run_epoch(epoch)
            if epoch % cfg.metrics.log_freq == 0 or epoch == cfg.training.steps - 1:
                metrics.log_scalars(result.scalars, epoch)
            if cfg.metrics.image_log_freq and epoch % cfg.metrics.image_log_freq == 0:
                metrics.log_images("rollout/images", result.images, result.captions, epoch)
            logger.info("epoch %d  %s  %.1fs", epoch, result.summary, time.perf_counter() - t0)
            train_state.epoch = epoch + 1
            if ckpt.should_save(epoch + 1, cfg.training.steps):
                ckpt.save(epoch + 1)
        if test_set is not None and cfg.eval.at_end:
            run_eval(cfg.training.steps)
        ckpt.close()
    finally:
        reward_fn.close()
        metrics.close()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
