"""Reward servers for real on 127.0.0.1: GenEval/DeQA/UnifiedReward protocol stubs, the retrying client,
and titan_flow's own reward server run as a subprocess (served == local, batching, killed and restarted).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from titan_flow.rewards import MultiReward, Reward, RewardServerError, build_reward
from titan_flow.rewards.deqa import DeQA
from titan_flow.rewards.geneval import GenEval
from titan_flow.rewards.remote import RemoteReward, RetryPolicy, health
from titan_flow.rewards.unifiedreward import UnifiedReward

REPO = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(timeout_seconds=10, max_retries=3, backoff_seconds=0.01)
TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gray_images(n: int, size: int = 32) -> torch.Tensor:
    """Image i is flat gray level 2 i + 20, so a server can tell which image it got, even after JPEG."""
    return torch.stack([torch.full((3, size, size), (2 * i + 20) / 255) for i in range(n)])


class Stub:
    """A tiny HTTP server in a thread; `respond(handler, body) -> (code, bytes, content type)`."""

    def __init__(self, respond):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests.append((self.path, dict(self.headers), body))
                code, data, ctype = respond(self, body)
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except BrokenPipeError:  # the client timed out and left (test_timeouts_are_retried)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------- GenEval protocol


def geneval_answer(body: bytes) -> bytes:
    """What app_geneval.py answers, with 'found' counts taken from the metadata instead of a detector."""
    data = pickle.loads(body)
    assert set(data) == {"images", "meta_datas", "only_strict"} and len(data["images"]) <= 64
    scores, rewards, strict, groups, strict_groups = [], [], [], {t: [] for t in TASKS}, {t: [] for t in TASKS}
    for blob, meta in zip(data["images"], data["meta_datas"]):
        im = Image.open(io.BytesIO(blob), formats=["jpeg"])  # the real server only decodes JPEG
        level = round(float(np.asarray(im.convert("L")).mean()))
        assert abs(level - (2 * meta["index"] + 20)) <= 1, "images and metadata must stay aligned"
        want, found = meta["include"][0]["count"], meta["found"]
        scores.append(1 - abs(want - found) / want)  # partial credit, negative when found > 2 want
        strict.append(1.0 if found == want else 0.0)
        rewards.append(0.0 if data["only_strict"] else (1.0 if found >= want else 0.0))
        for t in TASKS:
            groups[t].append(rewards[-1] if t == meta["tag"] else -10.0)
            strict_groups[t].append(strict[-1] if t == meta["tag"] else -10.0)
    return pickle.dumps({"scores": scores, "rewards": rewards, "strict_rewards": strict,
                         "group_rewards": groups, "group_strict_rewards": strict_groups})


def geneval_metadata(n):
    return [{"tag": TASKS[i % 6], "prompt": f"p{i}", "include": [{"class": "dog", "count": 1 + i % 3}],
             "found": i % 5, "index": i} for i in range(n)]


@pytest.fixture
def geneval_stub():
    stub = Stub(lambda handler, body: (200, geneval_answer(body), "application/octet-stream"))
    yield stub
    stub.close()


def test_geneval_partial_credit_chunks_and_tag_columns(geneval_stub):
    n = 70
    meta = geneval_metadata(n)
    reward = GenEval(geneval_stub.url, FAST)
    out = reward(gray_images(n), [m["prompt"] for m in meta], meta)
    assert [len(pickle.loads(b)["images"]) for _, _, b in geneval_stub.requests] == [64, 6]
    want = torch.tensor([1 - abs(m["include"][0]["count"] - m["found"]) / m["include"][0]["count"] for m in meta])
    torch.testing.assert_close(out["score"], want.float())
    assert (out["score"] < 0).any() and ((out["score"] > 0) & (out["score"] < 1)).any()  # partial credit
    strict = torch.tensor([float(m["found"] == m["include"][0]["count"]) for m in meta])
    assert out["strict_accuracy"].tolist() == strict.tolist()
    for t in TASKS:
        col = out[f"{t}_strict_accuracy"]
        mine = torch.tensor([m["tag"] == t for m in meta])
        assert (col[~mine] == -10).all() and col[mine].tolist() == strict[mine].tolist()
    # training (only_strict): the server's non-strict accuracy is not computed, so it is not reported
    assert "accuracy" not in out and "colors_accuracy" not in out
    assert all(pickle.loads(b)["only_strict"] is True for _, _, b in geneval_stub.requests)

    evaluated = reward(gray_images(n), [m["prompt"] for m in meta], meta, only_strict=False)
    loose = torch.tensor([float(m["found"] >= m["include"][0]["count"]) for m in meta])
    assert evaluated["accuracy"].tolist() == loose.tolist()
    assert set(evaluated) >= {f"{t}_accuracy" for t in TASKS}


def test_multireward_geneval_sums_and_scores_each_image_once(geneval_stub):
    n = 8
    meta = geneval_metadata(n)
    fn = MultiReward({"geneval": 1.0, "jpeg_compressibility": 0.0}, {}, "cpu", urls={"geneval": geneval_stub.url},
                     max_retries=2, retry_backoff_seconds=0.01)
    out = fn.submit(gray_images(n), [m["prompt"] for m in meta], meta).result(timeout=60)
    assert sum(len(pickle.loads(b)["images"]) for _, _, b in geneval_stub.requests) == n  # no duplicated scoring
    assert out["avg"].tolist() == out["geneval"].tolist()
    assert {"geneval", "jpeg_compressibility", "strict_accuracy", "counting_strict_accuracy", "avg"} <= set(out)


def test_http_500_is_retried_until_success(caplog):
    calls = []

    def respond(handler, body):
        calls.append(1)
        if len(calls) == 1:
            return 500, b"Traceback (most recent call last):\nRuntimeError: CUDA out of memory", "text/plain"
        return 200, geneval_answer(body), "application/octet-stream"

    stub = Stub(respond)
    meta = geneval_metadata(3)
    with caplog.at_level(logging.WARNING, logger="titan_flow.rewards.remote"):
        out = GenEval(stub.url, FAST)(gray_images(3), ["p"] * 3, meta)
    stub.close()
    assert len(calls) == 2 and out["score"].shape == (3,)
    assert any(stub.url in r.getMessage() and "HTTP 500" in r.getMessage() for r in caplog.records)


def test_server_down_raises_naming_the_url_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=rf"(?s)reward server {url} failed 3 times.*Connection refused.*reward\.urls"):
        GenEval(url, RetryPolicy(timeout_seconds=2, max_retries=2, backoff_seconds=0.05))(
            gray_images(2), ["p"] * 2, geneval_metadata(2)
        )
    assert time.monotonic() - t0 >= 0.05 + 0.1  # it waited backoff, 2 x backoff before giving up


def test_client_errors_are_not_retried():
    stub = Stub(lambda handler, body: (404, b"no such endpoint", "text/plain"))
    with pytest.raises(RewardServerError, match=r"rejected the request: HTTP 404: no such endpoint"):
        DeQA(stub.url, FAST)(gray_images(2), ["p"] * 2, [{}] * 2)
    stub.close()
    assert len(stub.requests) == 1


def test_timeouts_are_retried():
    """The first request hangs until the client has given up on it and retried; the retry is answered.

    Nothing here races the clock: the hanging request is released by the retry's arrival (an event),
    not by a sleep, and the client's timeout (3 s) is a wide margin over answering three tiny images
    on localhost (milliseconds), so on a loaded machine the retry is not timed out as well.
    """
    calls, retried = [], threading.Event()

    def respond(handler, body):
        calls.append(1)
        if len(calls) == 1:
            assert retried.wait(120), "the client never retried the hanging request"
        else:
            retried.set()
        return 200, pickle.dumps({"outputs": [0.5] * len(pickle.loads(body)["images"])}), "application/octet-stream"

    stub = Stub(respond)
    try:
        out = DeQA(stub.url, RetryPolicy(timeout_seconds=3, max_retries=2, backoff_seconds=0.01))(
            gray_images(3), ["p"] * 3, [{}] * 3
        )
    finally:
        retried.set()
        stub.close()
    assert len(calls) == 2 and out["score"].tolist() == [0.5] * 3


def test_deqa_protocol():
    def respond(handler, body):
        data = pickle.loads(body)
        assert set(data) == {"images"}
        levels = [round(float(np.asarray(Image.open(io.BytesIO(b), formats=["jpeg"]).convert("L")).mean())) for b in data["images"]]
        return 200, pickle.dumps({"outputs": [lv / 100 for lv in levels]}), "application/octet-stream"

    stub = Stub(respond)
    out = build_reward("deqa", url=stub.url, policy=FAST)(gray_images(5), ["p"] * 5, [{}] * 5)
    stub.close()
    torch.testing.assert_close(out["score"], torch.tensor([(2 * i + 20) / 100 for i in range(5)]), atol=0.011, rtol=0)


def test_answers_that_are_not_plain_data_are_refused():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    stub = Stub(lambda handler, body: (200, pickle.dumps({"outputs": Evil()}), "application/octet-stream"))
    with pytest.raises(RewardServerError, match="refusing to unpickle builtins.print"):
        DeQA(stub.url, FAST)(gray_images(1), ["p"], [{}])
    stub.close()


# ---------------------------------------------------------------------------- UnifiedReward (OpenAI chat API)


def test_unifiedreward_openai_compatible_chat():
    seen = []

    def respond(handler, body):
        assert handler.path == "/v1/chat/completions"
        assert handler.headers["Authorization"] == "Bearer flowgrpo"
        req = json.loads(body)
        assert req["model"] == "UnifiedReward-7b-v1.5" and req["temperature"] == 0
        image_part, text_part = req["messages"][0]["content"]
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert im.format == "PNG" and im.size == (512, 512)
        caption = text_part["text"].split("Text Caption: [", 1)[1].rstrip("]")
        assert "Final Score:" in text_part["text"]
        seen.append(caption)
        if caption == "flaky" and seen.count("flaky") == 1:
            return 503, b"server busy", "text/plain"
        answer = {"good": "Sharp and faithful.\nFinal Score: 4.5", "bad": "Final Score: 1", "flaky": "Final Score: 3",
                  "odd": "I would give it a 9."}[caption]
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode(), "application/json"

    stub = Stub(respond)
    reward = UnifiedReward(url=stub.url + "/v1", policy=FAST)
    out = reward(gray_images(4), ["good", "bad", "flaky", "odd"], [{}] * 4)
    stub.close()
    assert out["score"].tolist() == pytest.approx([0.9, 0.2, 0.6, 0.0])
    assert sorted(seen) == ["bad", "flaky", "flaky", "good", "odd"]  # one request per image, the 503 retried


def test_unifiedreward_score_parser():
    from titan_flow.rewards.unifiedreward import parse_final_score

    assert parse_final_score("blah\nFinal Score: 3.75 because") == 3.75
    assert parse_final_score("Final Score:5") == 5.0
    assert parse_final_score("Final Score: 2 ... Final Score: 4") == 2.0
    assert parse_final_score("Final Score: 7") == 0.0 and parse_final_score("score 4") == 0.0


# ---------------------------------------------------------------------------- titan_flow's reward server


class Server:
    """`python -m titan_flow.rewards.serve` as a subprocess; its log lines are collected."""

    def __init__(self, args: list[str], port: int):
        self.port, self.lines = port, []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "titan_flow.rewards.serve", "--port", str(port), "--device", "cpu", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("reward server exited:\n" + "".join(self.lines))
            info = health(f"http://127.0.0.1:{self.port}", timeout=1)
            if info:
                return info
            time.sleep(0.1)
        raise TimeoutError("reward server did not come up:\n" + "".join(self.lines))

    def scored(self) -> int:
        return sum("scored" in line for line in self.lines)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from test_rewards_models import tiny_clip_dir

    clip = tiny_clip_dir(tmp_path_factory.mktemp("clip"))
    port = free_port()
    server = Server(["--rewards", "pickscore,jpeg_compressibility,image_similarity", "--model-path", f"pickscore={clip}",
                     "--model-path", f"image_similarity={clip}"], port)
    try:
        info = server.wait_ready()
        yield server, clip, info
    finally:
        server.kill()


def test_served_rewards_equal_local_ones(served):
    server, clip, info = served
    assert info["rewards"] == ["image_similarity", "jpeg_compressibility", "pickscore"] and info["device"] == "cpu"
    base = f"http://127.0.0.1:{server.port}"
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "two dogs", "a cat", "a tree", "the sea"]
    fns = {"pickscore": 1.0, "jpeg_compressibility": 0.5}
    remote = MultiReward(fns, {}, "cpu", urls={n: f"{base}/{n}" for n in fns}, max_retries=2)
    local = MultiReward(fns, {"pickscore": str(clip)}, "cpu")
    got, want = remote(x, prompts, None), local(x, prompts, None)
    assert set(got) == set(want)
    for key in want:
        print(key, "served - local max abs diff", (got[key] - want[key]).abs().max().item())
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)  # PNG keeps the 8-bit image exact


def test_served_edit_reward_gets_its_reference_images(served):
    server, clip, _ = served
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(3, 3, 32, 32, generator=g) * 255).round() / 255  # 8-bit exact, so PNG changes nothing
    refs = [Image.fromarray((torch.rand(h, 40, 3, generator=g) * 255).to(torch.uint8).numpy()) for h in (32, 48, 40)]
    url = f"http://127.0.0.1:{server.port}/image_similarity"
    got = RemoteReward("image_similarity", url, FAST)(x, ["p"] * 3, [{}] * 3, ref_images=refs)["score"]
    want = build_reward("image_similarity", str(clip), "cpu")(x, ["p"] * 3, [{}] * 3, ref_images=refs)["score"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_served_unknown_reward_is_a_clear_error(served):
    server, _, _ = served
    url = f"http://127.0.0.1:{server.port}/aesthetic"
    with pytest.raises(RewardServerError, match=r"/aesthetic rejected the request: HTTP 404: this server scores"):
        RemoteReward("aesthetic", url, FAST)(torch.rand(1, 3, 32, 32), ["p"], [{}])


class Gate(Reward):
    """Blocks its first call until released, so the next requests queue up behind it."""

    name = "gate_test_reward"

    def __init__(self):
        self.release, self.entered, self.batches = threading.Event(), threading.Event(), []

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        self.entered.set()
        self.release.wait(300)  # released by the test once every request has queued
        self.batches.append(list(prompts))
        return {"score": images.mean(dim=(1, 2, 3)), "prompt_len": torch.tensor([len(p) for p in prompts])}


def test_server_batches_queued_requests_and_splits_the_answers():
    from titan_flow.rewards.serve import BatchingScorer, Job

    gate = Gate()
    scorer = BatchingScorer("gate", gate, max_batch_size=5)
    results = {}

    def ask(i, n, size=8):
        x = torch.full((n, 3, size, size), i / 10)
        results[i] = scorer.score(Job(x, [f"p{i}" * (k + 1) for k in range(n)], [{}] * n, None, True))

    threads = [threading.Thread(target=ask, args=(0, 1))]
    threads[0].start()
    assert gate.entered.wait(120)
    for queued, (i, n, size) in enumerate(((1, 2, 8), (2, 2, 8), (3, 2, 8), (4, 1, 16)), 1):  # 4: another size
        threads.append(threading.Thread(target=ask, args=(i, n, size)))
        threads[-1].start()
        deadline = time.monotonic() + 120  # generous: a loaded machine may schedule the thread late
        while scorer.jobs.qsize() < queued:  # queue them in this order
            assert time.monotonic() < deadline
            time.sleep(0.01)
    gate.release.set()
    for t in threads:
        t.join(300)
    assert [len(b) for b in gate.batches] == [1, 4, 2, 1]  # 1+2+2 > 5 images: the third request waits
    for i, n in ((0, 1), (1, 2), (2, 2), (3, 2), (4, 1)):
        assert results[i]["score"] == pytest.approx([i / 10] * n)
        assert results[i]["prompt_len"] == [len(f"p{i}") * (k + 1) for k in range(n)]


def test_client_survives_a_server_restart_mid_run(tmp_path, caplog):
    port = free_port()
    url = f"http://127.0.0.1:{port}/jpeg_compressibility"
    server = Server(["--rewards", "jpeg_compressibility"], port)
    server.wait_ready()
    n = 400
    x = torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    client = RemoteReward("jpeg_compressibility", url, RetryPolicy(timeout_seconds=10, max_retries=40, backoff_seconds=0.1),
                          chunk_size=1)
    result = {}

    def run():
        try:
            result["out"] = client(x, ["p"] * n, [{}] * n)
        except Exception as e:  # pragma: no cover - reported below
            result["error"] = e

    with caplog.at_level(logging.WARNING, logger="titan_flow.rewards.remote"):
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while server.scored() < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        done_before_kill = server.scored()
        server.kill()
        time.sleep(0.5)
        restarted = Server(["--rewards", "jpeg_compressibility"], port)
        try:
            thread.join(180)
        finally:
            restarted.kill()
    assert "error" not in result, result.get("error")
    assert 5 <= done_before_kill < n
    assert restarted.scored() > 0  # the rest was scored by the new server
    retries = [r for r in caplog.records if url in r.getMessage()]
    assert retries, "the client never saw the server go away"
    print(f"scored {done_before_kill} before the kill, {restarted.scored()} after; {len(retries)} retries")
    local = build_reward("jpeg_compressibility")(x, ["p"] * n, [{}] * n)["score"]
    assert result["out"]["score"].tolist() == local.tolist()  # nothing lost, nothing scored 0


def test_retry_policy_is_validated_and_backs_off_exponentially():
    policy = RetryPolicy(timeout_seconds=5, max_retries=10, backoff_seconds=1.0)
    assert [policy.delay(k) for k in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    with pytest.raises(ValueError, match=r"reward\.max_retries must be an integer >= 0"):
        MultiReward({"deqa": 1.0}, {}, "cpu", max_retries=-1)
    with pytest.raises(ValueError, match=r"reward\.timeout_seconds must be > 0"):
        RetryPolicy(timeout_seconds=0)


def test_busy_server_429_is_retried():
    calls = []

    def respond(handler, body):
        calls.append(1)
        if len(calls) == 1:
            return 429, b"too many requests", "text/plain"
        return 200, pickle.dumps({"outputs": [0.25] * len(pickle.loads(body)["images"])}), "application/octet-stream"

    stub = Stub(respond)
    out = DeQA(stub.url, FAST)(gray_images(2), ["p"] * 2, [{}] * 2)
    stub.close()
    assert len(calls) == 2 and out["score"].tolist() == [0.25, 0.25]
