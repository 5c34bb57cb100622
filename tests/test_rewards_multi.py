"""Model-free rewards (JPEG, OCR), MultiReward's weighted sum / extras / submit, GenEval helpers, config."""

from __future__ import annotations

import io
import math
import random
import threading
from concurrent.futures import Future
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from titan_flow.rewards import (
    MultiReward,
    Reward,
    build_reward,
    geneval_breakdown,
    masked_mean,
    register_reward,
    reward_means,
)
from titan_flow.rewards.ocr import levenshtein, ocr_reward, quoted_target


def images(n=4, h=32, w=32, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- JPEG


def test_jpeg_rewards_match_pil_sizes():
    x = images(3)
    x[1] = 0.5  # a flat image compresses far better than noise
    sizes = []
    for a in (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        sizes.append(len(buf.getvalue()) / 1000)
    comp = build_reward("jpeg_compressibility")(x, ["p"] * 3, [{}] * 3)["score"]
    incomp = build_reward("jpeg_incompressibility")(x, ["p"] * 3, [{}] * 3)["score"]
    assert comp.dtype == torch.float32
    assert comp.tolist() == torch.tensor([-s / 500 for s in sizes], dtype=torch.float32).tolist()
    assert incomp.tolist() == torch.tensor(sizes, dtype=torch.float32).tolist()
    assert comp[1] > comp[0] and comp[1] > comp[2]


def test_rewards_reject_images_that_are_not_nchw():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_reward("jpeg_compressibility")(torch.rand(2, 32, 32, 3), ["a", "b"], [{}, {}])


# ---------------------------------------------------------------------------- OCR


@lru_cache(maxsize=None)
def brute_levenshtein(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(
        brute_levenshtein(a[1:], b) + 1,
        brute_levenshtein(a, b[1:]) + 1,
        brute_levenshtein(a[1:], b[1:]) + (a[0] != b[0]),
    )


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == levenshtein(b, a) == brute_levenshtein(a, b), (a, b)


def test_ocr_reward_formula():
    assert quoted_target('A neon sign saying "Flow GRPO" at night, "ignored"') == "Flow GRPO"
    assert ocr_reward("the FLOW grpo 2025 poster", "Flow GRPO") == 1.0  # substring, case and spaces ignored
    assert ocr_reward("", "hello") == 0.0  # nothing read: d = |g|
    assert ocr_reward("hallo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_reward("he llo", "hello") == 1.0
    assert ocr_reward("x" * 40, "hello") == 0.0  # d clipped at |g|: never negative
    assert ocr_reward("helo", "hello") == pytest.approx(0.8)
    for bad in ("no quotes here", 'one "quote', 'empty "" target', 'blank "  " target'):
        with pytest.raises(ValueError, match="double quotes"):
            quoted_target(bad)


def render(word: str, size=(128, 48)) -> torch.Tensor:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((6, 12), word, fill="black", font=ImageFont.load_default(size=20))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr():
    try:
        return build_reward("ocr")  # paddleocr when installed, else the offline ONNX PP-OCR models
    except ImportError as e:
        pytest.skip(f"no OCR backend installed: {e}")


def test_ocr_reads_a_rendered_word_back(ocr):
    x = torch.stack([render("Titan"), render("Titan"), torch.ones(3, 48, 128)])
    prompts = ['a sign that says "Titan"', 'a sign that says "Tiger"', 'a blank board with "Titan" on it']
    out = ocr(x, prompts, [{}] * 3)["score"]
    print("ocr rewards", out.tolist())
    # "titan" vs "tiger": 3 substitutions out of 5 letters
    assert out.tolist() == pytest.approx([1.0, 1 - 3 / 5, 0.0])


def test_ocr_backend_choice_is_validated():
    with pytest.raises(ValueError, match="reward.options.ocr.backend"):
        build_reward("ocr", backend="tesseract")


# ---------------------------------------------------------------------------- MultiReward


def test_multireward_weighted_sum_keeps_weight_zero_rewards():
    x = images(4)
    x[2] = 0.25
    fn = MultiReward({"jpeg_compressibility": 2.0, "jpeg_incompressibility": 0.0}, {}, "cpu")
    out = fn(x, ["p"] * 4, [{}] * 4)
    assert set(out) == {"jpeg_compressibility", "jpeg_incompressibility", "avg"}
    for v in out.values():
        assert v.shape == (4,) and v.dtype == torch.float32
    single = build_reward("jpeg_incompressibility")(x, ["p"] * 4, [{}] * 4)["score"]
    assert out["jpeg_incompressibility"].tolist() == single.tolist()  # weight 0: still scored
    torch.testing.assert_close(out["avg"], 2.0 * out["jpeg_compressibility"], atol=0, rtol=0)

    fn = MultiReward({"jpeg_compressibility": 1.5, "jpeg_incompressibility": 0.25}, {}, "cpu")
    out = fn(x, ["p"] * 4, None)
    expected = 1.5 * out["jpeg_compressibility"].double() + 0.25 * out["jpeg_incompressibility"].double()
    torch.testing.assert_close(out["avg"], expected.float(), atol=1e-7, rtol=0)


@register_reward
class Counting(Reward):
    """Score = mean pixel value, plus an extra key; records which thread called it."""

    name = "counting_test_reward"

    def __init__(self):
        self.calls, self.threads = [], []

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        self.calls.append(len(images))
        self.threads.append(threading.current_thread().name)
        mean = images.float().mean(dim=(1, 2, 3))
        return {"score": mean, "brightness_x2": 2 * mean}


def test_multireward_extras_and_submit_runs_on_the_reward_thread():
    fn = MultiReward({"jpeg_compressibility": 1.0, Counting.name: 0.5}, {}, "cpu")
    counting = fn.rewards[Counting.name]
    x = images(5)
    sync = fn(x, list("abcde"), None)
    assert set(sync) == {"jpeg_compressibility", counting.name, "brightness_x2", "avg"}
    torch.testing.assert_close(sync["brightness_x2"], 2 * x.mean(dim=(1, 2, 3)))
    future = fn.submit(x, list("abcde"), None)
    assert isinstance(future, Future)
    result = future.result(timeout=60)
    assert counting.calls == [5, 5]  # each call scores exactly the images it was given, once
    assert counting.threads[0] == threading.current_thread().name and counting.threads[1].startswith("reward")
    for key in sync:
        assert result[key].tolist() == sync[key].tolist()
    # several submits come back in order
    futures = [fn.submit(images(2, seed=s), ["a", "b"], None) for s in range(3)]
    for s, f in enumerate(futures):
        assert f.result(timeout=60)[counting.name].tolist() == images(2, seed=s).mean(dim=(1, 2, 3)).tolist()
    fn.close()


def test_multireward_errors_name_the_config_field():
    with pytest.raises(KeyError, match=r"reward\.fns: unknown reward 'pickscor'.*pickscore"):
        MultiReward({"pickscor": 1.0}, {}, "cpu")
    with pytest.raises(ValueError, match=r"reward\.fns\.jpeg_compressibility: weight must be a finite number"):
        MultiReward({"jpeg_compressibility": "1"}, {}, "cpu")
    with pytest.raises(ValueError, match="reward.fns is empty"):
        MultiReward({}, {}, "cpu")
    with pytest.raises(FileNotFoundError, match=r"reward\.model_paths\.pickscore"):
        MultiReward({"pickscore": 1.0}, {}, "cpu")
    with pytest.raises(ValueError, match=r"reward\.options\.ocr must be a table"):
        MultiReward({"jpeg_compressibility": 1.0}, {}, "cpu", options={"ocr": "rapidocr"})
    fn = MultiReward({"jpeg_compressibility": 1.0}, {}, "cpu")
    with pytest.raises(ValueError, match="3 images, 2 prompts"):
        fn(images(3), ["a", "b"], None)


# ---------------------------------------------------------------------------- GenEval helpers


def test_masked_mean_skips_not_this_tag_and_nan():
    assert masked_mean(torch.tensor([1.0, -10.0, 0.0, float("nan"), 1.0])) == pytest.approx(2 / 3)
    assert math.isnan(masked_mean(torch.tensor([-10.0, -10.0])))
    assert math.isnan(masked_mean(torch.tensor([])))
    means = reward_means({"a": torch.tensor([1.0, 3.0]), "b_accuracy": torch.tensor([-10.0, 1.0])})
    assert means == {"a": 2.0, "b_accuracy": 1.0}


def test_geneval_breakdown_per_task():
    tasks = ["counting", "counting", "colors", "position", "colors", "counting"]
    strict = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    loose = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    rewards = {}
    for task in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        rewards[f"{task}_strict_accuracy"] = torch.tensor([s if t == task else -10.0 for t, s in zip(tasks, strict)])
        rewards[f"{task}_accuracy"] = torch.tensor([s if t == task else -10.0 for t, s in zip(tasks, loose)])
    table = geneval_breakdown(rewards)
    expected_strict = {"counting": 2 / 3, "colors": 1 / 2, "position": 0.0}
    expected_loose = {"counting": 1.0, "colors": 1.0, "position": 0.0}
    for task in expected_strict:
        assert table[f"{task}_strict"] == pytest.approx(expected_strict[task])
        assert table[task] == pytest.approx(expected_loose[task])
    assert "single_object" not in table and "two_object_strict" not in table  # no images of those tasks
    assert table["overall_strict"] == pytest.approx(sum(expected_strict.values()) / 3)
    assert table["overall"] == pytest.approx(sum(expected_loose.values()) / 3)
    only_strict = geneval_breakdown({k: v for k, v in rewards.items() if "strict" in k})
    assert set(only_strict) == {"counting_strict", "colors_strict", "position_strict", "overall_strict"}


# ---------------------------------------------------------------------------- config


def test_reward_config_fields_reach_multireward():
    from titan_flow.config import build_job_config

    cfg = build_job_config([
        "--reward.fns", "jpeg_compressibility=1.0,geneval=0.0",
        "--reward.urls", '{"geneval": "http://10.0.0.5:18085"}',
        "--reward.timeout_seconds", "30", "--reward.max_retries", "4", "--reward.retry_backoff_seconds", "0.5",
        "--reward.options", '{"geneval": {"chunk_size": 16}}',
    ])
    r = cfg.reward
    default_urls = build_job_config([]).reward.urls
    assert default_urls == {"geneval": "http://127.0.0.1:18085", "deqa": "http://127.0.0.1:18086",
                            "unifiedreward": "http://127.0.0.1:17140/v1"}
    fn = MultiReward(r.fns, r.model_paths, "cpu", urls=r.urls, timeout_seconds=r.timeout_seconds,
                     max_retries=r.max_retries, retry_backoff_seconds=r.retry_backoff_seconds, options=r.options)
    geneval = fn.rewards["geneval"]
    assert geneval.url == "http://10.0.0.5:18085" and geneval.chunk_size == 16
    assert (geneval.policy.timeout_seconds, geneval.policy.max_retries, geneval.policy.backoff_seconds) == (30, 4, 0.5)
    # without a URL for it, a server reward uses the reference's default port
    assert MultiReward({"deqa": 1.0}, {}, "cpu").rewards["deqa"].url == "http://127.0.0.1:18086"
