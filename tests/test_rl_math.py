"""Advantages, the clipped-ratio loss, the K-repeat sampler, prompt datasets and the EMA schedule."""

import json
from pathlib import Path

import pytest
import torch

from kernels import clipped_ratio_loss
from titan_flow.data.prompts import DEBUG_PROMPTS, load_prompt_dataset
from titan_flow.data.sampler import KRepeatSampler
from titan_flow.rl.advantage import compute_advantages
from titan_flow.rl.ema import EMA


def test_group_advantages_hand_computed():
    # Section 15.7's toy: prompts [a, b, a, c, b, a], rewards 1..6.
    keys = ["a", "b", "a", "c", "b", "a"]
    rewards = torch.tensor([1.0, 2, 3, 4, 5, 6])
    adv, stats = compute_advantages(rewards, keys, global_std=False)
    # a: {1, 3, 6}: mean 10/3, population std sqrt(38/9); b: {2, 5}: mean 3.5, std 1.5; c: {4}: std 0.
    sa = (38 / 9) ** 0.5
    want = [(1 - 10 / 3) / (sa + 1e-4), -1.5 / 1.5001, (3 - 10 / 3) / (sa + 1e-4), 0.0, 1.5 / 1.5001, (6 - 10 / 3) / (sa + 1e-4)]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    assert stats["group_size"] == 2.0 and stats["zero_std_ratio"] == pytest.approx(1 / 3)
    # global std: every group's deviation divided by the std of all six rewards (sqrt(35/12)).
    adv, _ = compute_advantages(rewards, keys, global_std=True)
    sg = (35 / 12) ** 0.5
    assert adv[1].item() == pytest.approx(-1.5 / (sg + 1e-4), abs=1e-6)
    assert adv[3].item() == 0.0
    # no per-prompt tracking: one group
    adv, _ = compute_advantages(rewards, keys, global_std=False, per_prompt=False)
    assert torch.allclose(adv, (rewards - 3.5) / (sg + 1e-4), atol=1e-6)


