"""WanT2VPipeline (the video Policy) against diffusers' WanPipeline on the tiny random pipeline.

flow_grpo samples Wan with UniPC's sigma table but its own Euler / SDE steps (never UniPC's solver),
so the reference here is diffusers' WanPipeline with a scheduler that keeps UniPC's table and
integer timesteps and takes Euler steps on it: same text encoder, latents, CFG, VAE decode.
"""

import json
import shutil

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

from titan_flow.config import ConfigError, build_job_config
from titan_flow.models import get_model_spec
from titan_flow.models.common.schedules import unipc_flow_sigmas
from titan_flow.models.wan.pipeline import WanT2VPipeline, build_tiny_wan_pipeline_dir
from titan_flow.rl.rollout import sample_trajectory
from test_sd3_pipeline import DiffusersBackbone  # diffusers' backbone behind our call signature
from test_wan_model import load_diffusers
from tolerances import chain_length, rounding_bound

HEIGHT, WIDTH, FRAMES = 32, 48, 9  # non-square; 9 frames -> 3 latent frames of 4 x 6
MAX_SEQ = 16
NUM_STEPS = 6
PROMPTS = ["a photo of a red cat", 'a sign that says "two dogs" in a green house with a tree']
# fp32 sampling parity: identical operations up to GEMM blocking, so a few fp32 roundings (2^-24) per
# step, amplified at most ~guidance x per step over NUM_STEPS steps: far below this.
REL_TOL = 1e-4


class EulerOnUniPCTable:
    """The scheduler flow_grpo samples Wan with: UniPC's sigma table and integer timesteps, Euler steps."""

    def __init__(self, unipc: UniPCMultistepScheduler):
        self.unipc, self.config, self.order = unipc, unipc.config, 1

    def set_timesteps(self, num_inference_steps, device=None):
        self.unipc.set_timesteps(num_inference_steps, device=device)
        self.timesteps, self.sigmas, self.index = self.unipc.timesteps, self.unipc.sigmas, 0

    def set_begin_index(self, index):
        self.index = index

    def step(self, velocity, timestep, latents, return_dict=False):
        dt = self.sigmas[self.index + 1] - self.sigmas[self.index]
        self.index += 1
        return (latents.float() + dt * velocity.float(),)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_wan_pipeline_dir(tmp_path_factory.mktemp("tiny_wan") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return WanT2VPipeline.load(str(tiny_dir), device="cpu", resolution=HEIGHT, width=WIDTH, num_frames=FRAMES,
                               max_sequence_length=MAX_SEQ, sigma_grid="diffusers")


@pytest.fixture(scope="module")
def reference(tiny_dir):
    transformer = load_diffusers(tiny_dir / "transformer")
    return WanPipeline.from_pretrained(tiny_dir, transformer=transformer, dtype=torch.float32).to("cpu")


@pytest.fixture(scope="module", params=["diffusers", "titan_flow"])
def backbone(request, tiny_dir, reference):
    """The velocity model: diffusers' (isolates the glue) and our port loaded from the same weights."""
    if request.param == "diffusers":
        return DiffusersBackbone(reference.transformer).eval()
    return get_model_spec("wan").from_pretrained(tiny_dir / "transformer", dtype=torch.float32).eval()


def test_encode_matches_diffusers_and_zeroes_the_padding(ours, reference):
    cond = ours.encode(PROMPTS)
    assert cond["prompt_embeds"].shape == cond["negative_prompt_embeds"].shape == (2, MAX_SEQ, 32)
    with torch.no_grad():
        embeds, negative = reference.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=MAX_SEQ,
                                                   device="cpu")
    diffs = [(cond["prompt_embeds"] - embeds).abs().max().item(),
             (cond["negative_prompt_embeds"] - negative).abs().max().item()]
    print("encode max abs diff vs diffusers (prompt, negative):", diffs)
    assert max(diffs) < 1e-6
    # the short prompt's rows after its tokens are exact zeros; the text is not masked downstream
    n_tokens = len(ours.tokenizer(PROMPTS[0]).input_ids)
    assert n_tokens < MAX_SEQ
    assert torch.all(cond["prompt_embeds"][0, n_tokens:] == 0) and cond["prompt_embeds"][0, :n_tokens].abs().min() > 0


