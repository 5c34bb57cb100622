"""Wan on the real trainer: the CPU debug video job (on-policy ratio exactly 1 at 1 rank, and at 2 gloo
ranks under torchrun in the slow suite; videos in TensorBoard, eval, checkpoints), Fast windows on video,
the sample CLI writing videos with their prompt and reward, export to diffusers, and the wan_ocr recipe
pinned to the reference."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from titan_flow.config import build_job_config
from titan_flow.export import export
from titan_flow.models import get_model_spec
from titan_flow.peft.lora import apply_lora, lora_parameters
from titan_flow.rewards import reward_names
from titan_flow.sample import main as sample
from titan_flow.train import main
from test_wan_model import load_diffusers

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
FRAMES, HEIGHT, WIDTH = 9, 32, 48  # wan_debug_cpu.toml's videos
# train_configs/wan_debug_cpu.toml shrunk to 3 epochs of 4 videos per rank (one group of 4)
DEBUG_JOB = ["--job.config_file", str(CONFIGS / "wan_debug_cpu.toml"), "--training.steps", "3",
             "--sampling.batch_size", "4", "--sampling.num_image_per_prompt", "4", "--eval.freq", "2",
             "--eval.max_prompts", "4", "--checkpoint.interval", "2", "--metrics.image_log_freq", "2"]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_on_policy(run: Path) -> None:
    epochs = [m for m in read_metrics(run) if "ratio/min" in m]
    assert [m["step"] for m in epochs] == [0, 1, 2]
    for m in epochs:  # one round, one update per epoch: training re-scores the current policy's videos
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0 and m["loss/approx_kl"] == 0.0
        assert m["optim/grad_norm"] > 0 and m["advantage/group_size"] == 4


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory) -> Path:
    """The debug video job at 1 rank, in this process."""
    out = tmp_path_factory.mktemp("wan_outputs")
    assert main([*DEBUG_JOB, "--job.output_dir", str(out)]) == 0
    return out / "wan_debug_cpu"


def test_debug_video_job_is_on_policy(debug_run):
    assert_on_policy(debug_run)
    config = json.loads((debug_run / "config.json").read_text())
    assert config["model"]["name"] == "wan" and config["sampling"]["sde_type"] == "wan"
    assert (config["model"]["resolution"], config["model"]["width"], config["model"]["num_frames"]) == (32, 48, 9)


@pytest.mark.slow
def test_debug_video_job_is_on_policy_at_two_ranks(tmp_path):
    """The same job under torchrun on 2 gloo processes (FSDP2 shards, rewards and advantages gathered)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "titan_flow.train",
           *DEBUG_JOB, "--job.output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert_on_policy(tmp_path / "wan_debug_cpu")
    assert list((tmp_path / "wan_debug_cpu" / "tb").glob("events.out.tfevents.*"))


