"""FluxPipeline (the Policy glue) against diffusers' FluxPipeline and FluxKontextPipeline on tiny random pipelines."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers import FluxPipeline as DiffusersFluxPipeline
from PIL import Image

from titan_flow.models import get_model_spec
from titan_flow.models.common.schedules import flux_mu
from titan_flow.models.flux.pipeline import FluxPipeline, build_tiny_flux_pipeline_dir, pretrained_defaults
from titan_flow.rl.rollout import sample_trajectory

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 64  # latent 8x8 -> 4x4 = 16 packed tokens
MAX_SEQ = 24
NUM_STEPS = 6
PROMPTS = [
    "a photo of a red cat",
    # Long enough to be truncated by CLIP (77 tokens) and by T5 (MAX_SEQ tokens).
    "Zebra crossing with two blue dogs, " * 12,
]
REL_TOL = 1e-4


class DiffusersBackbone(torch.nn.Module):
    """diffusers' FluxTransformer2DModel behind our backbone's call signature (returns the tensor)."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, **inputs):
        return self.transformer(**inputs, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm()).item()


def source_images(height: int, width: int, n: int = 2, seed: int = 0) -> list[Image.Image]:
    """Smooth random pictures (a VAE sees structure, not white noise), `width` x `height`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return [Image.fromarray(a).resize((width, height), Image.BILINEAR) for a in small]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux")
    return {"t2i": build_tiny_flux_pipeline_dir(root / "t2i", seed=0),
            "kontext": build_tiny_flux_pipeline_dir(root / "kontext", seed=0, kontext=True)}


@pytest.fixture(scope="module")
def ours(dirs):
    return FluxPipeline.load(str(dirs["t2i"]), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ)


@pytest.fixture(scope="module")
def reference(dirs):
    pipe = DiffusersFluxPipeline.from_pretrained(dirs["t2i"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference_kontext(dirs):
    pipe = FluxKontextPipeline.from_pretrained(dirs["kontext"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["diffusers", "titan_flow"])
def backbone(request, dirs, reference):
    """The velocity model: diffusers' (isolates the glue) and our port loaded from the same weights."""
    if request.param == "diffusers":
        return DiffusersBackbone(reference.transformer).eval()
    return get_model_spec("flux").from_pretrained(dirs["t2i"] / "transformer", dtype=torch.float32).eval()


def test_encode_shapes_and_diffusers_parity(ours, reference):
    cond = ours.encode(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, 32) and cond["pooled_prompt_embeds"].shape == (2, 24)
    assert all(t.dtype == torch.float32 for t in cond.values())
    assert (cond["prompt_embeds"][0] - cond["prompt_embeds"][1]).abs().amax() > 0.1
    with torch.no_grad():
        embeds, pooled, text_ids = reference.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=MAX_SEQ)
    diffs = {"prompt_embeds": (cond["prompt_embeds"] - embeds).abs().max().item(),
             "pooled_prompt_embeds": (cond["pooled_prompt_embeds"] - pooled).abs().max().item()}
    print("encode max abs diff vs diffusers:", diffs)
    assert max(diffs.values()) == 0.0 and torch.equal(text_ids, torch.zeros(MAX_SEQ, 3))


def test_initial_noise_matches_diffusers_prepare_latents(ours, reference):
    assert ours.latent_shape == (16, 16)
    noise = ours.initial_noise(3, torch.Generator().manual_seed(7))
    expected, ids = reference.prepare_latents(3, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu",
                                              torch.Generator().manual_seed(7))
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
    assert torch.equal(ours.image_ids, ids)
    seeds = [3, 3, 5]  # one generator per sample (same_latent): sample i depends only on generator i
    noise = ours.initial_noise(3, [torch.Generator().manual_seed(s) for s in seeds])
    expected, _ = reference.prepare_latents(3, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu",
                                            [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(noise, expected) and torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    with pytest.raises(ValueError, match="got 2 generators for 3 samples"):
        ours.initial_noise(3, [torch.Generator(), torch.Generator()])


def test_sigmas_match_diffusers_scheduler(dirs, ours, reference):
    """linspace(1, 1/T, T) shifted by mu(16 tokens), bitwise the scheduler's (mu from the target tokens only)."""
    for num_steps in (NUM_STEPS, 28, 1000):
        reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=flux_mu(16))
        assert torch.equal(ours.sigmas(num_steps), reference.scheduler.sigmas)
    big = FluxPipeline.load(str(dirs["t2i"]), device="cpu", resolution=1024)
    reference.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=1.15)  # 4096 tokens: mu = max_shift
    assert torch.equal(big.sigmas(6), reference.scheduler.sigmas)


