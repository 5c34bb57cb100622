"""QwenImagePipeline (the Policy glue) against diffusers' QwenImagePipeline and QwenImageEditPipeline on the
tiny random pipelines (Qwen2.5-VL text encoder, Qwen-Image VAE and transformer, built and saved here).

Tolerances: relative errors (max |ours - diffusers| / max |diffusers|) <= 1e-4 for sampled latents and
decoded images, as the issue sets. Each of the T Euler steps adds the backbone's fp32 rounding
(~1e-6 relative, tests/test_qwen_image_model.py) and the text and the two CFG branches are batched
differently (one joint forward here, separate ones in diffusers), so 1e-4 leaves a 100x margin while a
wrong mask, offset, template or CFG rescale moves the result by >= 1e-2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline
from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline
from PIL import Image

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as diffusers_edit
from titan_flow.models import get_model_spec
from titan_flow.models.common.schedules import flux_mu
from titan_flow.models.qwen_image.pipeline import (
    EDIT_TEMPLATE,
    T2I_DROP,
    T2I_TEMPLATE,
    QwenImagePipeline,
    build_tiny_qwen_image_pipeline_dir,
    load_processor,
    true_cfg,
)
from titan_flow.rl.rollout import sample_trajectory, step_noise_levels
from titan_flow.rl.sde import sde_step

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 64  # latent 8 x 8 -> 16 packed tokens
MAX_SEQ = 24
NUM_STEPS = 6
NEGATIVE = " "  # the reference's negative prompt
PROMPTS = [
    "a photo of a red cat",
    # Long enough to be cut at MAX_SEQ tokens after the template: prompts of different lengths in one batch.
    "Zebra crossing with two blue dogs, " * 4,
]
EDITS = ["change the cat to a dog", "add two red cars and a tree"]
# diffusers' edit pipeline resizes the source image to ~1024^2 pixels (a constant); on the CPU both
# sides use this area instead: 96 x 64 for the 3:2 sources below.
CONDITION_AREA = 96 * 64
REL_TOL = 1e-4


class DiffusersBackbone(torch.nn.Module):
    """diffusers' QwenImageTransformer2DModel behind our backbone's call signature (returns the tensor)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, img_shapes, **inputs):
        batch = inputs["hidden_states"].shape[0]
        return self.transformer(**inputs, img_shapes=[img_shapes] * batch, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


def sources(n: int = 2, seed: int = 0) -> list[Image.Image]:
    """Smooth random 3:2 RGB pictures (a noise image would make every VAE latent alike)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        small = rng.rand(4, 6, 3) * 255
        out.append(Image.fromarray(small.astype(np.uint8)).resize((120, 80), Image.BILINEAR))
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen")
    return (build_tiny_qwen_image_pipeline_dir(root / "t2i", seed=0),
            build_tiny_qwen_image_pipeline_dir(root / "edit", seed=0, edit=True))


@pytest.fixture(scope="module")
def tiny_dir(tiny_dirs):
    return tiny_dirs[0]


@pytest.fixture(scope="module")
def edit_dir(tiny_dirs):
    return tiny_dirs[1]


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return QwenImagePipeline.load(str(tiny_dir), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ,
                                  negative_prompt=NEGATIVE)


@pytest.fixture(scope="module")
def ours_edit(edit_dir):
    return QwenImagePipeline.load(str(edit_dir), device="cpu", resolution=RESOLUTION, negative_prompt=NEGATIVE,
                                  condition_area=CONDITION_AREA)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    pipe = DiffusersQwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_edit(edit_dir):
    """diffusers' QwenImageEditPipeline from the directory's parts: transformers cannot load a
    Qwen2VLProcessor without torchvision, so its processor is ours (the PIL image processor)."""
    parts = DiffusersQwenImagePipeline.from_pretrained(edit_dir, dtype=torch.float32)
    pipe = QwenImageEditPipeline(scheduler=parts.scheduler, vae=parts.vae, text_encoder=parts.text_encoder,
                                 tokenizer=parts.tokenizer, processor=load_processor(edit_dir / "processor"),
                                 transformer=parts.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def small_condition_area(monkeypatch):
    real = diffusers_edit.calculate_dimensions
    monkeypatch.setattr(diffusers_edit, "calculate_dimensions", lambda area, ratio: real(CONDITION_AREA, ratio))


@pytest.fixture(scope="module", params=["diffusers", "titan_flow"])
def backbone(request, tiny_dir, reference):
    """The velocity model: diffusers' (isolates the glue) and our port loaded from the same weights."""
    if request.param == "diffusers":
        return DiffusersBackbone(reference.transformer).eval()
    return get_model_spec("qwen_image").from_pretrained(tiny_dir / "transformer", dtype=torch.float32).eval()


# --- conditioning ---------------------------------------------------------------------------------


def test_tiny_tokenizer_drops_exactly_the_template(ours):
    """The template's prefix costs the tiny tokenizer the 34 tokens the pipeline drops, as with the real one."""
    prefix = T2I_TEMPLATE.split("{}")[0]
    assert len(ours.tokenizer(prefix).input_ids) == T2I_DROP
    ids = ours.tokenizer(T2I_TEMPLATE.format("a red cat")).input_ids
    assert ours.tokenizer.decode(ids[T2I_DROP:]).startswith("a red cat<|im_end|>")
    assert "<|image_pad|>" in EDIT_TEMPLATE  # the edit template carries the vision tokens


def test_encode_equals_diffusers_prompt_embeddings_and_masks(ours, reference):
    cond = ours.encode(PROMPTS)
    assert all(t.dtype == torch.float32 for k, t in cond.items() if not k.endswith("mask"))
    with torch.no_grad():
        embeds, mask = reference.encode_prompt(PROMPTS, device="cpu", max_sequence_length=MAX_SEQ)
        negative, negative_mask = reference.encode_prompt([NEGATIVE], device="cpu", max_sequence_length=MAX_SEQ)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["prompt_embeds_mask"], mask)
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32)
    lengths = cond["prompt_embeds_mask"].sum(1).tolist()
    assert lengths[1] == MAX_SEQ and 0 < lengths[0] < MAX_SEQ  # per-sample lengths, the short one zero-padded
    assert torch.all(cond["prompt_embeds"][0, lengths[0]:] == 0)
    # diffusers drops an all-ones mask (None); the negative is one prompt, so it has no padding
    assert negative_mask is None and bool(cond["negative_prompt_embeds_mask"].all())
    assert torch.equal(cond["negative_prompt_embeds"], negative.expand(2, -1, -1))


