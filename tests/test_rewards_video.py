"""Rewards on videos (B, F, 3, H, W): image rewards frame by frame, flow_grpo's video_ocr, and the reward
server carrying video batches."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from titan_flow.rewards import MultiReward, RemoteReward, RetryPolicy, Reward, build_reward, register_reward
from titan_flow.rewards.ocr import VideoOCR, video_ocr_reward
from titan_flow.rewards.registry import call_reward, to_uint8
from titan_flow.rewards.serve import BatchingScorer, make_handler


def video(batch=2, frames=5, h=24, w=32, seed=0):
    return (torch.rand(batch, frames, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def test_image_rewards_score_a_video_as_the_mean_of_its_frames():
    x = video(batch=3, frames=4)
    x[1] = 0.5  # a flat video compresses far better than noise
    fn = MultiReward({"jpeg_compressibility": 1.0}, {}, "cpu")
    got = fn(x, ["a", "b", "c"], None)["jpeg_compressibility"]
    per_frame = build_reward("jpeg_compressibility")(x.flatten(0, 1), ["p"] * 12, [{}] * 12)["score"]
    torch.testing.assert_close(got, per_frame.view(3, 4).mean(1), rtol=0, atol=0)
    assert got[1] > got[0] and got[1] > got[2]
    assert fn(x[:, 0], ["a", "b", "c"], None)["jpeg_compressibility"].tolist() == per_frame.view(3, 4)[:, 0].tolist()
    assert to_uint8(x).shape == (3, 4, 24, 32, 3)


@register_reward
class FrameProbe(Reward):
    """An image reward that records what it is given: per image its mean, plus an extra."""

    name = "frame_probe_test_reward"

    def __init__(self):
        self.seen = []

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        self.seen.append((tuple(images.shape), list(prompts), list(metadata)))
        mean = images.float().mean(dim=(1, 2, 3))
        return {"score": mean, "double": 2 * mean}


def test_frames_carry_their_videos_prompt_metadata_and_average_extras():
    probe = FrameProbe()
    x = video(batch=2, frames=3)
    out = call_reward(probe, x, ["cat", "dog"], [{"i": 0}, {"i": 1}])
    assert probe.seen == [((6, 3, 24, 32), ["cat"] * 3 + ["dog"] * 3, [{"i": 0}] * 3 + [{"i": 1}] * 3)]
    torch.testing.assert_close(out["score"], x.mean(dim=(2, 3, 4)).mean(1))
    torch.testing.assert_close(out["double"], 2 * out["score"])


# ---------------------------------------------------------------------------- video_ocr


class StubOCR(VideoOCR):
    """video_ocr with a fake engine: a frame's text is the word indexed by its (constant) pixel value."""

    WORDS = ["", "titan", "tiger", "xxxxxxxx", "titanic"]

    def __init__(self, frame_step: int = 4):
        self.frame_step, self.read_frames = frame_step, []
        self.read = self._read

    def _read(self, image: np.ndarray) -> str:
        self.read_frames.append(int(image[0, 0, 0]))
        word = self.WORDS[int(image[0, 0, 0]) % 10]
        if word == "titanic":
            raise RuntimeError("engine failure")
        return word


def stub_video(codes: list[int]) -> torch.Tensor:
    """One video whose frame t is flat with pixel value 10 t + code (so the stub knows the frame and the word)."""
    return torch.stack([torch.full((3, 8, 8), (10 * t + c) / 255) for t, c in enumerate(codes)])