def _run_reference(pipe, latents, guidance, output_type, **extra):
    with torch.no_grad():
        return pipe(prompt=PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=NUM_STEPS,
                    guidance_scale=guidance, latents=latents.clone(), max_sequence_length=MAX_SEQ,
                    output_type=output_type, **extra).images


def test_ode_sampling_reproduces_diffusers(ours, reference, backbone):
    """THE parity test: noise level 0 through our rollout = diffusers' FluxPipeline output."""
    initial = ours.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    cond = ours.encode(PROMPTS)
    trajectory = sample_trajectory(ours, backbone, cond, initial, ours.sigmas(NUM_STEPS), [0.0] * NUM_STEPS, "sde", 3.5)
    latents = trajectory.latents[:, -1]
    images = ours.decode(latents)
    expected_latents = _run_reference(reference, initial, 3.5, "latent")
    expected_images = _run_reference(reference, initial, 3.5, "pt")
    latent_err, image_err = rel_err(latents, expected_latents), rel_err(images, expected_images)
    print(f"ODE parity ({type(backbone).__name__}): latents rel err {latent_err:.3g}, images rel err {image_err:.3g} "
          f"(max |diff| {(images - expected_images).abs().max():.3g})")
    assert images.shape == expected_images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert (latents - initial).abs().max() > 1.0  # the trajectory moved far from the noise
    assert latent_err <= REL_TOL and image_err <= REL_TOL
    # The guidance embedding is live: another scale gives another image.
    other = sample_trajectory(ours, backbone, cond, initial, ours.sigmas(NUM_STEPS), [0.0] * NUM_STEPS, "sde", 1.0)
    assert (other.latents[:, -1] - latents).abs().max() > 1e-3


@pytest.fixture(scope="module")
def kontext_backbone(dirs):
    return get_model_spec("flux").from_pretrained(dirs["kontext"] / "transformer", dtype=torch.float32).eval()


@pytest.mark.parametrize("condition_size", ["native", "resolution"])
def test_kontext_ode_sampling_reproduces_diffusers(dirs, reference_kontext, kontext_backbone, condition_size):
    """Kontext: 96x64 (h x w) source images, a 64x64 target. "native" keeps the condition at its own size
    (6x4 condition tokens next to 4x4 target tokens; diffusers with _auto_resize=False); "resolution" is
    flow_grpo's rule (bicubic to the target's square first)."""
    pipe = FluxPipeline.load(str(dirs["kontext"]), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ,
                             condition_size=condition_size)
    assert pipe.kontext
    images_in = source_images(96, 64)
    cond = pipe.encode(PROMPTS, images=images_in)
    n_cond = 24 if condition_size == "native" else 16
    assert cond["condition_latents"].shape == (2, n_cond, 16) and cond["condition_ids"].shape == (2, n_cond, 3)
    assert torch.all(cond["condition_ids"][..., 0] == 1) and cond["condition_ids"][0, -1].tolist() == (
        [1.0, 5.0, 3.0] if condition_size == "native" else [1.0, 3.0, 3.0])
    initial = pipe.initial_noise(2, torch.Generator().manual_seed(0))
    trajectory = sample_trajectory(pipe, kontext_backbone, cond, initial, pipe.sigmas(NUM_STEPS), [0.0] * NUM_STEPS,
                                   "sde", 2.5)
    latents = trajectory.latents[:, -1]
    reference_input = images_in if condition_size == "native" else [
        im.resize((RESOLUTION, RESOLUTION), Image.BICUBIC) for im in images_in]
    kwargs = dict(image=reference_input, max_area=RESOLUTION**2, _auto_resize=False)
    expected_latents = _run_reference(reference_kontext, initial, 2.5, "latent", **kwargs)
    expected_images = _run_reference(reference_kontext, initial, 2.5, "pt", **kwargs)
    images = pipe.decode(latents)
    latent_err, image_err = rel_err(latents, expected_latents), rel_err(images, expected_images)
    print(f"Kontext ODE parity ({condition_size}): latents rel err {latent_err:.3g}, images rel err {image_err:.3g}")
    assert latent_err <= REL_TOL and image_err <= REL_TOL
    assert (latents - initial).abs().max() > 1.0
    # The source image steers the edit: another source, another result.
    other = pipe.encode(PROMPTS, images=source_images(96, 64, seed=1))
    moved = sample_trajectory(pipe, kontext_backbone, other, initial, pipe.sigmas(NUM_STEPS), [0.0] * NUM_STEPS,
                              "sde", 2.5).latents[:, -1]
    assert (moved - latents).abs().max() > 1e-3  # the tiny random model moves ~7e-3; fp32 noise is ~1e-6