def test_edit_encode_equals_diffusers(ours_edit, reference_edit):
    """The instruction and the negative prompt each see the source image through Qwen2.5-VL's vision tokens;
    the image's VAE latents are the posterior mean, normalised by the VAE's latent mean/std."""
    images = sources()
    cond = ours_edit.encode(EDITS, images=images)
    height, width = ours_edit.condition_size(images[0])
    assert (height, width) == (64, 96)
    resized = [reference_edit.image_processor.resize(image, height, width) for image in images]
    with torch.no_grad():
        embeds, mask = reference_edit.encode_prompt(EDITS, image=resized, device="cpu")
        negative, _ = reference_edit.encode_prompt([NEGATIVE] * 2, image=resized, device="cpu")
        pixels = reference_edit.image_processor.preprocess(resized, height, width).unsqueeze(2)
        latents = reference_edit._encode_vae_image(pixels, None)[:, :, 0]
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["prompt_embeds_mask"], mask)
    assert torch.equal(cond["negative_prompt_embeds"], negative)
    assert torch.equal(cond["image_latents"], latents) and latents.shape == (2, 4, 8, 12)
    # the vision tokens are part of the conditioning: a different image changes the text embeddings
    other = ours_edit.encode(EDITS, images=sources(seed=1))
    assert (other["prompt_embeds"] - cond["prompt_embeds"]).abs().max() > 1e-3