def test_debug_video_job_writes_videos_eval_and_checkpoints(debug_run):
    evals = [m for m in read_metrics(debug_run) if "eval/reward_avg" in m]
    assert [m["step"] for m in evals] == [0, 2] and all(m["eval/num_prompts"] == 4 for m in evals)
    assert (debug_run / "checkpoint" / "step-00000002" / "COMPLETE").is_file()
    (events,) = (debug_run / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    assert {"rollout/images", "eval/images"} <= set(acc.Tags()["images"])
    for tag in ("rollout/images", "eval/images"):  # 4 rollout videos, 4 eval prompts
        summary = acc.Images(tag)[-1]
        gif = Image.open(io.BytesIO(summary.encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == FRAMES  # a video summary: one frame per video frame
        gif.seek(4)
        frame = np.asarray(gif.convert("RGB"))
        # a captioned grid of the 4 videos in one row, each 32 x 48 with its caption under it
        assert frame.shape == (HEIGHT + 28, 4 * WIDTH, 3) and frame[:HEIGHT].std() > 1
    assert {"rollout/images/prompts/text_summary", "eval/images/prompts/text_summary"} <= set(acc.Tags()["tensors"])


@pytest.mark.parametrize("sde_type", ["wan", pytest.param("sde", marks=pytest.mark.slow),
                                      pytest.param("cps", marks=pytest.mark.slow)])
def test_fast_window_on_video_at_one_rank(tmp_path, sde_type):
    """Flow-GRPO-Fast on video latents with each step type: a 2-step SDE window drawn per round, only its
    steps trained, on-policy (ratio exactly 1)."""
    args = ["--job.config_file", str(CONFIGS / "wan_debug_cpu.toml"), "--job.output_dir", str(tmp_path),
            "--sampling.sde_type", sde_type, "--sampling.noise_level", "1.0" if sde_type != "cps" else "0.8",
            "--training.steps", "3", "--sampling.batch_size", "4", "--sampling.num_image_per_prompt", "4",
            "--sampling.sde_window_size", "2", "--sampling.sde_window_range", "0,6", "--eval.freq", "0",
            "--checkpoint.enable", "false", "--metrics.image_log_freq", "0", "--metrics.enable_tensorboard", "false"]
    assert main(args) == 0
    epochs = read_metrics(tmp_path / "wan_debug_cpu")
    assert len(epochs) == 3
    for m in epochs:
        start = int(m["sampling/window_start"])
        trained = sorted(int(k.split("/")[1].split("_")[0]) for k in m if k.startswith("ratio_per_step/")
                         and k.endswith("_mean"))
        assert 0 <= start <= 4 and trained == [start, start + 1]
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0


def test_sample_cli_writes_videos_with_prompt_and_reward(debug_run, tmp_path):
    prompts = ["a red cat", "two dogs"]
    common = ["--run", str(debug_run), "--steps", "3", "--device", "cpu", "--reward", "jpeg_compressibility",
              *(a for p in prompts for a in ("--prompt", p))]
    for fmt in ("auto", "gif"):
        assert sample([*common, "--out", str(tmp_path / fmt), "--video_format", fmt]) == 0
    manifest = [json.loads(line) for line in (tmp_path / "auto" / "samples.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == prompts
    assert all(-1 < m["reward"]["jpeg_compressibility"] < 0 for m in manifest)
    # mp4 through OpenCV when it is installed (the ocr extra brings it), else gif
    try:
        import cv2
    except ImportError:
        cv2 = None
    suffix = ".mp4" if cv2 is not None else ".gif"
    assert [m["file"] for m in manifest] == [f"0000_a_red_cat{suffix}", f"0001_two_dogs{suffix}"]
    if cv2 is not None:
        capture = cv2.VideoCapture(str(tmp_path / "auto" / manifest[0]["file"]))
        frames = []
        while (ok_frame := capture.read())[0]:
            frames.append(ok_frame[1])
        assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    gif = Image.open(tmp_path / "gif" / "0000_a_red_cat.gif")
    assert gif.n_frames == FRAMES and gif.size == (WIDTH, HEIGHT)
    gif_manifest = [json.loads(line) for line in (tmp_path / "gif" / "samples.jsonl").read_text().splitlines()]
    assert [m["reward"] for m in gif_manifest] == [m["reward"] for m in manifest]  # the same samples


def test_export_loads_in_diffusers_with_zero_difference(debug_run, tmp_path):
    written = export(debug_run, tmp_path / "exported", raw=True)
    assert written == tmp_path / "exported" / "transformer"
    reference = load_diffusers(written)
    ours = get_model_spec("wan").from_pretrained(written)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 3, 4, 6, generator=g), timestep=torch.tensor([999, 300]),
                  encoder_hidden_states=torch.randn(2, 16, 32, generator=g))
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        diff = (ours(**inputs) - expected).abs().max().item()
    print(f"exported Wan: max|ours - diffusers| = {diff:.3g} (max|out| {expected.abs().max():.3g})")
    assert diff == 0.0
    torch.manual_seed(42)  # the run's random init (job.seed): the export holds the trained weights, not these
    initial = get_model_spec("wan").build("debug").state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in ours.state_dict().items())


# ---------------------------------------------------------------------------- the recipe


def test_wan_ocr_recipe_has_the_reference_hyper_parameters():
    """flow_grpo's general_ocr_wan2_1 (edit_and_video.md section 4.9)."""
    cfg = build_job_config(["--job.config_file", str(CONFIGS / "wan_ocr.toml")])
    m, s, rl, o = cfg.model, cfg.sampling, cfg.rl, cfg.optimizer
    assert (cfg.job.run_name, m.name, m.pretrained_path) == ("wan_ocr", "wan", "models/Wan2.1-T2V-1.3B-Diffusers")
    assert (m.resolution, m.width, m.num_frames, m.max_sequence_length) == (240, 416, 33, 512)
    assert (m.dtype, m.compute_dtype, m.encoder_dtype, m.vae_dtype) == ("float32", "bfloat16", "bfloat16", "float32")
    assert (s.num_steps, cfg.eval.num_steps, s.guidance_scale, cfg.eval.guidance_scale) == (20, 50, 4.5, 4.5)
    assert (s.sde_type, s.noise_level, s.sde_window_size, s.same_latent) == ("wan", 1.0, 0, False)
    assert (s.batch_size, s.num_image_per_prompt, s.num_batches_per_epoch) == (8, 4, 2)
    assert cfg.training.gradient_accumulation_steps == 1  # one optimizer step per training batch, two per epoch
    assert (rl.algorithm, rl.beta, rl.clip_range, rl.timestep_fraction) == ("grpo", 0.004, 1e-3, 0.99)
    assert (rl.global_std, rl.per_prompt_stat_tracking, rl.train_cfg, rl.adv_clip_max) == (False, True, True, 5.0)
    assert (o.lr, o.weight_decay, o.max_grad_norm) == (1e-4, 1e-4, 1.0)
    assert cfg.training.ema and (cfg.training.ema_max_decay, cfg.training.ema_update_interval) == (0.9, 8)
    assert (cfg.checkpoint.interval, cfg.eval.freq, cfg.eval.batch_size) == (60, 30, 2)
    assert cfg.reward.fns == {"video_ocr": 1.0} and "video_ocr" in reward_names()
    assert (cfg.data.path, cfg.data.format) == ("dataset/ocr", "text")
    assert (cfg.lora.enable, cfg.lora.rank, cfg.lora.alpha) == (True, 32, 64.0)
    assert cfg.activation_checkpoint.mode == "full"  # transformer.enable_gradient_checkpointing()


def test_wan_ocr_lora_adapts_every_attention_projection_of_the_1_3b():
    """r=32 on to_q, to_k, to_v, to_out.0 of attn1 and attn2: 240 linears, 23.6 M adapter parameters."""
    cfg = build_job_config(["--job.config_file", str(CONFIGS / "wan_ocr.toml")])
    with torch.device("meta"):
        model = get_model_spec("wan").model_cls(get_model_spec("wan").args("1.3B"))
        wrapped = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    assert len(wrapped) == 240 and {name.split(".")[2] for name in wrapped} == {"attn1", "attn2"}
    assert sum(p.numel() for p in lora_parameters(model)) == 23_592_960


def test_wan_ocr_recipe_runs_one_epoch_shrunk_to_the_debug_model(tmp_path):
    """Everything but the sizes, the reward and the data as the recipe says (Wan SDE, CFG, LoRA, KL, clip)."""
    shrink = ["--model.pretrained_path", "", "--model.flavor", "debug", "--model.resolution", "32",
              "--model.width", "48", "--model.num_frames", "5", "--model.max_sequence_length", "16",
              "--model.compute_dtype", "float32", "--model.encoder_dtype", "float32", "--sampling.num_steps", "4",
              "--sampling.batch_size", "4", "--lora.rank", "4", "--lora.alpha", "8", "--training.steps", "1",
              "--reward.fns", "jpeg_compressibility=1.0", "--data.path", "", "--eval.freq", "0",
              "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false",
              "--job.output_dir", str(tmp_path)]
    assert main(["--job.config_file", str(CONFIGS / "wan_ocr.toml"), *shrink]) == 0
    (epoch,) = read_metrics(tmp_path / "wan_ocr")
    assert epoch["optim/global_step"] == 2  # n_b = 2 rounds, an update after each
    assert 0 < epoch["loss/kl"] < 1e6 and all(abs(v) < 1e6 for k, v in epoch.items() if k.startswith("loss/"))


@pytest.mark.parametrize("algorithm", ["dpo", "online_sft"])
def test_flow_matching_algorithms_train_on_video(tmp_path, algorithm):
    """DPO and SFT re-noise final video latents (rl/ is rank-agnostic): one epoch each on the debug Wan."""
    args = ["--job.config_file", str(CONFIGS / "wan_debug_cpu.toml"), "--job.output_dir", str(tmp_path),
            "--rl.algorithm", algorithm, "--training.steps", "1", "--sampling.batch_size", "4",
            "--sampling.num_image_per_prompt", "4", "--sampling.num_steps", "4", "--eval.freq", "0",
            "--checkpoint.enable", "false", "--metrics.enable_tensorboard", "false"]
    assert main(args) == 0
    (epoch,) = read_metrics(tmp_path / "wan_debug_cpu")
    assert epoch["optim/global_step"] == 1 and abs(epoch["loss/total"]) < 1e6
