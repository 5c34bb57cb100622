"""SD3Pipeline (the Policy glue) against diffusers' StableDiffusion3Pipeline on the tiny random pipeline."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from tolerances import chain_length, rounding_bound

from titan_flow.models import get_model_spec
from titan_flow.models.sd3.pipeline import SD3Pipeline, build_tiny_sd3_pipeline_dir
from titan_flow.rl.rollout import sample_trajectory

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 96  # latent 12x12 -> 6x6 tokens, centre-cropped from the debug flavor's 16x16 pos-embed grid
MAX_SEQ = 24
NUM_STEPS = 6
PROMPTS = [
    "a photo of a red cat",
    # Long enough to be truncated by both CLIPs (77 tokens) and by T5 (MAX_SEQ tokens).
    "Zebra crossing with two blue dogs, " * 12,
]


class DiffusersBackbone(torch.nn.Module):
    """diffusers' SD3Transformer2DModel behind our backbone's call signature (returns the tensor)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, **inputs):
        return self.transformer(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline_dir(tmp_path_factory.mktemp("tiny_sd3") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return SD3Pipeline.load(str(tiny_dir), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return StableDiffusion3Pipeline.from_pretrained(tiny_dir, dtype=torch.float32).to("cpu")


@pytest.fixture(scope="module", params=["diffusers", "titan_flow"])
def backbone(request, tiny_dir, reference):
    """The velocity model: diffusers' (isolates the glue) and our port loaded from the same weights."""
    if request.param == "diffusers":
        return DiffusersBackbone(reference.transformer).eval()
    return get_model_spec("sd3").from_pretrained(tiny_dir / "transformer", dtype=torch.float32).eval()


def test_encode_shapes_and_diffusers_parity(ours, reference):
    cond = ours.encode(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + MAX_SEQ, 32)
    assert cond["pooled_prompt_embeds"].shape == (2, 24)
    assert cond["negative_prompt_embeds"].shape == (2, 77 + MAX_SEQ, 32)
    assert cond["negative_pooled_prompt_embeds"].shape == (2, 24)
    assert all(t.dtype == torch.float32 for t in cond.values())
    # The CLIP features (8 + 16 wide) are zero-padded to the T5 width (32) on the first 77 tokens.
    assert torch.all(cond["prompt_embeds"][:, :77, 24:] == 0)
    assert cond["prompt_embeds"][:, :77, :24].abs().amax() > 0.1
    assert (cond["prompt_embeds"][0] - cond["prompt_embeds"][1]).abs().amax() > 0.1

    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = reference.encode_prompt(
            prompt=PROMPTS,
            prompt_2=None,
            prompt_3=None,
            device="cpu",
            do_classifier_free_guidance=True,
            negative_prompt="",
            max_sequence_length=MAX_SEQ,
        )
    diffs = {
        "prompt_embeds": (cond["prompt_embeds"] - embeds).abs().max().item(),
        "pooled_prompt_embeds": (cond["pooled_prompt_embeds"] - pooled).abs().max().item(),
        "negative_prompt_embeds": (cond["negative_prompt_embeds"] - negative).abs().max().item(),
        "negative_pooled_prompt_embeds": (cond["negative_pooled_prompt_embeds"] - negative_pooled).abs().max().item(),
    }
    print("encode max abs diff vs diffusers:", diffs)
    assert max(diffs.values()) < 1e-5


def test_default_max_sequence_length_and_single_prompt(tiny_dir):
    pipe = SD3Pipeline.load(str(tiny_dir), device="cpu", resolution=64)
    cond = pipe.encode("a dog")
    assert cond["prompt_embeds"].shape == (1, 77 + 128, 32)
    assert pipe.latent_shape == (4, 8, 8)


def test_initial_noise_matches_diffusers_prepare_latents(ours, reference):
    shape = (3, *ours.latent_shape)
    assert ours.latent_shape == (4, RESOLUTION // 8, RESOLUTION // 8)
    noise = ours.initial_noise(3, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    expected = reference.prepare_latents(3, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu", generator)
    assert noise.dtype == torch.float32 and noise.shape == shape
    assert torch.equal(noise, expected)

    # One generator per sample (same_latent): sample i depends only on generator i.
    seeds = [3, 3, 5]
    noise = ours.initial_noise(3, [torch.Generator().manual_seed(s) for s in seeds])
    expected = reference.prepare_latents(
        3, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu", [torch.Generator().manual_seed(s) for s in seeds]
    )
    assert torch.equal(noise, expected)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])

    with pytest.raises(ValueError, match="got 2 generators for 3 samples"):
        ours.initial_noise(3, [torch.Generator(), torch.Generator()])


def test_sigmas_match_diffusers_scheduler(ours, reference):
    for num_steps in (NUM_STEPS, 10, 40):
        reference.scheduler.set_timesteps(num_steps)
        assert torch.equal(ours.sigmas(num_steps), reference.scheduler.sigmas)


def _run_reference(reference, latents, guidance_scale, output_type, cond=None):
    """diffusers' pipeline from the prompts, or (cond given) from our conditioning tensors."""
    if cond is None:
        text = dict(prompt=PROMPTS, negative_prompt="")
    else:
        text = {key: value.clone() for key, value in cond.items()}
    with torch.no_grad():
        return reference(
            **text,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=NUM_STEPS,
            guidance_scale=guidance_scale,
            latents=latents.clone(),
            max_sequence_length=MAX_SEQ,
            output_type=output_type,
        ).images


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_sampling_reproduces_diffusers(ours, reference, backbone, guidance_scale):
    """THE parity test: noise level 0 through our rollout = diffusers' StableDiffusion3Pipeline output."""
    initial = ours.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    cond = ours.encode(PROMPTS)
    trajectory = sample_trajectory(
        ours, backbone, cond, initial, ours.sigmas(NUM_STEPS), [0.0] * NUM_STEPS, "sde", guidance_scale
    )
    latents = trajectory.latents[:, -1]
    images = ours.decode(latents)

    expected_latents = _run_reference(reference, initial, guidance_scale, "latent")
    expected_images = _run_reference(reference, initial, guidance_scale, "pt")

    latent_diff = (latents - expected_latents).abs().max().item()
    image_diff = (images - expected_images).abs().max().item()
    # Same conditioning tensors: isolates sampling from the text encoders' batch-size rounding
    # (we encode the negative prompt once at batch 1, diffusers once per batch).
    same_cond_diff = (latents - _run_reference(reference, initial, guidance_scale, "latent", cond)).abs().max().item()
    print(
        f"ODE parity ({type(backbone).__name__}, guidance {guidance_scale}): "
        f"latents max |diff| {latent_diff:.3g}, images {image_diff:.3g}, "
        f"latents from identical conditioning {same_cond_diff:.3g}"
    )
    assert same_cond_diff < 1e-5
    assert images.shape == expected_images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    # The trajectory moved far from the noise, so a tight match is meaningful.
    assert (latents - initial).abs().max() > 1.0
    assert latent_diff < 1e-4
    assert image_diff < 1e-4


def test_cfg_velocity_is_one_batch_and_differentiable(ours, backbone):
    cond = {k: v.clone().requires_grad_(True) for k, v in ours.encode(PROMPTS).items()}
    x = ours.initial_noise(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])

    v = ours.velocity(backbone, x, sigma, cond, 4.5)
    assert v.shape == x.shape and v.dtype == torch.float32
    with torch.no_grad():  # rollout (no grad) and training (grad) must agree bit for bit: on-policy ratio 1
        assert torch.equal(ours.velocity(backbone, x, sigma, cond, 4.5), v)
    v.square().sum().backward()
    for key in cond:  # both CFG branches carry gradient
        assert cond[key].grad is not None and cond[key].grad.abs().sum() > 0, key
    params_with_grad = [p for p in backbone.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert params_with_grad
    backbone.zero_grad(set_to_none=True)

    with torch.no_grad():
        plain = ours.velocity(backbone, x, sigma, cond, 1.0)
        uncond_cond = {**cond, "prompt_embeds": cond["negative_prompt_embeds"]}
        uncond_cond["pooled_prompt_embeds"] = cond["negative_pooled_prompt_embeds"]
        uncond = ours.velocity(backbone, x, sigma, uncond_cond, 1.0)
        guided = ours.velocity(backbone, x, sigma, cond, 4.5)
    # Separate forwards differ from the joint [uncond; cond] batch only by float rounding.
    torch.testing.assert_close(guided, uncond + 4.5 * (plain - uncond), rtol=0, atol=1e-4)
    assert (plain - uncond).abs().max() > 1e-2


def test_bf16_encoders_vae_and_backbone(tiny_dir, ours):
    """Reduced-precision components still hand rl/ fp32 tensors, within bf16's rounding of the fp32 ones.

    Each bound is rounding_bound over the component's chain of roundings and over every element
    compared (these errors do not scale with each element, so the largest of them all is bounded).
    """
    pipe = SD3Pipeline.load(
        str(tiny_dir),
        device="cpu",
        encoder_dtype=torch.bfloat16,
        vae_dtype=torch.bfloat16,
        resolution=RESOLUTION,
        max_sequence_length=MAX_SEQ,
    )

    def assert_within_bf16(got, want, module, label):
        assert got.dtype == torch.float32
        error = (got - want).abs().max().item() / want.abs().max().item()
        bound = rounding_bound(chain_length(module), elements=want.numel())
        print(f"{label}: bf16 vs fp32 max error {error:.3g} of the largest entry (bound {bound:.3g})")
        assert error <= bound, label

    cond, cond32 = pipe.encode(PROMPTS), ours.encode(PROMPTS)
    deepest_encoder = max([*pipe.clip_encoders, pipe.t5_encoder], key=chain_length)
    for key in cond:
        assert_within_bf16(cond[key], cond32[key], deepest_encoder, key)

    # Guidance 1: CFG's linear combination would only scale the backbone's rounding by 2g - 1.
    x = ours.initial_noise(2, torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 0.3])
    spec = get_model_spec("sd3")
    backbone_bf16 = spec.from_pretrained(tiny_dir / "transformer", dtype=torch.bfloat16)
    backbone_fp32 = spec.from_pretrained(tiny_dir / "transformer", dtype=torch.float32)
    v = pipe.velocity(backbone_bf16, x, sigma, cond32, 1.0)
    assert_within_bf16(v, ours.velocity(backbone_fp32, x, sigma, cond32, 1.0), backbone_fp32, "velocity")

    # The VAE's output lies in [-1, 1] before images = out / 2 + 1/2: half its bound in image units.
    images, images32 = pipe.decode(x), ours.decode(x)
    assert images.dtype == torch.float32
    image_error = (images - images32).abs().max().item()
    bound = rounding_bound(chain_length(pipe.vae.decoder), elements=images.numel()) / 2
    print(f"decoded images: bf16 vs fp32 max error {image_error:.3g} (bound {bound:.3g})")
    assert image_error <= bound


def test_tiny_pipeline_is_deterministic_from_seed():
    a = SD3Pipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=0)
    b = SD3Pipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=0)
    c = SD3Pipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=1)
    ea, eb, ec = (p.encode(["a cat"])["prompt_embeds"] for p in (a, b, c))
    assert torch.equal(ea, eb)
    assert not torch.allclose(ea, ec)
    noise = a.initial_noise(1, torch.Generator().manual_seed(0))
    assert torch.equal(a.decode(noise), b.decode(noise))