def test_initial_noise_matches_diffusers_prepare_latents(ours, reference):
    assert ours.latent_shape == (16, 16)
    noise = ours.initial_noise(3, torch.Generator().manual_seed(7))
    expected = reference.prepare_latents(3, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu",
                                         torch.Generator().manual_seed(7))
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
    seeds = [3, 3, 5]
    noise = ours.initial_noise(3, [torch.Generator().manual_seed(s) for s in seeds])
    expected = reference.prepare_latents(3, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu",
                                         [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(noise, expected) and torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    with pytest.raises(ValueError, match="got 2 generators for 3 samples"):
        ours.initial_noise(3, [torch.Generator(), torch.Generator()])


def test_sigmas_match_diffusers_scheduler_bitwise(ours, reference):
    """mu from the target's 16 tokens with Qwen's scheduler config (0.5 -> 0.9 over 256 -> 8192 tokens),
    stretched to shift_terminal 0.02; and the published 512 px table (flow_grpo_algorithm.md 1.2)."""
    for num_steps in (NUM_STEPS, 10, 50):
        mu = flux_mu(16, 256, 8192, 0.5, 0.9)
        reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        assert torch.equal(ours.sigmas(num_steps), reference.scheduler.sigmas)
        assert abs(ours.sigmas(num_steps)[-2].item() - 0.02) < 1e-7
    at_512 = QwenImagePipeline.__new__(QwenImagePipeline)
    at_512.schedule, at_512.latent_size, at_512.device = ours.schedule, 64, torch.device("cpu")
    table = [1.0, 0.9290, 0.8515, 0.7666, 0.6733, 0.5701, 0.4555, 0.3274, 0.1833, 0.0200, 0.0]
    torch.testing.assert_close(at_512.sigmas(10), torch.tensor(table), rtol=0, atol=1e-4)


# --- sampling -------------------------------------------------------------------------------------


def run_diffusers(pipe, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents, decoded images) of one diffusers pipeline call (the latents from its step callback)."""
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    with torch.no_grad():
        images = pipe(**kwargs, output_type="pt", callback_on_step_end=keep_latents).images
    return final["latents"], images


def _run_reference(reference, latents, guidance_scale):
    kwargs = dict(prompt=PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=NUM_STEPS,
                  latents=latents.clone(), max_sequence_length=MAX_SEQ, true_cfg_scale=guidance_scale)
    if guidance_scale > 1:
        kwargs["negative_prompt"] = [NEGATIVE] * len(PROMPTS)
    return run_diffusers(reference, **kwargs)


# True CFG on is the default suite's case; without CFG (a sub-path of it) runs in the slow suite.
GUIDANCE = [pytest.param(1.0, marks=pytest.mark.slow), 4.0]


@pytest.mark.parametrize("guidance_scale", GUIDANCE)
def test_ode_sampling_reproduces_diffusers(ours, reference, backbone, guidance_scale):
    """THE parity test: noise level 0 through our rollout = diffusers' QwenImagePipeline (true CFG with
    the norm rescale at 4.0), latents and decoded images."""
    initial = ours.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    cond = ours.encode(PROMPTS)
    trajectory = sample_trajectory(ours, backbone, cond, initial, ours.sigmas(NUM_STEPS), [0.0] * NUM_STEPS, "sde",
                                   guidance_scale)
    latents = trajectory.latents[:, -1]
    images = ours.decode(latents)
    expected_latents, expected_images = _run_reference(reference, initial, guidance_scale)
    latent_err, image_err = rel_err(latents, expected_latents), rel_err(images, expected_images)
    print(f"ODE parity ({type(backbone).__name__}, true CFG {guidance_scale}): latents rel err {latent_err:.2e}, "
          f"images rel err {image_err:.2e}")
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= images.min() and images.max() <= 1
    assert (latents - initial).abs().max() > 1.0  # the trajectory moved far from the noise
    assert latent_err <= REL_TOL and image_err <= REL_TOL


@pytest.mark.parametrize("guidance_scale", GUIDANCE)
def test_edit_ode_sampling_reproduces_diffusers(ours_edit, reference_edit, edit_dir, small_condition_area,
                                                guidance_scale):
    """Editing: our batch of two edits = diffusers' QwenImageEditPipeline run on each (source, instruction)
    alone (with a single PIL source, the VL processor sees the resized image; diffusers passes a list
    of sources to it unresized), the condition tokens after the noisy ones, frame 1 in MSRoPE."""
    images = sources()
    model = get_model_spec("qwen_image").from_pretrained(edit_dir / "transformer").eval()
    initial = ours_edit.initial_noise(2, torch.Generator().manual_seed(0))
    cond = ours_edit.encode(EDITS, images=images)
    trajectory = sample_trajectory(ours_edit, model, cond, initial, ours_edit.sigmas(NUM_STEPS), [0.0] * NUM_STEPS,
                                   "sde", guidance_scale)
    latents = trajectory.latents[:, -1]
    decoded = ours_edit.decode(latents)
    for i in range(2):
        kwargs = dict(image=images[i], prompt=EDITS[i], height=RESOLUTION, width=RESOLUTION,
                      num_inference_steps=NUM_STEPS, latents=initial[i : i + 1].clone(), true_cfg_scale=guidance_scale)
        if guidance_scale > 1:
            kwargs["negative_prompt"] = NEGATIVE
        expected_latents, expected_images = run_diffusers(reference_edit, **kwargs)
        latent_err = rel_err(latents[i : i + 1], expected_latents)
        image_err = rel_err(decoded[i : i + 1], expected_images)
        print(f"edit ODE parity (true CFG {guidance_scale}) sample {i}: latents rel err {latent_err:.2e}, "
              f"images rel err {image_err:.2e}")
        assert latent_err <= REL_TOL and image_err <= REL_TOL
    # the condition matters: another source image (its tokens and vision tokens) moves the result far beyond
    # the tolerance (on this tiny random VAE by ~6e-3 relative)
    blank = ours_edit.encode(EDITS, images=[Image.new("RGB", (120, 80), "gray")] * 2)
    other = sample_trajectory(ours_edit, model, blank, initial, ours_edit.sigmas(NUM_STEPS), [0.0] * NUM_STEPS, "sde",
                              guidance_scale).latents[:, -1]
    assert rel_err(other, latents) > 20 * REL_TOL


def test_variable_prompt_lengths_in_one_batch_give_the_velocity_of_one_prompt_at_a_time(ours, backbone):
    cond = ours.encode(PROMPTS)
    x = ours.initial_noise(2, torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        together = ours.velocity(backbone, x, sigma, cond, 4.0)
        for i, prompt in enumerate(PROMPTS):
            alone = ours.velocity(backbone, x[i : i + 1], sigma[i : i + 1], ours.encode([prompt]), 4.0)
            err = rel_err(together[i : i + 1], alone)
            print(f"{type(backbone).__name__} prompt {i} ({int(cond['prompt_embeds_mask'][i].sum())} tokens, batch padded "
                  f"to {cond['prompt_embeds'].shape[1]}): batch vs alone rel err {err:.2e}")
            assert err <= 1e-5


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    g = torch.Generator().manual_seed(0)
    v_cond, v_neg = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    guided = true_cfg(v_cond, v_neg, 4.0)
    torch.testing.assert_close(guided.norm(dim=-1), v_cond.norm(dim=-1), rtol=1e-6, atol=0)
    combined = v_neg + 4.0 * (v_cond - v_neg)
    cosine = torch.nn.functional.cosine_similarity(guided, combined, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-6)  # direction of neg + s (cond - neg)


def test_cfg_velocity_is_differentiable_and_equal_with_and_without_grad(ours, backbone):
    cond = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in ours.encode(PROMPTS).items()}
    x = ours.initial_noise(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    v = ours.velocity(backbone, x, sigma, cond, 4.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    with torch.no_grad():  # rollout (no grad) and training (grad) agree bit for bit: on-policy ratio 1
        assert torch.equal(ours.velocity(backbone, x, sigma, cond, 4.0), v)
    v.square().sum().backward()
    for key in ("prompt_embeds", "negative_prompt_embeds"):  # both branches carry gradient
        assert cond[key].grad is not None and cond[key].grad.abs().sum() > 0, key
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    backbone.zero_grad(set_to_none=True)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_on_policy_ratio_is_exactly_one(ours, ours_edit, tiny_dir, task):
    """GRPO's re-score of a rollout with the same model and conditioning reproduces its log-probs bit
    for bit (SDE at noise 1.2 as the reference's Qwen-Image recipe, and 1.0 for Qwen-Image-Edit)."""
    pipe, level = (ours, 1.2) if task == "t2i" else (ours_edit, 1.0)
    model = get_model_spec("qwen_image").from_pretrained(tiny_dir / "transformer")
    cond = pipe.encode(PROMPTS) if task == "t2i" else pipe.encode(EDITS, images=sources())
    sigmas = pipe.sigmas(NUM_STEPS)
    levels = step_noise_levels(NUM_STEPS, level, None)
    x0 = pipe.initial_noise(2, torch.Generator().manual_seed(7))
    traj = sample_trajectory(pipe, model, cond, x0, sigmas, levels, "sde", 4.0, generator=torch.Generator().manual_seed(8))
    model.train()
    for j in range(NUM_STEPS - 1):
        v = pipe.velocity(model, traj.latents[:, j], sigmas[j].expand(2), cond, 4.0)
        out = sde_step(v, traj.latents[:, j], sigmas[j].expand(2), sigmas[j + 1].expand(2), levels[j], "sde",
                       prev_sample=traj.latents[:, j + 1], sigma_fallback=sigmas[1])
        ratio = torch.exp(out.log_prob - traj.log_probs[:, j])
        assert torch.equal(ratio, torch.ones(2)), (j, ratio)
        out.log_prob.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".txt_mlp." not in n and "add_q" not in n
               and "to_add_out" not in n and "norm_added_q" not in n)


def test_decode_matches_the_vae_with_latent_mean_and_std(ours, reference):
    x = ours.initial_noise(2, torch.Generator().manual_seed(2))
    images = ours.decode(x)
    expected = _unpack_and_decode(reference, x)
    assert images.dtype == torch.float32 and images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert torch.equal(images, expected)


def _unpack_and_decode(reference, x):
    """diffusers' own output_type='pt' decode path of QwenImagePipeline.__call__."""
    latents = reference._unpack_latents(x, RESOLUTION, RESOLUTION, reference.vae_scale_factor)
    config = reference.vae.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
    with torch.no_grad():
        image = reference.vae.decode(latents / std + mean, return_dict=False)[0][:, :, 0]
    return reference.image_processor.postprocess(image, output_type="pt")


def test_bf16_encoder_vae_and_backbone(tiny_dir, ours):
    """Reduced-precision components still hand rl/ fp32 tensors, close to the fp32 ones."""
    pipe = QwenImagePipeline.load(str(tiny_dir), device="cpu", encoder_dtype=torch.bfloat16, vae_dtype=torch.bfloat16,
                                  resolution=RESOLUTION, max_sequence_length=MAX_SEQ, negative_prompt=NEGATIVE)
    cond, cond32 = pipe.encode(PROMPTS), ours.encode(PROMPTS)
    for key in cond:
        assert cond[key].dtype == cond32[key].dtype
        torch.testing.assert_close(cond[key].float(), cond32[key].float(), rtol=0.05, atol=0.1)
    x = ours.initial_noise(2, torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7, 0.3])
    spec = get_model_spec("qwen_image")
    v = pipe.velocity(spec.from_pretrained(tiny_dir / "transformer", dtype=torch.bfloat16), x, sigma, cond32, 4.0)
    v32 = ours.velocity(spec.from_pretrained(tiny_dir / "transformer"), x, sigma, cond32, 4.0)
    print("bf16 vs fp32 CFG velocity max |diff|:", (v - v32).abs().max().item(), "scale", v32.abs().max().item())
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, v32, rtol=0.05, atol=0.1 * v32.abs().max().item())
    assert (pipe.decode(x) - ours.decode(x)).abs().mean() < 0.01