def test_clipped_loss_hand_computed():
    new = torch.tensor([0.0, 0.1, -0.1])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    out = clipped_ratio_loss(new, old, adv, 0.05, 0.05, adv_clip_max=5.0)
    # ratios 1, e^0.1, e^-0.1; per sample max(-A r, -A clip(r, 0.95, 1.05)) = -1, -1.05, 0.95
    assert out.loss.item() == pytest.approx((-1 - 1.05 + 0.95) / 3, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    assert out.clipfrac_gt_one.item() == pytest.approx(1 / 3) and out.clipfrac_lt_one.item() == pytest.approx(1 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * 0.02 / 3, abs=1e-8)
    # advantages are clipped to +-adv_clip_max before use; RatioNorm scales the log-ratio and adds the bias
    out = clipped_ratio_loss(torch.zeros(2), torch.zeros(2), torch.tensor([10.0, -10.0]), 0.1, 0.1, adv_clip_max=2.0)
    assert out.loss.item() == pytest.approx(0.0)
    new = torch.tensor([0.3, -0.2], requires_grad=True)
    out = clipped_ratio_loss(new, torch.zeros(2), torch.tensor([1.0, 1.0]), 0.5, 0.5, 5.0,
                             ratio_scale=torch.tensor([0.5, 2.0]), ratio_bias=torch.tensor([0.1, 0.05]), loss_weight=4.0)
    ratio = torch.exp(torch.tensor([0.5 * 0.4, 2.0 * -0.15]))
    assert torch.allclose(out.ratio, ratio)
    assert out.loss.item() == pytest.approx(4.0 * (-ratio).mean().item(), rel=1e-6)


def test_on_policy_loss_has_ratio_one_and_no_clipping():
    lp = torch.randn(8)
    out = clipped_ratio_loss(lp, lp.clone(), torch.randn(8), 1e-4, 1e-4, 5.0)
    assert torch.equal(out.ratio, torch.ones(8))
    assert out.clipfrac.item() == 0 and out.approx_kl.item() == 0


@pytest.mark.parametrize("world, batch, k", [(1, 6, 3), (2, 3, 3), (4, 3, 2), (3, 8, 4)])
def test_k_repeat_sampler_contract(world, batch, k):
    size = 40
    samplers = [KRepeatSampler(size, batch, k, world, r, seed=42) for r in range(world)]
    for _ in range(3):
        chunks = [next(s) for s in samplers]
        assert all(len(c) == batch for c in chunks)
        union = [i for c in chunks for i in c]
        counts = {i: union.count(i) for i in set(union)}
        assert set(counts.values()) == {k}  # every selected prompt exactly k times over all ranks
        assert len(counts) == world * batch // k
    # the position is one integer: a fresh sampler that loads it continues identically
    fresh = KRepeatSampler(size, batch, k, world, 0, seed=42)
    fresh.load_state_dict(samplers[0].state_dict())
    assert next(fresh) == next(samplers[0])
    # different rounds draw different prompts
    assert samplers[0].indices(0) != samplers[0].indices(1)


def test_k_repeat_sampler_errors():
    with pytest.raises(ValueError, match=r"must be a multiple of sampling.num_image_per_prompt \(4\)"):
        KRepeatSampler(10, 3, 4, 1, 0, 0)
    with pytest.raises(ValueError, match="needs 6 distinct prompts but the dataset has only 5"):
        KRepeatSampler(5, 6, 2, 2, 0, 0)


def test_prompt_datasets(tmp_path):
    (tmp_path / "train.txt").write_text("a cat\n\n  a dog  \n")
    ds = load_prompt_dataset(str(tmp_path), "train")
    assert len(ds) == 2 and ds[1] == ("a dog", {}, None, "a dog")
    record = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"}
    (tmp_path / "test_metadata.jsonl").write_text(json.dumps(record) + "\n")
    ds = load_prompt_dataset(str(tmp_path), "test")
    assert ds[0] == ("a photo of two cups", record, None, "a photo of two cups")
    assert len(load_prompt_dataset("", "train")) == len(DEBUG_PROMPTS)
    with pytest.raises(FileNotFoundError, match="has neither val.txt nor val_metadata.jsonl"):
        load_prompt_dataset(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="data.path: .* is not a directory"):
        load_prompt_dataset(str(tmp_path / "missing"), "train")
    (tmp_path / "bad_metadata.jsonl").write_text('{"prompt": "ok"}\n{"tag": 1}\n')
    with pytest.raises(ValueError, match=r"bad_metadata.jsonl:2: .*\"prompt\""):
        load_prompt_dataset(str(tmp_path), "bad", "geneval")


def test_ema_schedule_and_swap():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], max_decay=0.9, update_interval=2)
    p.data.fill_(1.0)
    ema.step(1)  # (1 + 1) % 2 == 0: update with decay min(2/11, 0.9)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    ema.step(2)  # not an update step
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))
    ema.step(99)  # decay capped at 0.9
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 0.9 * 2 / 11))
    with ema.swapped_in():
        assert torch.allclose(p.data, ema.shadow[0])
    assert torch.equal(p.data, torch.ones(3))
    fresh = EMA([torch.nn.Parameter(torch.zeros(3))])
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.shadow[0], ema.shadow[0])


SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"the reference's prompt sets are not at {SHARED_DATASETS}")
def test_the_reference_prompt_sets_load():
    geneval = load_prompt_dataset(str(SHARED_DATASETS / "geneval"), "test")
    assert len(geneval) == 2212  # 553 GenEval prompts x 4 (the last line has no newline)
    tags = {geneval[i].metadata["tag"] for i in range(len(geneval))}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    record = geneval[1]
    assert record.prompt == record.metadata["prompt"] and record.metadata["include"][0]["color"] == "pink"
    assert record.image is None and record.key == record.prompt
    ocr = load_prompt_dataset(str(SHARED_DATASETS / "ocr"), "test")
    assert len(ocr) == 1018 and all('"' in ocr[i].prompt for i in range(len(ocr)))  # the target text is quoted
    pickscore = load_prompt_dataset(str(SHARED_DATASETS / "pickscore"), "test")
    assert len(pickscore) == 2048
    sampler = KRepeatSampler(len(geneval), 9, 24, 32, 5, seed=42)  # the reference's 32-GPU layout
    assert len(next(sampler)) == 9
