"""Bagel as a Policy: loading a Bagel directory, prompt KV caches, CFG, the on-policy ratio, FSDP."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from titan_flow.config import ConfigError, JobConfig
from titan_flow.models import get_model_spec
from titan_flow.models.bagel.args import FLAVORS
from titan_flow.models.bagel.model import Bagel, KVCache, LatentSplit, TextSplit, patchify_latents, unpatchify_latents
from titan_flow.models.bagel.parallelize import parallelize_bagel, select_trainable
from titan_flow.models.bagel.pipeline import (
    AE_NAME,
    BagelPipeline,
    bagel_resize,
    byte_level_tokenizer,
    guide,
    load_flux_vae,
    tiny_flux_vae,
)
from titan_flow.models.bagel.state_dict_adapter import from_pretrained, save_pretrained
from titan_flow.rl.metrics import first_images
from titan_flow.rl.rollout import generate_images, sample_trajectory, step_noise_levels
from titan_flow.models.common.schedules import shifted_linear_sigmas
from titan_flow.rl.sde import sde_step

ARGS = FLAVORS["debug"]
RESOLUTION = 48  # a 3 x 3 grid of latent tokens
PROMPTS = ["a red cat", "two dogs", "a red cat", "a red cat"]


def random_model(seed: int = 0) -> Bagel:
    torch.manual_seed(seed)
    model = get_model_spec("bagel").build("debug")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name and p.ndim == 1 else 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pipe():
    return BagelPipeline.load("", device="cpu", resolution=RESOLUTION, max_sequence_length=16)


def noise(n, seed=0):
    """Latents of a batch on the 3 x 3 token grid: (n, 3, 3, 4 * C)."""
    return torch.randn(n, 3, 3, ARGS.patch_latent_dim, generator=torch.Generator().manual_seed(seed))


def denoise(model, cache, contexts, x, t, grid=(3, 3)):
    """The backbone's velocity of (n, h, w, D) latents, in the pipeline's layout."""
    return model.denoise(cache, contexts, x.flatten(1, 2), t, grid).unflatten(1, grid)


# --- a Bagel directory on disk ---------------------------------------------------------------------


def diffusers_vae_to_bfl(state_dict: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the BFL layout of Bagel's ae.safetensors (to write test files)."""
    renames = [
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"conv_shortcut", "nin_shortcut"),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # BFL keeps the attention projections as 1x1 convolutions
        out[key] = value.contiguous()
    return out


def write_bagel_dir(root, model: Bagel, vae) -> None:
    save_pretrained(model.state_dict(), model.args, root)
    byte_level_tokenizer().save_pretrained(root)
    save_file(diffusers_vae_to_bfl(vae.state_dict(), len(vae.config.block_out_channels)), str(root / AE_NAME))


def test_tokenizer_vae_and_weights_load_from_a_bagel_directory(tmp_path):
    model = random_model(seed=1)
    vae = tiny_flux_vae(ARGS.latent_channels, seed=2)
    with torch.no_grad():
        for p in vae.parameters():  # make norms and biases non-trivial so a key mix-up shows
            p.add_(0.05 * torch.randn_like(p))
    write_bagel_dir(tmp_path, model, vae)

    loaded_vae = load_flux_vae(tmp_path / AE_NAME)
    assert loaded_vae.config.latent_channels == ARGS.latent_channels
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded_vae.state_dict()[key], value), key

    pipe = BagelPipeline.load(str(tmp_path), device="cpu", resolution=RESOLUTION, max_sequence_length=16)
    ids = pipe.text_ids("a cat \u00e9")
    assert ids[0] == ARGS.bos_token_id and ids[-1] == ARGS.eos_token_id
    assert pipe.tokenizer.decode(ids[1:-1]) == "a cat \u00e9"

    loaded = from_pretrained(tmp_path)
    assert loaded.args == ARGS  # special token ids read back from tokenizer.json
    cond = pipe.encode(["a cat"], model=loaded)
    x = pipe.initial_noise(1, torch.Generator().manual_seed(0))
    v = pipe.velocity(loaded, x, torch.tensor([0.7]), cond, 4.0)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    images = pipe.decode(x)
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION) and images.min() >= 0 and images.max() <= 1


def test_pipeline_rejects_what_bagel_cannot_do(tmp_path, pipe):
    with pytest.raises(ValueError, match="negative_prompt: Bagel's unconditional branch is the empty context"):
        BagelPipeline.load("", device="cpu", negative_prompt="blurry")
    with pytest.raises(FileNotFoundError, match="ae.safetensors does not exist"):
        BagelPipeline.load(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="resolution: 40 must be a positive multiple of 16"):
        BagelPipeline.load("", device="cpu", resolution=40)
    with pytest.raises(ValueError, match=r"encode\(prompts, model=model\)"):
        pipe.encode(["a cat"])
    other = Bagel.__new__(Bagel)
    torch.nn.Module.__init__(other)
    other.args = FLAVORS["7b_mot"]
    with pytest.raises(ValueError, match="special tokens disagree with the model's args"):
        pipe.encode(["a cat"], model=other)