def test_tiny_pipeline_is_deterministic_from_seed_and_does_both_tasks():
    a = QwenImagePipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=0)
    b = QwenImagePipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=0)
    c = QwenImagePipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=1)
    ea, eb, ec = (p.encode(["a cat"])["prompt_embeds"] for p in (a, b, c))
    assert torch.equal(ea, eb) and not torch.allclose(ea, ec)
    assert a.condition_area == 64 * 64  # the tiny policy's condition images are the output size
    edit = a.encode(["make it red"], images=[torch.rand(3, 48, 80)])
    assert edit["image_latents"].shape == (1, 4, 8, 12)  # 96 x 64 px: ~64^2 pixels at 5:3, multiples of 32
    assert edit["prompt_embeds"].shape[1] > 0
    # model.condition_size: the source's own area (aspect kept), or diffusers' ~1024^2
    native = QwenImagePipeline.load("", device="cpu", resolution=64, max_sequence_length=8, condition_size="native")
    assert native.condition_size(Image.new("RGB", (96, 80))) == (64, 96)  # 96 x 80 -> sides rounded to 32
    assert native.condition_size(Image.new("RGB", (200, 120))) == (128, 192)
    preferred = QwenImagePipeline.load("", device="cpu", resolution=64, max_sequence_length=8,
                                       condition_size="preferred")
    width, height, _ = diffusers_edit.calculate_dimensions(1024 * 1024, 96 / 80)
    assert preferred.condition_size(Image.new("RGB", (96, 80))) == (height, width) == (928, 1120)
    with pytest.raises(ValueError, match=r"model.condition_size: 'square' is not one of"):
        QwenImagePipeline.load("", device="cpu", resolution=64, max_sequence_length=8, condition_size="square")
    with pytest.raises(ValueError, match=r"a 20 x 12 source image at about 240 pixels rounds to a 32 x 0 condition"):
        native.encode(["make it red"], images=[Image.new("RGB", (20, 12))])


