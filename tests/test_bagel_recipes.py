"""The Bagel recipes carry the reference's hyper-parameters, and the LoRA one trains on the debug Bagel."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from titan_flow.config import build_job_config
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora
from titan_flow.train import main

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"


def load(name, *overrides):
    return build_job_config(["--job.config_file", str(CONFIGS / f"{name}.toml"), *overrides])


@pytest.mark.parametrize("name, gpus, n_b, ga, window", [("bagel_full", 32, 4, 2, 3), ("bagel_lora", 8, 16, 8, 2)])
def test_bagel_recipes_have_the_reference_hyper_parameters(name, gpus, n_b, ga, window):
    cfg = load(name)
    s, rl = cfg.sampling, cfg.rl
    assert (cfg.model.name, cfg.model.trainable, cfg.model.resolution) == ("bagel", "gen_expert", 512)
    assert (s.num_steps, s.guidance_scale, s.noise_level, s.sde_type) == (14, 4.0, 1.3, "sde")  # 15 sigmas
    assert (s.num_image_per_prompt, s.batch_size, s.num_batches_per_epoch) == (16, 6, n_b)
    assert gpus * s.batch_size * s.num_batches_per_epoch // s.num_image_per_prompt == 48  # groups per epoch
    assert cfg.training.gradient_accumulation_steps == ga == n_b // 2
    assert (s.sde_window_size, s.sde_window_range) == (window, [0, 7])
    assert (rl.clip_range, rl.beta, rl.global_std, cfg.optimizer.lr) == (1e-5, 0.0, False, 1e-4)
    assert cfg.training.ema is False and cfg.reward.fns == {"pickscore": 1.0}
    assert cfg.lora.enable is (name == "bagel_lora")
    if cfg.lora.enable:
        assert (cfg.lora.rank, cfg.lora.alpha) == (64, 128.0)


def test_bagel_lora_recipe_trains_only_the_adapters_on_the_debug_bagel(tmp_path, caplog):
    shrink = ["--model.pretrained_path", "", "--model.flavor", "debug", "--model.resolution", "48",
              "--model.max_sequence_length", "64", "--model.compute_dtype", "float32", "--model.vae_dtype", "float32",
              "--sampling.num_steps", "6", "--sampling.num_image_per_prompt", "2", "--sampling.batch_size", "4",
              "--sampling.num_batches_per_epoch", "1", "--training.gradient_accumulation_steps", "1",
              "--sampling.sde_window_range", "0,3", "--lora.rank", "4", "--lora.alpha", "8",
              "--training.steps", "2", "--eval.freq", "0", "--checkpoint.enable", "false", "--data.path", "",
              "--reward.fns", "jpeg_compressibility=1.0", "--metrics.enable_tensorboard", "false",
              "--job.output_dir", str(tmp_path)]
    cfg = load("bagel_lora", *shrink)
    model = get_model_spec("bagel").build("debug")
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, 4, 8.0, cfg.lora.target_modules)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters > 0
    with caplog.at_level(logging.INFO, logger="titan_flow"):
        assert main(["--job.config_file", str(CONFIGS / "bagel_lora.toml"), *shrink]) == 0
    logged = re.search(r"training ([\d,]+) of ([\d,]+) parameters", caplog.text)
    assert logged, caplog.text[-2000:]
    assert int(logged[1].replace(",", "")) == adapters  # the gen expert's adapters and nothing else
    assert int(logged[2].replace(",", "")) == total + adapters
    epochs = [json.loads(line) for line in (tmp_path / "bagel_lora" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2
    assert all(m["ratio/min"] == m["ratio/max"] == 1.0 for m in epochs)  # on-policy through the adapters
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in epochs)