def test_initial_noise_matches_diffusers_prepare_latents(ours, reference):
    assert ours.latent_shape == (4, 3, HEIGHT // 8, WIDTH // 8)
    noise = ours.initial_noise(3, torch.Generator().manual_seed(7))
    expected = reference.prepare_latents(3, 4, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu",
                                         torch.Generator().manual_seed(7))
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
    seeds = [3, 3, 5]  # same_latent: one generator per sample
    noise = ours.initial_noise(3, [torch.Generator().manual_seed(s) for s in seeds])
    expected = reference.prepare_latents(3, 4, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu",
                                         [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(noise, expected) and torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])


@pytest.mark.parametrize("num_steps", [NUM_STEPS, 20, 50])
def test_sigmas_and_integer_timesteps_are_unipcs(ours, reference, num_steps):
    reference.scheduler.set_timesteps(num_steps)
    sigmas, timesteps = unipc_flow_sigmas(num_steps, 3.0, "diffusers")
    assert torch.equal(ours.sigmas(num_steps), reference.scheduler.sigmas)
    assert torch.equal(timesteps, reference.scheduler.timesteps)
    assert torch.equal(ours.timesteps(sigmas[:-1]), reference.scheduler.timesteps)


def test_flow_grpo_grid_is_the_default_and_the_reference_table():
    """flow_grpo pins diffusers 0.33.1, whose UniPC table (<= 0.36) differs from today's; the notes' T=20 values."""
    sigmas, timesteps = unipc_flow_sigmas(20, 3.0)
    want = [.9997, .9824, .9639, .9441, .9227, .8996, .8746, .8475, .8178, .7853, .7496, .7102, .6663, .6173, .5621,
            .4997, .4283, .3459, .2498, .1362, 0.0]
    assert torch.allclose(sigmas, torch.tensor(want), atol=5e-5, rtol=0)
    assert timesteps.tolist() == [999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617, 562, 499, 428,
                                  345, 249, 136]
    # the formula, in float64: flip(shift(1 - linspace(1, 1/1000, T+1)))[:-1]
    u = 1 - torch.linspace(1, 1 / 1000, 21, dtype=torch.float64)
    assert torch.equal(sigmas[:-1], (3 * u / (1 + 2 * u)).flip(0)[:-1].float())
    assert WanT2VPipeline.load("", device="cpu").sigma_grid == "flow_grpo"


class RecordingBackbone(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.timesteps = inner, []

    def forward(self, **inputs):
        self.timesteps.append(inputs["timestep"])
        return self.inner(**inputs)


def test_velocity_feeds_the_tables_integer_timesteps(ours, backbone):
    recorder = RecordingBackbone(backbone)
    sigmas = ours.sigmas(20)
    x = ours.initial_noise(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.velocity(recorder, x, sigmas[4].expand(2), ours.encode(PROMPTS), 4.5)
    cond_t, uncond_t = recorder.timesteps  # CFG: two separate forwards, as the reference
    assert cond_t.dtype == torch.int64 and cond_t.tolist() == uncond_t.tolist() == [923, 923]
    assert int(sigmas[4].item() * 1000) == 923


def _run_reference(reference, latents, guidance_scale, output_type):
    reference.scheduler = EulerOnUniPCTable(UniPCMultistepScheduler.from_config(reference.scheduler.config))
    with torch.no_grad():
        return reference(PROMPTS, negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                         num_inference_steps=NUM_STEPS, guidance_scale=guidance_scale, latents=latents.clone(),
                         max_sequence_length=MAX_SEQ, output_type=output_type).frames


def rel_err(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_ode_sampling_reproduces_diffusers(ours, reference, backbone, guidance_scale):
    """THE parity test: noise level 0 through our rollout = diffusers' WanPipeline on the same sigma table
    (same latents, same steps, CFG on / off), final latents and decoded frames."""
    initial = ours.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    cond = ours.encode(PROMPTS)
    trajectory = sample_trajectory(ours, backbone, cond, initial, ours.sigmas(NUM_STEPS), [0.0] * NUM_STEPS, "sde",
                                   guidance_scale)
    latents = trajectory.latents[:, -1]
    frames = ours.decode(latents)
    expected_latents = _run_reference(reference, initial, guidance_scale, "latent")
    expected_frames = _run_reference(reference, initial, guidance_scale, "pt")
    latent_err, frame_err = rel_err(latents, expected_latents), rel_err(frames, expected_frames)
    print(f"ODE parity ({type(backbone).__name__}, guidance {guidance_scale}): latents rel err {latent_err:.3g}, "
          f"frames rel err {frame_err:.3g}")
    assert frames.shape == expected_frames.shape == (2, FRAMES, 3, HEIGHT, WIDTH)
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0.01
    assert (latents - initial).abs().max() > 1.0  # the trajectory moved far from the noise
    assert latent_err <= REL_TOL and frame_err <= REL_TOL


def test_cfg_velocity_is_differentiable_and_equal_without_grad(ours, backbone):
    cond = {k: v.clone().requires_grad_(True) for k, v in ours.encode(PROMPTS).items()}
    x = ours.initial_noise(2, torch.Generator().manual_seed(1))
    sigmas = ours.sigmas(NUM_STEPS)
    sigma = torch.stack([sigmas[1], sigmas[4]])
    v = ours.velocity(backbone, x, sigma, cond, 4.5)
    assert v.shape == x.shape and v.dtype == torch.float32
    with torch.no_grad():  # rollout (no grad) and training (grad) must agree bit for bit: on-policy ratio 1
        assert torch.equal(ours.velocity(backbone, x, sigma, cond, 4.5), v)
    v.square().sum().backward()
    for key in cond:  # both CFG branches carry gradient
        assert cond[key].grad is not None and cond[key].grad.abs().sum() > 0, key
    with torch.no_grad():
        plain = ours.velocity(backbone, x, sigma, cond, 1.0)
        uncond = ours.velocity(backbone, x, sigma, {**cond, "prompt_embeds": cond["negative_prompt_embeds"]}, 1.0)
    assert torch.equal(v.detach(), uncond + 4.5 * (plain - uncond))


def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        WanT2VPipeline.load(str(tmp_path / "nowhere"), device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae must hold the Wan VAE \(AutoencoderKLWan\)"):
        WanT2VPipeline.load(str(broken), device="cpu")
    shutil.copytree(tiny_dir / "vae", broken / "vae")
    config_path = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match=r"\['use_karras_sigmas'\] are not supported for Wan"):
        WanT2VPipeline.load(str(broken), device="cpu")
    config_path.write_text(json.dumps({**config, "use_flow_sigmas": False}))
    with pytest.raises(ValueError, match="must have use_flow_sigmas = true"):
        WanT2VPipeline.load(str(broken), device="cpu")
    with pytest.raises(ValueError, match=r"model.num_frames: 8 must be 4k\+1"):
        WanT2VPipeline.load(str(tiny_dir), device="cpu", num_frames=8)
    with pytest.raises(ValueError, match="model.width: 40 must be a positive multiple of 16"):
        WanT2VPipeline.load(str(tiny_dir), device="cpu", width=40)
    with pytest.raises(ValueError, match="text-to-video only"):
        WanT2VPipeline.load("", device="cpu").encode(["x"], images=[torch.zeros(3, 8, 8)])


def test_config_takes_the_pipelines_video_defaults(tiny_dir):
    """auto fields: WanPipeline's call defaults with a pretrained directory, the small debug video without."""
    cfg = build_job_config(["--model.name", "wan", "--model.pretrained_path", str(tiny_dir)])
    m = cfg.model
    assert (m.resolution, m.width, m.num_frames, m.max_sequence_length) == (480, 832, 81, 512)
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.eval.num_steps) == (50, 5.0, 50)
    cfg = build_job_config(["--model.name", "wan"])
    assert (cfg.model.resolution, cfg.model.width, cfg.model.num_frames) == (32, 48, 9)
    cfg = build_job_config(["--model.name", "wan", "--model.num_frames", "5", "--model.width", "64"])
    assert (cfg.model.resolution, cfg.model.width, cfg.model.num_frames) == (32, 64, 5)


def test_image_families_stay_square_single_frame():
    cfg = build_job_config(["--model.resolution", "96"])
    assert (cfg.model.width, cfg.model.num_frames) == (96, 1)  # width follows the resolution that was set
    with pytest.raises(ConfigError, match=r"model.width = 64 and model.num_frames = 1: the 'sd3' family makes square"):
        build_job_config(["--model.resolution", "96", "--model.width", "64"])
    with pytest.raises(ConfigError, match=r"model.num_frames = 5: the 'sd3' family makes square images"):
        build_job_config(["--model.num_frames", "5"])
    with pytest.raises(ConfigError, match="model.width must be a positive multiple of 16, got 40"):
        build_job_config(["--model.name", "wan", "--model.width", "40"])


def test_bf16_encoder_vae_and_backbone(tiny_dir, ours):
    """Reduced-precision components still hand rl/ fp32 tensors, within bf16's rounding of the fp32 ones
    (tests/tolerances.py: the bound over each component's chain of roundings and every element compared).
    The backbone keeps its norms, modulation and RoPE in fp32 whatever its weights' dtype."""
    pipe = WanT2VPipeline.load(str(tiny_dir), device="cpu", encoder_dtype=torch.bfloat16, vae_dtype=torch.bfloat16,
                               resolution=HEIGHT, width=WIDTH, num_frames=FRAMES, max_sequence_length=MAX_SEQ,
                               sigma_grid="diffusers")

    def assert_within_bf16(got, want, module, label):
        assert got.dtype == torch.float32
        error = (got - want).abs().max().item() / want.abs().max().item()
        bound = rounding_bound(chain_length(module), elements=want.numel())
        print(f"{label}: bf16 vs fp32 max error {error:.3g} of the largest entry (bound {bound:.3g})")
        assert error <= bound, label

    cond, cond32 = pipe.encode(PROMPTS), ours.encode(PROMPTS)
    assert_within_bf16(cond["prompt_embeds"], cond32["prompt_embeds"], pipe.text_encoder, "prompt_embeds")
    assert torch.all(cond["prompt_embeds"][0, len(pipe.tokenizer(PROMPTS[0]).input_ids):] == 0)  # still exact zeros

    x = ours.initial_noise(2, torch.Generator().manual_seed(2))
    sigmas = ours.sigmas(NUM_STEPS)
    sigma = torch.stack([sigmas[1], sigmas[4]])
    spec = get_model_spec("wan")
    backbone_bf16 = spec.from_pretrained(tiny_dir / "transformer", dtype=torch.bfloat16)
    backbone_fp32 = spec.from_pretrained(tiny_dir / "transformer", dtype=torch.float32)
    v = pipe.velocity(backbone_bf16, x, sigma, cond32, 1.0)  # guidance 1: CFG would only scale the rounding
    assert_within_bf16(v, ours.velocity(backbone_fp32, x, sigma, cond32, 1.0), backbone_fp32, "velocity")

    # The VAE's output lies in [-1, 1] before frames = out / 2 + 1/2: half its bound in frame units.
    frames, frames32 = pipe.decode(x), ours.decode(x)
    assert frames.dtype == torch.float32
    frame_error = (frames - frames32).abs().max().item()
    bound = rounding_bound(chain_length(pipe.vae.decoder), elements=frames.numel()) / 2
    print(f"decoded frames: bf16 vs fp32 max error {frame_error:.3g} (bound {bound:.3g})")
    assert frame_error <= bound