def test_video_ocr_reads_every_fourth_frame_and_averages_the_positive_ones():
    ocr = StubOCR()
    # 9 frames: frames 0, 4, 8 are read; frame 4 says "titan", frame 8 "tiger", the rest nothing
    codes = [0, 1, 1, 1, 1, 0, 0, 0, 2]
    out = ocr(stub_video(codes)[None], ['a poster that says "Titan"'], [{}])["score"]
    assert [f // 10 for f in ocr.read_frames] == [0, 4, 8]
    # frame rewards: 0 (nothing read: d = |g|), 1, 1 - 3/5 ("tiger" vs "titan"); mean of the positive ones
    assert out.tolist() == pytest.approx([(1 + 0.4) / 2])
    # one legible frame scores as much as all legible frames; none legible scores 0
    assert ocr(stub_video([1, 0, 0, 0, 0])[None], ['"titan"'], [{}])["score"].item() == 1.0
    assert ocr(stub_video([0, 0, 0, 0, 3])[None], ['"titan"'], [{}])["score"].item() == 0.0
    # no substring shortcut on video (unlike the image ocr reward), and an engine failure scores that frame 0
    assert ocr(stub_video([4])[None], ['"titan"'], [{}])["score"].item() == 0.0
    assert video_ocr_reward([0.0, 0.5, 0.0, 1.0]) == 0.75 and video_ocr_reward([0.0, 0.0]) == 0.0
    # an image is a one-frame video; frame_step is an option
    assert ocr(stub_video([1])[0][None], ['"titan"'], [{}])["score"].item() == 1.0
    every = StubOCR(frame_step=1)
    every(stub_video([1, 2, 0])[None], ['"titan"'], [{}])
    assert [f // 10 for f in every.read_frames] == [0, 1, 2]
    with pytest.raises(ValueError, match="reward.options.video_ocr.frame_step must be an integer >= 1"):
        VideoOCR(frame_step=0)


def render(word: str, size: int = 80) -> torch.Tensor:
    """The word in black on a white square frame (square: the OCR detector upscales the short side to 736)."""
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).text((4, size // 2 - 12), word, fill="black", font=ImageFont.load_default(size=20))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def video_ocr():
    try:
        return build_reward("video_ocr", backend="rapidocr")  # the offline ONNX PP-OCR models in the wheel
    except ImportError as e:
        pytest.skip(f"rapidocr_onnxruntime is not installed: {e}")


def test_video_ocr_reads_a_word_rendered_into_frames(video_ocr):
    """The offline engine on real pixels: 5 frames, blank but frame 4, which shows the word; frames 0 and 4
    are read (about 2 s each on a loaded 2-core CPU, so the test keeps to four)."""
    frames = torch.ones(5, 3, 80, 80)
    frames[4] = render("Titan")
    videos = torch.stack([frames, frames])
    prompts = ['a neon sign that says "Titan"', 'a sign that says "Tiger"']
    out = call_reward(video_ocr, videos, prompts, [{}, {}])["score"]
    print("video_ocr rewards", out.tolist())
    # frame 0 reads nothing (reward 0, left out of the mean); frame 4 reads "titan": 1, and 1 - 3/5 against "tiger"
    assert out.tolist() == pytest.approx([1.0, 1 - 3 / 5])


# ---------------------------------------------------------------------------- the reward server


@register_reward
class TakesVideo(Reward):
    """A reward that scores videos itself: per video, frame 0's mean minus the last frame's."""

    name = "takes_video_test_reward"
    takes_video = True

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        assert images.ndim == 5
        return {"score": images[:, 0].mean(dim=(1, 2, 3)) - images[:, -1].mean(dim=(1, 2, 3))}


@pytest.fixture(scope="module")
def server():
    scorers = {name: BatchingScorer(name, build_reward(name), 64)
               for name in ("jpeg_compressibility", "takes_video_test_reward", "frame_probe_test_reward")}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(scorers, "cpu"))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("name", ["jpeg_compressibility", "takes_video_test_reward", "frame_probe_test_reward"])
def test_served_video_rewards_equal_local_ones(server, name):
    """Videos travel as PNG frames with num_frames (in chunks of whole videos); the server scores them as a
    local call would: image rewards frame by frame, video rewards on the video. 8-bit videos, so exact."""
    x = video(batch=5, frames=3, seed=4)
    prompts = [f"prompt {i}" for i in range(5)]
    remote = RemoteReward(name, f"{server}/{name}", RetryPolicy(30, 0, 0), chunk_size=7)  # 2 videos per request
    got = remote(x, prompts, [{}] * 5)
    want = call_reward(build_reward(name), x, prompts, [{}] * 5)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key].float(), rtol=0, atol=1e-6)
    if name != "takes_video_test_reward":  # and images still travel as images
        images = x[:, 1]
        torch.testing.assert_close(remote(images, prompts, [{}] * 5)["score"],
                                   call_reward(build_reward(name), images, prompts, [{}] * 5)["score"].float(),
                                   rtol=0, atol=1e-6)


def test_server_rejects_frames_that_do_not_make_videos(server):
    from titan_flow.rewards import protocol
    from titan_flow.rewards.remote import RewardServerError, post_pickle

    blobs = protocol.encode_images(to_uint8(video(batch=1, frames=3))[0], "PNG")
    with pytest.raises(RewardServerError, match=r"HTTP 400: malformed request.*num_frames = 2 does not divide the 3"):
        post_pickle(f"{server}/jpeg_compressibility", {"images": blobs, "num_frames": 2}, RetryPolicy(30, 0, 0),
                    required=("scores",))