def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        SD3Pipeline.load(str(tmp_path / "nowhere"), device="cpu")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_3 must hold the T5 text encoder"):
        SD3Pipeline.load(str(broken), device="cpu")

    shutil.copytree(tiny_dir / "text_encoder_3", broken / "text_encoder_3")
    (broken / "tokenizer_2" / "merges.txt").unlink()
    expected = r"tokenizer_2 must hold the CLIP-G tokenizer \(tokenizer.json or vocab.json\+merges.txt\)"
    with pytest.raises(FileNotFoundError, match=expected):
        SD3Pipeline.load(str(broken), device="cpu")

    shutil.rmtree(broken / "tokenizer_2")
    shutil.copytree(tiny_dir / "tokenizer_2", broken / "tokenizer_2")
    config_path = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["use_dynamic_shifting"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['use_dynamic_shifting'\] are not supported for SD3"):
        SD3Pipeline.load(str(broken), device="cpu")

    with pytest.raises(ValueError, match="model.resolution: 72 must be a positive multiple of 16"):
        SD3Pipeline.load(str(tiny_dir), device="cpu", resolution=72)


def test_encode_rejects_images(ours):
    with pytest.raises(ValueError, match="text-to-image only"):
        ours.encode(["a cat"], images=[torch.zeros(3, 8, 8)])


def _sample_cli(tiny_dir, out_dir, *extra: str) -> np.ndarray:
    """`python -m titan_flow.sample --pretrained_path` at its defaults -> uint8 (N, H, W, 3) of its PNGs."""
    argv = ["--pretrained_path", str(tiny_dir), "--device", "cpu", "--seed", "5", "--out", str(out_dir)]
    argv += [arg for prompt in CLI_PROMPTS for arg in ("--prompt", prompt)]
    proc = subprocess.run([sys.executable, "-m", "titan_flow.sample", *argv, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(out_dir).glob("*.png"))])