def test_kontext_preferred_condition_size_is_diffusers_default(dirs, reference_kontext):
    """model.condition_size = "preferred": the ~1 MP size diffusers picks by default (_auto_resize), seen through
    the position ids its transformer receives (one denoising step)."""
    pipe = FluxPipeline.load(str(dirs["kontext"]), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ,
                             condition_size="preferred")
    image = source_images(200, 300, n=1)[0]  # aspect 3:2
    assert pipe.condition_hw(image) == (832, 1248)
    seen = {}

    def record(module, args, kwargs):
        seen["ids"] = kwargs["img_ids"]

    hook = reference_kontext.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            reference_kontext(prompt=PROMPTS[:1], image=image, height=RESOLUTION, width=RESOLUTION,
                              max_area=RESOLUTION**2, num_inference_steps=1, max_sequence_length=MAX_SEQ,
                              output_type="latent")
    finally:
        hook.remove()
    cond = pipe.encode(PROMPTS[:1], images=[image])
    assert torch.equal(seen["ids"][16:], cond["condition_ids"][0])
    assert cond["condition_ids"].shape[1] == (832 // 16) * (1248 // 16)


def test_velocity_cuts_condition_tokens_and_is_differentiable(dirs, kontext_backbone):
    pipe = FluxPipeline.load(str(dirs["kontext"]), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ)
    cond = pipe.encode(PROMPTS, images=source_images(64, 64))
    x = pipe.initial_noise(2, torch.Generator().manual_seed(1)).requires_grad_(True)
    sigma = torch.tensor([0.9, 0.4])
    v = pipe.velocity(kontext_backbone, x, sigma, cond, 2.5)
    assert v.shape == x.shape == (2, 16, 16) and v.dtype == torch.float32
    with torch.no_grad():  # rollout (no grad) and training (grad) agree bit for bit: on-policy ratio 1
        assert torch.equal(pipe.velocity(kontext_backbone, x, sigma, cond, 2.5), v)
        # Each sample's velocity depends on its own batch row only (the slicing rl/ does).
        half = {k: t[1:] for k, t in cond.items()}
        torch.testing.assert_close(pipe.velocity(kontext_backbone, x[1:], sigma[1:], half, 2.5), v[1:],
                                   rtol=0, atol=1e-5)
    v.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in kontext_backbone.parameters())
    kontext_backbone.zero_grad(set_to_none=True)


def test_encode_errors(dirs, ours):
    with pytest.raises(ValueError, match="FLUX.1-dev is text-to-image: encode\\(\\) takes no images"):
        ours.encode(["a cat"], images=source_images(64, 64, n=1))
    native = FluxPipeline.load(str(dirs["kontext"]), device="cpu", resolution=RESOLUTION, condition_size="native")
    with pytest.raises(ValueError, match="one source image per prompt: got no images for 2 prompts"):
        native.encode(PROMPTS)
    with pytest.raises(ValueError, match="one source image per prompt: got 1 images for 2 prompts"):
        native.encode(PROMPTS, images=source_images(64, 64, n=1))
    mixed = [source_images(64, 64, n=1)[0], source_images(96, 64, n=1)[0]]
    with pytest.raises(ValueError, match=r"map to different sizes \[\(64, 64\), \(96, 64\)\]"):
        native.encode(PROMPTS, images=mixed)
    with pytest.raises(ValueError, match="smaller than one 16x16 token"):
        native.encode(PROMPTS[:1], images=source_images(8, 64, n=1))
    with pytest.raises(TypeError, match="conditioning images must be PIL images"):
        native.encode(PROMPTS[:1], images=[np.zeros((4, 4), dtype=np.float32)])