# --- conditioning and CFG ----------------------------------------------------------------------------


def test_group_members_share_one_prompt_context(pipe):
    model = random_model()
    cond = pipe.encode(PROMPTS, model=model)
    cache = cond["cache"]
    assert cache.num_contexts == 3  # two distinct prompts and the empty unconditional context
    assert cond["cond_context"].tolist() == [0, 1, 0, 0]
    assert cache.lens[2] == 0 and cache.lens[0] == len(pipe.text_ids("a red cat"))
    x = noise(1).expand(4, -1, -1, -1)
    v = pipe.velocity(model, x, torch.full((4,), 0.8), cond, 4.0)
    torch.testing.assert_close(v[2], v[0], rtol=0, atol=1e-5)
    assert not torch.allclose(v[1], v[0])


def test_velocity_is_bagels_cfg_with_per_sample_global_renorm(pipe):
    model = random_model()
    cond = pipe.encode(PROMPTS[:2], model=model)
    x, t = noise(2, seed=3), torch.tensor([0.9, 0.9])
    with torch.no_grad():
        v = pipe.velocity(model, x, t, cond, 4.0)
        v_cond = denoise(model, cond["cache"], [0, 1], x, t)
        v_uncond = denoise(model, cond["cache"], [2, 2], x, t)
        alone = pipe.velocity(model, x[1:], t[1:], {k: v if k in ("cache", "grid") else v[1:] for k, v in cond.items()}, 4.0)
    guided = v_uncond + 4.0 * (v_cond - v_uncond)
    for i in range(2):  # v' rescaled so its norm never exceeds the conditional velocity's, sample by sample
        scale = min(1.0, (v_cond[i].norm() / guided[i].norm()).item())
        torch.testing.assert_close(v[i], guided[i] * scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], v[1], rtol=0, atol=1e-5)  # independent of the batch
    torch.testing.assert_close(pipe.velocity(model, x, t, cond, 1.0), v_cond, rtol=0, atol=1e-5)


def test_cfg_interval_switches_guidance_per_sample():
    model = random_model()
    pipe = BagelPipeline.load("", device="cpu", resolution=RESOLUTION, cfg_interval=(0.4, 1.0))
    cond = pipe.encode(PROMPTS[:2], model=model)
    x, t = noise(2, seed=4), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v = pipe.velocity(model, x, t, cond, 4.0)
        v_cond = denoise(model, cond["cache"], [0, 1], x, t)
    assert not torch.allclose(v[0], v_cond[0])
    torch.testing.assert_close(v[1], v_cond[1], rtol=0, atol=1e-5)  # 0.3 is outside (0.4, 1]


def test_guide_renormalises_only_downwards():
    v_cond, v_uncond = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    out = guide(v_cond, v_uncond, None, 4.0, 1.0, renorm_min=0.0)
    norms = torch.linalg.vector_norm(out, dim=(1, 2))
    assert torch.all(norms <= torch.linalg.vector_norm(v_cond, dim=(1, 2)) * (1 + 1e-6))
    off = guide(v_cond, v_uncond, None, 4.0, 1.0, renorm_min=1.0)  # clamp(., 1, 1): no renorm
    torch.testing.assert_close(off, v_uncond + 4.0 * (v_cond - v_uncond))


