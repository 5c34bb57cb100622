"""The Qwen-Image recipes carry the reference's hyper-parameters (flow_grpo config/grpo.py at upstream 9745241:
pickscore_qwenimage, counting_qwenimage_edit, counting_qwenimage_edit_fast; edit_and_video.md 3.5-3.6; the OCR
recipe is pickscore_qwenimage with general_ocr_sd3's prompts and reward), and
the text-to-image one trains its LoRA on the debug Qwen-Image."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from titan_flow.config import build_job_config
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora
from titan_flow.rewards import reward_names
from titan_flow.train import main

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"
QWEN_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2"]
# name: (model, noise level, window size, window range, rewards, data, checkpoint interval). All: 32 GPUs,
# 4 prompts x 16 images, n_b 4 (32 groups per epoch), GA 2, T 10 / eval 50, true CFG 4 with " ", 512 px.
EXPECTED = {
    "qwen_image_pickscore": ("Qwen-Image", 1.2, 2, [0, 5], {"pickscore": 1.0}, ("dataset/pickscore", "text"), 30),
    # not in the reference: pickscore_qwenimage with general_ocr_sd3's prompts and reward
    "qwen_image_ocr": ("Qwen-Image", 1.2, 2, [0, 5], {"ocr": 1.0}, ("dataset/ocr", "text"), 30),
    # window size 0 in the reference = SDE on all but the last of the 10 steps, those 9 trained
    "qwen_image_edit_counting": ("Qwen-Image-Edit", 1.0, 9, [0, 9], {"geneval": 0.8, "image_similarity": 0.2},
                                 ("dataset/counting_edit", "geneval"), 60),
    "qwen_image_edit_counting_fast": ("Qwen-Image-Edit", 1.5, 4, [0, 5], {"geneval": 0.8, "image_similarity": 0.2},
                                      ("dataset/counting_edit", "geneval"), 60),
}


def load(name, *overrides):
    return build_job_config(["--job.config_file", str(CONFIGS / f"{name}.toml"), *overrides])


def test_every_qwen_image_recipe_is_listed():
    # and the tiny CPU edit job, which tests/test_qwen_image_train.py runs
    assert sorted(p.stem for p in CONFIGS.glob("qwen_image*.toml")) == sorted([*EXPECTED, "qwen_image_edit_debug_cpu"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_has_the_reference_hyper_parameters(name):
    weights, noise, window, window_range, rewards, (data, data_format), interval = EXPECTED[name]
    cfg = load(name)
    m, s, rl, o = cfg.model, cfg.sampling, cfg.rl, cfg.optimizer
    assert (cfg.job.run_name, m.name, m.pretrained_path) == (name, "qwen_image", f"models/{weights}")
    assert (m.dtype, m.compute_dtype, m.encoder_dtype, m.vae_dtype) == ("float32", "bfloat16", "bfloat16", "float32")
    assert (m.resolution, m.max_sequence_length) == (512, 512)
    assert (s.num_steps, s.guidance_scale, s.negative_prompt, cfg.eval.num_steps, cfg.eval.guidance_scale) == (
        10, 4.0, " ", 50, 4.0)
    assert (s.noise_level, s.sde_type, s.same_latent) == (noise, "sde", False)
    assert (s.sde_window_size, s.sde_window_range, s.branch_prefix) == (window, window_range, False)
    assert (s.num_image_per_prompt, s.batch_size, s.num_batches_per_epoch) == (16, 4, 4)
    assert 32 * s.batch_size * s.num_batches_per_epoch // s.num_image_per_prompt == 32  # groups per epoch
    assert cfg.training.gradient_accumulation_steps * 2 == s.num_batches_per_epoch  # two updates an epoch
    assert (rl.algorithm, rl.clip_range, rl.adv_clip_max, rl.beta, rl.train_cfg) == ("grpo", 1e-4, 5.0, 0.0, True)
    assert (rl.global_std, rl.per_prompt_stat_tracking, rl.num_inner_epochs) == (True, True, 1)
    assert (o.lr, o.weight_decay, o.max_grad_norm, o.beta1, o.beta2, o.eps) == (3e-4, 1e-4, 1.0, 0.9, 0.999, 1e-8)
    assert cfg.training.ema is False
    assert (cfg.lora.enable, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (True, 64, 128.0, QWEN_TARGETS)
    assert cfg.activation_checkpoint.mode == "full" and cfg.parallelism.encoder_placement == "shard"
    assert (cfg.checkpoint.interval, cfg.eval.freq, cfg.eval.batch_size) == (interval, 30, 4)
    assert cfg.reward.fns == rewards and set(rewards) <= set(reward_names())
    assert (cfg.data.path, cfg.data.format) == (data, data_format)
    if "edit" in name:  # the source image at ~1024^2 pixels (diffusers' and the reference's), read from the jsonl
        assert (m.condition_size, cfg.data.image_key) == ("preferred", "image")


def test_qwen_lora_targets_resolve_on_the_backbone():
    torch.manual_seed(0)
    model = get_model_spec("qwen_image").build("debug")
    wrapped = apply_lora(model, 64, 128.0, load("qwen_image_pickscore").lora.target_modules)
    assert len(wrapped) == 12 * model.args.num_layers  # every target in every block, nothing else


def test_pickscore_recipe_trains_only_the_adapters_on_the_debug_qwen_image(tmp_path, caplog):
    """Everything but the sizes, the reward and the data stays as the recipe says (Fast window, true CFG,
    LoRA, bf16 compute)."""
    shrink = ["--model.pretrained_path", "", "--model.flavor", "debug", "--model.resolution", "64",
              "--model.max_sequence_length", "32", "--model.encoder_dtype", "float32",
              "--sampling.num_image_per_prompt", "2", "--sampling.batch_size", "4",
              "--sampling.num_batches_per_epoch", "1", "--training.gradient_accumulation_steps", "1",
              "--lora.rank", "4", "--lora.alpha", "8", "--training.steps", "2", "--eval.freq", "0",
              "--checkpoint.enable", "false", "--data.path", "", "--data.format", "auto",
              "--parallelism.encoder_placement", "replicate", "--activation_checkpoint.mode", "full",
              "--reward.fns", "jpeg_compressibility=1.0", "--metrics.enable_tensorboard", "false",
              "--metrics.image_log_freq", "0", "--job.output_dir", str(tmp_path)]
    cfg = load("qwen_image_pickscore", *shrink)
    model = get_model_spec("qwen_image").build("debug")
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, 4, 8.0, cfg.lora.target_modules)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    with caplog.at_level(logging.INFO, logger="titan_flow"):
        assert main(["--job.config_file", str(CONFIGS / "qwen_image_pickscore.toml"), *shrink]) == 0
    logged = re.search(r"training ([\d,]+) of ([\d,]+) parameters", caplog.text)
    assert logged, caplog.text[-2000:]
    assert int(logged[1].replace(",", "")) == adapters and int(logged[2].replace(",", "")) == total + adapters
    epochs = [json.loads(line) for line in (tmp_path / "qwen_image_pickscore" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2
    for m in epochs:
        assert m["ratio/min"] == m["ratio/max"] == 1.0  # on-policy through the adapters, bf16 compute
        start = m["sampling/window_start"]
        assert start in range(4) and sorted(int(k.split("/")[1].split("_")[0]) for k in m
                                            if k.startswith("ratio_per_step/") and k.endswith("_mean")) == [start, start + 1]
        assert torch.isfinite(torch.tensor(m["loss/total"]))