def test_tiny_pipeline_is_deterministic_from_seed():
    a, b = (FluxPipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=0) for _ in range(2))
    c = FluxPipeline.load("", device="cpu", resolution=64, max_sequence_length=8, seed=1)
    ea, eb, ec = (p.encode(["a cat"])["prompt_embeds"] for p in (a, b, c))
    assert torch.equal(ea, eb) and not torch.allclose(ea, ec)
    assert not a.kontext and FluxPipeline.load("", device="cpu", resolution=64, flavor="kontext-debug").kontext


def test_load_errors_and_defaults(dirs, tmp_path):
    assert pretrained_defaults(str(dirs["t2i"])) == pretrained_defaults(str(dirs["kontext"])) == {
        "model.resolution": 1024, "model.max_sequence_length": 512, "sampling.num_steps": 28,
        "sampling.guidance_scale": 3.5, "eval.num_steps": 28, "eval.guidance_scale": 3.5, "optimizer.lr": 3e-4}
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        FluxPipeline.load(str(tmp_path / "nowhere"), device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(dirs["t2i"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2 must hold the T5 text encoder"):
        FluxPipeline.load(str(broken), device="cpu")
    shutil.copytree(dirs["t2i"] / "text_encoder_2", broken / "text_encoder_2")
    config_path = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dynamic_shifting": False}))
    with pytest.raises(ValueError, match="FLUX samples with use_dynamic_shifting = true"):
        FluxPipeline.load(str(broken), device="cpu")
    config_path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match=r"\['use_karras_sigmas'\] are not supported for FLUX"):
        FluxPipeline.load(str(broken), device="cpu")
    config_path.write_text(json.dumps(config))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="names 'StableDiffusion3Pipeline'; the flux family loads FluxPipeline"):
        FluxPipeline.load(str(broken), device="cpu")
    with pytest.raises(ValueError, match="model.resolution: 72 must be a positive multiple of 16"):
        FluxPipeline.load(str(dirs["t2i"]), device="cpu", resolution=72)
    with pytest.raises(ValueError, match="T5 reads 1 to 512 tokens, got 600"):
        FluxPipeline.load(str(dirs["t2i"]), device="cpu", max_sequence_length=600)
    with pytest.raises(ValueError, match="sampling.negative_prompt: FLUX.1-dev is guidance-distilled"):
        FluxPipeline.load("", device="cpu", negative_prompt="blurry")
    with pytest.raises(ValueError, match="tiny text encoders and VAE for the 'debug' and 'kontext-debug' flavors"):
        FluxPipeline.load("", device="cpu", flavor="flux.1-dev")
    with pytest.raises(ValueError, match="model.condition_size: 'huge' is not one of"):
        FluxPipeline.load("", device="cpu", condition_size="huge")


def _sample_cli(pipe_dir, out_dir, *extra: str) -> np.ndarray:
    """`python -m titan_flow.sample --model flux --pretrained_path` -> uint8 (N, H, W, 3) of its PNGs."""
    argv = ["--model", "flux", "--pretrained_path", str(pipe_dir), "--device", "cpu", "--seed", "5", "--out", str(out_dir)]
    argv += [arg for prompt in CLI_PROMPTS for arg in ("--prompt", prompt)]
    proc = subprocess.run([sys.executable, "-m", "titan_flow.sample", *argv, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(out_dir).glob("*.png"))])


CLI_PROMPTS = [  # more than 16 T5 tokens each (the debug job's text length)
    "a photo of a red cat with two blue dogs on a green car in the house, " * 2,
    "a sign that says three four, a tree and a person with an image of the dog",
]


