"""The pixel-space SD3 "shapes" flavor and its pipeline (titan_flow/models/sd3/shapes.py)."""

from __future__ import annotations

import json

import pytest
import torch

from titan_flow.config import build_job_config
from titan_flow.config.manager import ConfigError
from titan_flow.data.shapes import all_prompts, vocabulary
from titan_flow.models import get_model_spec
from titan_flow.models.sd3.pipeline import SD3Pipeline
from titan_flow.models.sd3.shapes import DEFAULTS, PAD, ShapesPipeline, is_shapes_dir, save_pretrained

SPEC = get_model_spec("sd3")


@pytest.fixture(scope="module")
def pipe():
    return SD3Pipeline.load("", device="cpu", resolution=16, max_sequence_length=8, flavor="shapes")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = SPEC.build("shapes")
    return save_pretrained(tmp_path_factory.mktemp("shapes") / "pipeline", model.state_dict(), model.args), model


def test_the_flavor_is_a_small_pixel_space_mmdit(pipe):
    model = SPEC.build("shapes")
    assert sum(p.numel() for p in model.parameters()) == 2_270_476
    assert isinstance(pipe, ShapesPipeline) and pipe.latent_shape == (3, 16, 16)
    x = pipe.initial_noise(2, torch.Generator().manual_seed(0))
    v = pipe.velocity(model, x, torch.full((2,), 0.5), pipe.encode(["a red circle", "two squares"]), 4.5)
    assert v.shape == (2, 3, 16, 16) and torch.isfinite(v).all()


def test_text_is_one_hot_words_and_positions_with_a_bag_of_words_pooled(pipe):
    assert pipe.vocab == [PAD, *vocabulary()]
    cond = pipe.encode(["a red circle and a blue square", ""])
    words, n = "a red circle and a blue square".split(), len(pipe.vocab)
    embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
    assert embeds.shape == (2, 8, 32) and pooled.shape == (2, 24)
    for i in range(8):
        word = words[i] if i < len(words) else PAD
        expected = torch.zeros(32)
        expected[pipe.vocab.index(word)] = 1
        expected[n + i] = 1
        assert torch.equal(embeds[0, i], expected)
    assert pooled[0, pipe.vocab.index("a")] == 2 and pooled[0, pipe.vocab.index("square")] == 1
    assert pooled[0].sum() == len(words) and pooled[1].sum() == 0  # the empty prompt: padding only
    # CFG's unconditional branch is the empty prompt, expanded to the batch
    assert torch.equal(cond["negative_prompt_embeds"][0], embeds[1])
    every_prompt = [r["prompt"] for r in all_prompts()]
    assert pipe.encode(every_prompt)["prompt_embeds"].shape == (150, 8, 32)


def test_unknown_words_and_long_prompts_are_refused(pipe):
    with pytest.raises(ValueError, match=r"cannot read \['cube'\] in 'a red cube'; it knows only"):
        pipe.encode(["a red cube"])
    with pytest.raises(ValueError, match="has 9 words, more than model.max_sequence_length = 8"):
        pipe.encode(["a red circle and a blue square and a"])


def test_pixels_are_the_latent(pipe):
    images = torch.rand(3, 3, 16, 16)
    assert torch.allclose(pipe.decode(pipe.to_latents(images)), images, atol=1e-6)
    assert pipe.decode(torch.full((1, 3, 16, 16), 5.0)).max() == 1  # clamped like a VAE decode


def test_a_saved_directory_loads_through_the_sd3_paths(shapes_dir):
    root, model = shapes_dir
    assert is_shapes_dir(root) and not is_shapes_dir(root / "transformer") and not is_shapes_dir("")
    assert json.loads((root / "model_index.json").read_text()) == {"_class_name": "ShapesPipeline", **DEFAULTS}
    loaded = SPEC.from_pretrained(root)
    assert loaded.args == model.args
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    pipe = SD3Pipeline.load(str(root), device="cpu", resolution=16, max_sequence_length=8)
    assert isinstance(pipe, ShapesPipeline) and pipe.shift == DEFAULTS["shift"]
    # the job config's "auto" fields come from the directory's model_index.json
    cfg = build_job_config(["--model.pretrained_path", str(root)])
    assert (cfg.model.resolution, cfg.model.max_sequence_length) == (16, 8)
    assert (cfg.eval.num_steps, cfg.eval.guidance_scale) == (DEFAULTS["num_inference_steps"], DEFAULTS["guidance_scale"])


def test_load_errors_name_the_problem(tmp_path, shapes_dir):
    with pytest.raises(ValueError, match="model.resolution: 18 must be a positive multiple of the patch size 2 and at most 16"):
        SD3Pipeline.load("", device="cpu", resolution=18, max_sequence_length=8, flavor="shapes")
    with pytest.raises(ValueError, match="do not fit the backbone's text width 32"):
        SD3Pipeline.load("", device="cpu", resolution=16, max_sequence_length=16, flavor="shapes")
    with pytest.raises(FileNotFoundError, match="is not a shapes pipeline directory"):
        ShapesPipeline.load(str(tmp_path), device="cpu")
    root, _ = shapes_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "ShapesPipeline", "resolution": 16}))
    with pytest.raises(ConfigError, match="missing"):
        build_job_config(["--model.pretrained_path", str(broken)])
