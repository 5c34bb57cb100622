"""The counting-edit reward of the reference (counting_flux_kontext, counting_qwenimage_edit): GenEval's
counting score of the edited image plus the CLIP image similarity of the edited image to its source, each
scored and logged on its own and summed with the recipe's weights; and the source | edited grids."""

from __future__ import annotations

import pytest
import torch
from test_rewards_models import reference_pil, tiny_clip_dir
from test_rewards_remote import Stub, geneval_answer, gray_images

from titan_flow.rewards import MultiReward
from titan_flow.rewards.registry import build_reward
from titan_flow.rl.metrics import beside_sources


def loader_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """What the data loader hands over: float (3, H, W) in [0, 1] (k / 255 values), every image its own size."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 24 + 8 * i, 40 - 4 * i), generator=g).float() / 255 for i in range(n)]


@pytest.fixture
def geneval_server():
    stub = Stub(lambda handler, body: (200, geneval_answer(body), "application/octet-stream"))
    yield stub
    stub.close()


def test_counting_edit_reward_sums_and_logs_both_parts(tmp_path, geneval_server):
    clip = tiny_clip_dir(tmp_path / "clip")
    n = 4
    edited = gray_images(n)  # the stub reads which image it got from its gray level
    sources = loader_images(n)
    wanted, found = [1, 2, 3, 4], [1, 3, 3, 0]
    metadata = [{"tag": "counting", "prompt": f"Change the number of dog in the image to {w}.",
                 "include": [{"class": "dog", "count": w}], "exclude": [{"class": "dog", "count": w + 1}],
                 "image": f"generated_images/image_{i}.jpg", "found": f, "index": i}
                for i, (w, f) in enumerate(zip(wanted, found))]
    prompts = [m["prompt"] for m in metadata]
    with MultiReward({"image_similarity": 0.5, "geneval": 0.5}, {"image_similarity": str(clip)}, "cpu",
                     urls={"geneval": geneval_server.url}) as reward:
        out = reward.submit(edited, prompts, metadata, ref_images=sources).result()
    counting = torch.tensor([1 - abs(w - f) / w for w, f in zip(wanted, found)])
    torch.testing.assert_close(out["geneval"], counting, rtol=0, atol=1e-6)
    assert out["strict_accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out["counting_strict_accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # The similarity of each edit to its own source, the same as from the sources as 8-bit PIL images.
    alone = build_reward("image_similarity", str(clip), "cpu")
    by_pil = alone(edited, prompts, metadata, ref_images=[reference_pil(s[None])[0] for s in sources])["score"]
    torch.testing.assert_close(out["image_similarity"], by_pil, rtol=0, atol=1e-6)
    shuffled = alone(edited, prompts, metadata, ref_images=sources[::-1])["score"]
    assert (shuffled - out["image_similarity"]).abs().max() > 1e-4  # the pairing matters
    torch.testing.assert_close(out["avg"], 0.5 * out["image_similarity"] + 0.5 * counting, rtol=0, atol=1e-6)
    print("counting-edit reward:", {k: [round(v, 4) for v in out[k].tolist()] for k in ("geneval", "image_similarity",
                                                                                         "avg")})


def test_grids_show_the_source_left_of_the_edit():
    edited = torch.rand(3, 3, 16, 20)
    sources = loader_images(3)
    grid = beside_sources(sources, edited)
    assert grid.shape == (3, 3, 16, 40)
    assert torch.equal(grid[..., 20:], edited)
    for source, left in zip(sources, grid[..., :20]):  # each source, resized to the edit's size
        assert (left.mean((1, 2)) - source.mean((1, 2))).abs().max() < 0.05
    assert beside_sources(None, edited) is edited
    with pytest.raises(ValueError, match="2 source images for 3 results"):
        beside_sources(sources[:2], edited)