def test_pretrained_defaults_are_the_pipelines(tiny_dir, edit_dir):
    """QwenImagePipeline.__call__: 1024 px (128 x the VAE's 8), 50 steps, true_cfg_scale 4.0, 512 tokens."""
    spec = get_model_spec("qwen_image")
    for directory in (tiny_dir, edit_dir, tiny_dir / "transformer"):  # a bare transformer: the published 8x VAE
        d = spec.config_defaults(str(directory))
        assert (d["model.resolution"], d["model.max_sequence_length"]) == (1024, 512)
        assert (d["sampling.num_steps"], d["sampling.guidance_scale"], d["eval.num_steps"]) == (50, 4.0, 50)
        assert d["optimizer.lr"] == 3e-4
    with pytest.raises(FileNotFoundError, match="model.pretrained_path: .*nowhere' does not exist"):
        spec.config_defaults(str(tiny_dir / "nowhere"))


def test_load_and_encode_errors(tiny_dir, edit_dir, ours, ours_edit, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        QwenImagePipeline.load(str(tmp_path / "nowhere"), device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"text_encoder must hold the Qwen2.5-VL text encoder"):
        QwenImagePipeline.load(str(broken), device="cpu")
    shutil.copytree(tiny_dir / "text_encoder", broken / "text_encoder")
    config_path = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match=r"\['use_karras_sigmas'\] are not supported for Qwen-Image"):
        QwenImagePipeline.load(str(broken), device="cpu")
    config_path.write_text(json.dumps({**config, "use_dynamic_shifting": False}))
    with pytest.raises(ValueError, match="use_dynamic_shifting = true"):
        QwenImagePipeline.load(str(broken), device="cpu")
    with pytest.raises(ValueError, match="model.resolution: 72 must be a positive multiple of 16"):
        QwenImagePipeline.load(str(tiny_dir), device="cpu", resolution=72)
    with pytest.raises(ValueError, match=r"model.max_sequence_length: 2000 must lie in \[1, 1024\]"):
        QwenImagePipeline.load(str(tiny_dir), device="cpu", max_sequence_length=2000)

    with pytest.raises(ValueError, match="text-to-image Qwen-Image directory"):
        ours.encode(["a cat"], images=[torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="Qwen-Image-Edit edits a source image"):
        ours_edit.encode(["a cat"])
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        ours_edit.encode(EDITS, images=sources(1))
    with pytest.raises(ValueError, match=r"must share their condition size .*\(64, 96\), \(96, 64\)"):
        ours_edit.encode(EDITS, images=[sources(1)[0], sources(1)[0].rotate(90, expand=True)])
    with pytest.raises(TypeError, match=r"\(3, H, W\) tensors in \[0, 1\]; got ndarray of shape \(8, 8, 3\)"):
        ours_edit.encode(EDITS[:1], images=[np.zeros((8, 8, 3))])  # a float array: not a uint8 picture


# --- the sample CLI -------------------------------------------------------------------------------


CLI_PROMPTS = ["a photo of a red cat with two blue dogs on a green car in the house, " * 2,
               "a sign that says three four, a tree and a person"]


def _sample_cli(tiny_dir, out_dir, *extra: str) -> np.ndarray:
    """`python -m titan_flow.sample --model qwen_image --pretrained_path` -> uint8 (N, H, W, 3) of its PNGs."""
    argv = ["--model", "qwen_image", "--pretrained_path", str(tiny_dir), "--device", "cpu", "--seed", "5",
            "--out", str(out_dir)]
    argv += [arg for prompt in CLI_PROMPTS for arg in ("--prompt", prompt)]
    proc = subprocess.run([sys.executable, "-m", "titan_flow.sample", *argv, *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(out_dir).glob("*.png"))])