def test_editing_uses_image_text_and_image_only_contexts():
    model = random_model()
    pipe = BagelPipeline.load("", device="cpu", resolution=RESOLUTION, image_guidance_scale=1.5)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), torch.rand(3, 24, 24)]
    prompts = ["make it blue", "add a hat"]
    cond = pipe.encode(prompts, images=images, model=model)
    cache = cond["cache"]
    assert cache.num_contexts == 6
    text_lens = [len(pipe.text_ids(p)) for p in prompts]
    image_lens = [cache.lens[2], cache.lens[3]]
    assert [cache.lens[0], cache.lens[1]] == [image_lens[0] + text_lens[0], image_lens[1] + text_lens[1]]
    assert [cache.lens[4], cache.lens[5]] == text_lens
    assert cache.positions[:2] == [2 + n for n in text_lens]  # VAE image and ViT image take one position each

    # The context is [VAE latents | ViT image | text], built split by split, from the sources resized as
    # Bagel does: both fit 48 px on the long side and 24 on the short one in multiples of 16, so 32 x 32.
    sources = pipe.edit_sources(images)
    assert [im.size for im in sources] == [(32, 32), (32, 32)] and cond["grid"] == (2, 2)
    with torch.no_grad():
        manual = model.extend(KVCache.empty(2), [0, 1], pipe._latent_splits(sources))
        manual = model.extend(manual, [0, 1], pipe._vit_splits(model, sources))
        manual = model.extend(manual, [0, 1], [TextSplit(pipe.text_ids(p)) for p in prompts])
    assert all(torch.equal(a, b) for a, b in zip(manual.keys, cache.select([0, 1]).keys))

    x, t = pipe.initial_noise(2, torch.Generator().manual_seed(5), cond), torch.tensor([0.6, 0.6])
    assert x.shape == (2, 2, 2, ARGS.patch_latent_dim)
    with torch.no_grad():
        v = pipe.velocity(model, x, t, cond, 4.0)
        branches = [denoise(model, cache, ctx, x, t, (2, 2)) for ctx in ([0, 1], [2, 3], [4, 5])]
    torch.testing.assert_close(v, guide(*branches, 4.0, 1.5, 0.0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="got 1 images for 2 prompts"):
        pipe.encode(prompts, images=images[:1], model=model)


def test_bagel_resize_is_image_transform_1024_512_16():
    """Bagel's MaxLongEdgeMinShortEdgeResize, worked by hand: (height, width) in, (height, width) out."""
    assert bagel_resize(800, 1200, 1024, 512, 16) == (688, 1024)  # long side to 1024; 682.7 -> 683 -> 688
    assert bagel_resize(300, 200, 1024, 512, 16) == (768, 512)  # the short side up to 512 wins
    assert bagel_resize(1024, 1024, 1024, 512, 16) == (1024, 1024)
    # 100 x 5000: the short side to 512 makes 512 x 25600, over the pixel budget (14*14*9*1024): scaled by
    # 0.1378125 to 64 x 3520 (70.56 -> 71 -> 64; 3528 -> 220.5 -> 220 tokens, half to even), then the long side to 1024
    assert bagel_resize(100, 5000, 1024, 512, 16) == (16, 1024)


def test_editing_generates_at_the_source_aspect_ratio():
    """A 30 x 50 source at resolution 64 (Bagel's rule at (64, 32, 16)) is edited at 32 x 48: the VAE context is the
    source resized to 32 x 48, the noise, velocity and decoded edit take that 2 x 3 token grid, and the on-policy
    ratio is still exactly 1."""
    model = random_model()
    pipe = BagelPipeline.load("", device="cpu", resolution=64, image_guidance_scale=1.5)
    source = torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(3))
    cond = pipe.encode(["make it blue", "make it blue"], images=[source, source], model=model)
    assert cond["grid"] == (2, 3)

    resized = Image.fromarray((source * 255).round().byte().permute(1, 2, 0).numpy()).resize((48, 32), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mean
        split = LatentSplit(patchify_latents(0.3611 * (z - 0.1159), 2)[0], 2, 3)
        context = model.extend(KVCache.empty(2), [0, 1], [split, split])
    images_only = cond["cache"].select([2, 3])  # [VAE image (6 tokens + 2 markers) | ViT image] of each sample
    assert all(torch.equal(a.view(2, -1, *a.shape[1:])[:, :8], b.view(2, 8, *b.shape[1:]))
               for a, b in zip(images_only.keys, context.keys))

    gens = [torch.Generator().manual_seed(s) for s in (4, 4)]
    sigmas, levels = pipe.sigmas(2), step_noise_levels(2, 1.0, (0, 2))
    images = generate_images(pipe, model, ["make it blue"] * 2, gens, sigmas, levels, "sde", 4.0,
                             noise_generator=torch.Generator().manual_seed(5), images=[source, source])
    assert images.shape == (2, 3, 32, 48)

    x0 = pipe.initial_noise(2, torch.Generator().manual_seed(6), cond)
    assert x0.shape == (2, 2, 3, ARGS.patch_latent_dim)
    traj = sample_trajectory(pipe, model, cond, x0, sigmas, levels, "sde", 4.0, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        v = pipe.velocity(model, traj.latents[:, 1], sigmas[1].expand(2), cond, 4.0)
    out = sde_step(v, traj.latents[:, 1], sigmas[1].expand(2), sigmas[2].expand(2), levels[1], "sde",
                   prev_sample=traj.latents[:, 2], sigma_fallback=sigmas[1])
    assert torch.equal(out.log_prob, traj.log_probs[:, 1])

    with pytest.raises(ValueError, match="latents on a 4x4 token grid, but the condition was encoded for 2x3"):
        pipe.velocity(model, pipe.initial_noise(2, torch.Generator()), sigmas[1].expand(2), cond, 4.0)
    with pytest.raises(ValueError, match=r"sources resize to 32x32, 32x48 \(height x width\).*one group"):
        pipe.encode(["a", "b"], images=[torch.rand(3, 40, 40), source], model=model)


def test_logged_images_of_edits_at_different_shapes_share_one_grid():
    """Sampling rounds (or eval batches) of edits generated at different source shapes are logged in one grid,
    each image padded with black to the largest height and width."""
    a, b = torch.rand(2, 3, 32, 48), torch.rand(2, 3, 48, 32)
    grid = first_images([a, b], 3)
    assert grid.shape == (3, 3, 48, 48)
    assert torch.equal(grid[1, :, :32], a[1]) and torch.equal(grid[2, :, :, :32], b[0])
    assert grid[1, :, 32:].abs().sum() == 0 and grid[2, :, :, 32:].abs().sum() == 0
    assert torch.equal(first_images([a, a], 8), torch.cat([a, a]))  # one shape: as before


def test_noise_decode_and_sigmas(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x = pipe.initial_noise(2, gens)
    assert x.shape == (2, 3, 3, ARGS.patch_latent_dim)
    # the reference's (h*w, 4C) token rows, in the same order
    assert torch.equal(x[1].flatten(0, 1), torch.randn(9, ARGS.patch_latent_dim, generator=torch.Generator().manual_seed(2)))
    images = pipe.decode(x)
    with torch.no_grad():
        z = unpatchify_latents(x.flatten(1, 2), 3, 3, 2) / 0.3611 + 0.1159
        want = (pipe.vae.decode(z).sample * 0.5 + 0.5).clamp(0, 1)
    assert torch.equal(images, want)
    # Bagel's 15 "timesteps" at shift 3 are 14 steps (flow_grpo_algorithm.md section 1.2).
    table = [1, 0.975, 0.947, 0.917, 0.882, 0.844, 0.800, 0.750, 0.692, 0.625, 0.545, 0.450, 0.333, 0.1875, 0]
    torch.testing.assert_close(pipe.sigmas(14), torch.tensor(table), rtol=0, atol=1e-3)
    assert torch.equal(pipe.sigmas(14), shifted_linear_sigmas(14, 3.0))


# --- RL ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type, level", [("sde", 1.3), ("cps", 0.8)])
def test_on_policy_ratio_is_exactly_one(pipe, sde_type, level):
    model = random_model()
    select_trainable(model, "gen_expert")
    cond = pipe.encode(PROMPTS, model=model)
    sigmas = pipe.sigmas(6)
    levels = step_noise_levels(6, level, (0, 3))
    x0 = pipe.initial_noise(4, torch.Generator().manual_seed(7))
    traj = sample_trajectory(pipe, model, cond, x0, sigmas, levels, sde_type, 4.0, generator=torch.Generator().manual_seed(8))

    model.train()
    for j in range(3):
        v = pipe.velocity(model, traj.latents[:, j], sigmas[j].expand(4), cond, 4.0)
        out = sde_step(v, traj.latents[:, j], sigmas[j].expand(4), sigmas[j + 1].expand(4), levels[j], sde_type,
                       prev_sample=traj.latents[:, j + 1], sigma_fallback=sigmas[1])
        ratio = torch.exp(out.log_prob - traj.log_probs[:, j])
        assert torch.equal(ratio, torch.ones(4)), (j, ratio)
        out.log_prob.sum().backward()
    grads = [p.grad for p in model.gen_expert_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_fsdp_parallelized_model_gives_the_same_velocity_and_trains_the_gen_expert(pipe):
    from titan_flow.distributed.utils import destroy_distributed, init_distributed

    cfg = JobConfig()
    cfg.training.device = "cpu"
    cfg.model.trainable = "gen_expert"
    cfg.activation_checkpoint.mode = "full"
    reference = random_model(seed=4)
    model = random_model(seed=4)
    dims = init_distributed(cfg)
    try:
        parallelize_bagel(model, dims, cfg, trainable=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in model.named_parameters() if ".gen." in n or n == "norm.gen.weight"}
        cond = pipe.encode(PROMPTS[:2], model=model)
        x, t = noise(2, seed=9), torch.tensor([0.7, 0.7])
        with torch.no_grad():
            want = pipe.velocity(reference, x, t, pipe.encode(PROMPTS[:2], model=reference), 4.0)
        model.train()
        v = pipe.velocity(model, x, t, cond, 4.0)
        torch.testing.assert_close(v, want, rtol=0, atol=1e-5)
        v.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        with pytest.raises(ConfigError, match="model.trainable: 'all' cannot train Bagel"):
            select_trainable(random_model(), "all")
    finally:
        destroy_distributed()


def test_debug_config_trains_on_cpu(tmp_path):
    from pathlib import Path

    from titan_flow.train import main

    config = Path(__file__).parent.parent / "train_configs" / "bagel_debug_cpu.toml"
    assert main(["--job.config_file", str(config), "--job.output_dir", str(tmp_path), "--training.steps", "1"]) == 0
    assert (tmp_path / "bagel_debug_cpu" / "config.json").is_file()