# More than 16 T5 tokens each (the debug job's text length), fewer than diffusers' default 256.
CLI_PROMPTS = [
    "a photo of a red cat with two blue dogs on a green car in the house, " * 2,
    "a sign that says three four, a tree and a person with an image of the dog",
]


def test_sample_cli_reproduces_diffusers_pipeline_at_its_defaults(tiny_dir, reference, tmp_path):
    """The CLI's PNGs = StableDiffusion3Pipeline(prompts, generator) at the pipeline's own defaults (height
    from the transformer's sample_size, 28 steps, CFG 7.0, 256 T5 tokens): within 1 uint8 level."""
    assert all(len(reference.tokenizer_3(p).input_ids) > 16 for p in CLI_PROMPTS)
    expected = reference(CLI_PROMPTS, generator=torch.Generator().manual_seed(5), output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    ours = _sample_cli(tiny_dir, tmp_path / "defaults")
    assert ours.shape == expected.shape == (2, 128, 128, 3)
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI vs StableDiffusion3Pipeline at its defaults: max {level_diff} uint8 levels")
    assert expected.std() > 10  # a real picture, so agreement is meaningful
    assert level_diff <= 1
    # The test can fail: cutting the prompts to the debug job's 16 T5 tokens changes the images.
    cut = _sample_cli(tiny_dir, tmp_path / "cut", "--max_sequence_length", "16")
    assert np.abs(cut.astype(int) - expected.astype(int)).max() > 1