def _diffusers_pngs(reference, prompt=CLI_PROMPTS, **kwargs) -> np.ndarray:
    """diffusers' images as its numpy_to_pil writes them, seeded like the CLI's --seed 5."""
    # true CFG needs a negative prompt in diffusers; the CLI's is sampling.negative_prompt ("" by default)
    out = reference(prompt=prompt, negative_prompt="", generator=torch.Generator().manual_seed(5), output_type="np",
                    **kwargs).images
    return (out * 255).round().astype(np.uint8)


@pytest.mark.slow
def test_sample_cli_reproduces_diffusers_pipeline_with_overrides(tiny_dir, reference, tmp_path):
    """The CLI's PNGs = QwenImagePipeline(prompts, generator) at a small size: within 1 uint8 level (slow: a
    fresh interpreter; the sampling itself is the ODE parity test's)."""
    expected = _diffusers_pngs(reference, height=64, width=64, num_inference_steps=8, max_sequence_length=32)
    ours = _sample_cli(tiny_dir, tmp_path / "small", "--resolution", "64", "--steps", "8", "--max_sequence_length", "32")
    assert ours.shape == expected.shape == (2, 64, 64, 3)
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI vs QwenImagePipeline (64 px, 8 steps, true CFG 4): max {level_diff} uint8 levels")
    assert expected.std() > 5 and level_diff <= 1
    # The test can fail: without true CFG, or with the prompts cut to 8 tokens, diffusers' PNGs differ.
    for other in (dict(true_cfg_scale=1.0), dict(max_sequence_length=8)):
        changed = _diffusers_pngs(reference, **{**dict(height=64, width=64, num_inference_steps=8,
                                                         max_sequence_length=32), **other})
        assert np.abs(changed.astype(int) - ours.astype(int)).max() > 1, other