def _diffusers_uint8(reference, **kwargs) -> np.ndarray:
    images = reference(CLI_PROMPTS, generator=torch.Generator().manual_seed(5), output_type="np", **kwargs).images
    return (images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil


def test_sample_cli_reproduces_diffusers_pipeline(dirs, reference, tmp_path):
    """The CLI's PNGs = FluxPipeline(prompts, generator) at a small size: within 1 uint8 level."""
    small = dict(height=RESOLUTION, width=RESOLUTION, num_inference_steps=4, max_sequence_length=MAX_SEQ)
    expected = _diffusers_uint8(reference, **small)
    ours = _sample_cli(dirs["t2i"], tmp_path / "small", "--resolution", str(RESOLUTION), "--steps", "4",
                       "--max_sequence_length", str(MAX_SEQ))
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI vs FluxPipeline (64 px, 4 steps): max {level_diff} uint8 levels")
    assert ours.shape == expected.shape == (2, RESOLUTION, RESOLUTION, 3) and expected.std() > 10
    assert level_diff <= 1
    # The test can fail: diffusers at another guidance scale is many levels away from the CLI's images.
    other = _diffusers_uint8(reference, **small, guidance_scale=1.0)
    assert np.abs(ours.astype(int) - other.astype(int)).max() > 1


@pytest.mark.slow  # 1024 x 1024, 28 steps: about 2 x 50 s on 2 CPU cores
def test_sample_cli_reproduces_diffusers_pipeline_at_its_defaults(dirs, reference, tmp_path):
    """At FluxPipeline's own defaults (1024 px = 128 x the VAE's 8, 28 steps, guidance 3.5, 512 T5 tokens)."""
    expected = _diffusers_uint8(reference)
    ours = _sample_cli(dirs["t2i"], tmp_path / "defaults")
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI vs FluxPipeline at its defaults: max {level_diff} uint8 levels")
    assert ours.shape == expected.shape == (2, 1024, 1024, 3) and expected.std() > 10
    assert level_diff <= 1


@pytest.mark.slow  # one CLI run (~25 s): the wiring the default-suite text-to-image CLI test covers, plus --image
def test_sample_cli_edits_like_diffusers_kontext_and_shows_source_beside_edit(dirs, reference_kontext, tmp_path):
    """`sample --image src.png` with a FLUX.1-Kontext directory = FluxKontextPipeline(image=src) within 1 uint8 level
    (a 96 x 64 source kept at its own size, a 64 x 64 edit), and a source | edited PNG beside each result."""
    source = tmp_path / "source.png"
    source_images(96, 64, n=1)[0].save(source)
    expected = reference_kontext(prompt=CLI_PROMPTS, image=Image.open(source), height=RESOLUTION, width=RESOLUTION,
                                 max_area=RESOLUTION**2, _auto_resize=False, num_inference_steps=4, guidance_scale=2.5,
                                 max_sequence_length=MAX_SEQ, generator=torch.Generator().manual_seed(5),
                                 output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)
    out = tmp_path / "edits"
    argv = ["--model", "flux", "--pretrained_path", str(dirs["kontext"]), "--device", "cpu", "--seed", "5",
            "--out", str(out), "--image", str(source), "--resolution", str(RESOLUTION), "--steps", "4",
            "--max_sequence_length", str(MAX_SEQ), "--guidance", "2.5", "--condition_size", "native"]
    argv += [arg for prompt in CLI_PROMPTS for arg in ("--prompt", prompt)]
    proc = subprocess.run([sys.executable, "-m", "titan_flow.sample", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    edits = sorted(p for p in out.glob("*.png") if not p.stem.endswith("_source_edited"))
    ours = np.stack([np.asarray(Image.open(p)) for p in edits])
    level_diff = np.abs(ours.astype(int) - expected.astype(int)).max()
    print(f"sample CLI --image vs FluxKontextPipeline: max {level_diff} uint8 levels")
    assert ours.shape == expected.shape == (2, RESOLUTION, RESOLUTION, 3) and expected.std() > 10
    assert level_diff <= 1
    for edit in edits:
        pair = np.asarray(Image.open(edit.with_name(edit.stem + "_source_edited.png")))
        assert pair.shape == (RESOLUTION, 2 * RESOLUTION, 3)
        assert np.array_equal(pair[:, RESOLUTION:], np.asarray(Image.open(edit)))


SHARED_COUNTING_EDIT = REPO.parent / "shared" / "datasets" / "counting_edit_test_metadata.jsonl"


@pytest.mark.skipif(not SHARED_COUNTING_EDIT.is_file(), reason=f"{SHARED_COUNTING_EDIT} is absent (../shared not here)")
def test_kontext_encodes_the_reference_counting_edit_rows(dirs, tmp_path):
    """The real counting_edit test rows (fixture pictures standing in for generated_images/, 1024 x 1024 like the
    reference's) through the data loader into Kontext's condition tokens: each edit its own source."""
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
    pipe = FluxPipeline.load(str(dirs["kontext"]), device="cpu", resolution=RESOLUTION, max_sequence_length=MAX_SEQ)
    cond = pipe.encode(batch.prompts, images=batch.images)
    assert cond["condition_latents"].shape == (4, 16, 16)  # 512 -> 64 px here: 4 x 4 condition tokens each
    distinct = {m["image"] for m in batch.metadata}
    assert len({tuple(t.flatten()[:8].tolist()) for t in cond["condition_latents"]}) == len(distinct)