@pytest.mark.slow
def test_sample_cli_reproduces_diffusers_pipeline_at_its_defaults(tiny_dir, reference, tmp_path):
    """At QwenImagePipeline's defaults (1024 px, 50 steps, true CFG 4.0, 512 tokens), like the SD3 test: the
    tiny model's 4096 image tokens take about 4 minutes per run on 2 cores, hence slow."""
    expected = _diffusers_pngs(reference)
    ours = _sample_cli(tiny_dir, tmp_path / "defaults")
    assert ours.shape == expected.shape == (2, 1024, 1024, 3)
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI vs QwenImagePipeline at its defaults: max {level_diff} uint8 levels")
    assert expected.std() > 5 and level_diff <= 1


SHARED_COUNTING_EDIT = REPO.parent / "shared" / "datasets" / "counting_edit_test_metadata.jsonl"


@pytest.mark.skipif(not SHARED_COUNTING_EDIT.is_file(), reason=f"{SHARED_COUNTING_EDIT} is absent (../shared not here)")
def test_edit_encodes_the_reference_counting_edit_rows(ours_edit, tmp_path):
    """The real counting_edit test rows (fixture pictures standing in for generated_images/, 1024 x 1024 like the
    reference's) through the data loader into Qwen-Image-Edit's conditioning: each edit its own source, in the
    vision tokens and in the condition latents."""
    from titan_flow.data.loader import build_loader
    from titan_flow.data.prompts import load_prompt_dataset
    from titan_flow.data.sampler import KRepeatSampler

    folder = tmp_path / "counting_edit"
    (folder / "generated_images").mkdir(parents=True)
    shutil.copy(SHARED_COUNTING_EDIT, folder / "test_metadata.jsonl")
    rows = [json.loads(line) for line in (folder / "test_metadata.jsonl").read_text().splitlines()]
    for i, name in enumerate(sorted({r["image"] for r in rows})):
        Image.new("RGB", (1024, 1024), (40 + i, 255 - i, 7 * i % 256)).save(folder / name, format="JPEG")
    dataset = load_prompt_dataset(str(folder), "test")
    batch = next(iter(build_loader(dataset, KRepeatSampler(len(dataset), 4, 1, 1, 0, 0), num_workers=0, seed=0)))
    assert all(r["tag"] == "counting" for r in batch.metadata) and all(im.shape == (3, 1024, 1024) for im in batch.images)
    assert batch.keys == [f"{m['prompt']}_{m['image']}" for m in batch.metadata]  # the reference's group key
    cond = ours_edit.encode(batch.prompts, images=batch.images)
    assert cond["image_latents"].shape == (4, 4, 8, 8)  # square sources at ~96 x 64 px area: 64 x 64 px
    distinct = {m["image"] for m in batch.metadata}
    assert len({tuple(t.flatten()[:8].tolist()) for t in cond["image_latents"]}) == len(distinct)
    # the vision tokens see the source too: the same instruction on another source encodes differently
    other = ours_edit.encode(batch.prompts[:1], images=[Image.new("RGB", (1024, 1024), "gray")])
    mine = {k: v[:1] for k, v in ours_edit.encode(batch.prompts[:1], images=batch.images[:1]).items()}
    assert other["prompt_embeds"].shape == mine["prompt_embeds"].shape
    assert not torch.allclose(other["prompt_embeds"], mine["prompt_embeds"])


@pytest.mark.slow  # one CLI run: the source at diffusers' ~1024^2 condition area is ~2,700 tokens of the tiny model
def test_sample_cli_edits_like_diffusers_qwen_image_edit(edit_dir, reference_edit, tmp_path):
    """`sample --image src.png` with a Qwen-Image-Edit directory = QwenImageEditPipeline(image=src) within 1 uint8
    level: the source at diffusers' own condition area (not this file's CPU-sized one), true CFG, a source |
    edited PNG beside the result."""
    source = tmp_path / "source.png"
    sources(1)[0].save(source)
    edit, steps, cfg = EDITS[1], 4, 4.0

    def diffusers_edit(image: Image.Image) -> np.ndarray:
        return _diffusers_pngs(reference_edit, edit, image=image, height=RESOLUTION, width=RESOLUTION,
                               num_inference_steps=steps, true_cfg_scale=cfg)[0]

    expected = diffusers_edit(Image.open(source).convert("RGB"))
    out = tmp_path / "edits"
    argv = ["--model", "qwen_image", "--pretrained_path", str(edit_dir), "--device", "cpu", "--seed", "5",
            "--out", str(out), "--image", str(source), "--prompt", edit, "--resolution", str(RESOLUTION),
            "--steps", str(steps), "--guidance", str(cfg)]
    proc = subprocess.run([sys.executable, "-m", "titan_flow.sample", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (edited,) = [p for p in out.glob("*.png") if not p.stem.endswith("_source_edited")]
    ours = np.asarray(Image.open(edited))
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI --image vs QwenImageEditPipeline: max {level_diff} uint8 levels")
    assert ours.shape == expected.shape == (RESOLUTION, RESOLUTION, 3) and expected.std() > 5
    assert level_diff <= 1
    pair = np.asarray(Image.open(edited.with_name(edited.stem + "_source_edited.png")))
    assert pair.shape == (RESOLUTION, 2 * RESOLUTION, 3) and np.array_equal(pair[:, RESOLUTION:], ours)
    # the test can fail: with another source (a grey one of the same size) diffusers' edit differs
    other = diffusers_edit(Image.new("RGB", Image.open(source).size, "gray"))
    assert np.abs(other.astype(int) - ours.astype(int)).max() > 1
