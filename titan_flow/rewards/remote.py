"""HTTP client of the reward servers: timeouts, retries with exponential backoff, nothing lost.

Every request is retried on connection errors, timeouts, HTTP 5xx (a GenEval server answers 500
with its traceback when a worker fails), 408 and 429, waiting backoff * 2^k seconds (capped at
60 s) before attempt k + 1. A batch is never scored 0 because a server was unreachable: after
`max_retries` retries the call raises `RewardServerError` naming the URL and the last error.
Other HTTP 4xx (a bad request) fail at once. Only the standard library is used.

`RemoteReward` scores any registered reward on titan_flow's own server (`python -m
titan_flow.rewards.serve`), so a reward runs locally or served with the same results.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from titan_flow.rewards import protocol
from titan_flow.rewards.registry import Reward, as_float_images, scores_tensor, to_uint8

logger = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 60.0
RETRIED_CLIENT_ERRORS = (408, 429)  # request timeout, too many requests: the server is busy, not the request bad


class RewardServerError(RuntimeError):
    """A reward server stayed unreachable/failing through every retry, or rejected the request."""


@dataclass(frozen=True)
class RetryPolicy:
    timeout_seconds: float = 120.0
    max_retries: int = 30
    backoff_seconds: float = 1.0

    def __post_init__(self):
        if not self.timeout_seconds > 0:
            raise ValueError(f"reward.timeout_seconds must be > 0, got {self.timeout_seconds}")
        if not (isinstance(self.max_retries, int) and self.max_retries >= 0):
            raise ValueError(f"reward.max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not self.backoff_seconds >= 0:
            raise ValueError(f"reward.retry_backoff_seconds must be >= 0, got {self.backoff_seconds}")

    def delay(self, retry: int) -> float:
        return min(self.backoff_seconds * 2**retry, MAX_BACKOFF_SECONDS)


def post(url: str, body: bytes, policy: RetryPolicy, content_type: str = "application/octet-stream",
         headers: dict[str, str] | None = None) -> bytes:
    """POST `body` to `url` and return the 200 answer's body, retrying transient failures."""
    request_headers = {"Content-Type": content_type, **(headers or {})}
    start = time.monotonic()
    for attempt in range(policy.max_retries + 1):
        try:
            request = urllib.request.Request(url, data=body, headers=request_headers, method="POST")
            with urllib.request.urlopen(request, timeout=policy.timeout_seconds) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[-2000:]
            if e.code < 500 and e.code not in RETRIED_CLIENT_ERRORS:
                raise RewardServerError(f"reward server {url} rejected the request: HTTP {e.code}: {detail}") from None
            error = f"HTTP {e.code}: {detail}"
            summary = f"HTTP {e.code}: {detail.strip().splitlines()[-1][:300] if detail.strip() else ''}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
            error = summary = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < policy.max_retries:
            wait = policy.delay(attempt)
            logger.warning(
                "reward server %s failed (%s); retry %d/%d in %.1fs", url, summary, attempt + 1, policy.max_retries, wait
            )
            time.sleep(wait)
    raise RewardServerError(
        f"reward server {url} failed {policy.max_retries + 1} times over {time.monotonic() - start:.0f}s; "
        f"last error: {error}\nIs it running? Start it (launch/reward_server.sh) or fix reward.urls; "
        "reward.max_retries / reward.retry_backoff_seconds / reward.timeout_seconds set the patience."
    )


def post_pickle(url: str, payload: dict, policy: RetryPolicy, required: tuple[str, ...]) -> dict:
    """POST a pickled request; the answer must be a pickled dict holding the `required` keys."""
    data = post(url, protocol.dumps(payload), policy)
    try:
        answer = protocol.loads(data)
    except Exception as e:
        raise RewardServerError(f"reward server {url} answered something that is not a pickled dict: {e}") from None
    if not isinstance(answer, dict):
        raise RewardServerError(f"reward server {url} answered a {type(answer).__name__}, expected a dict")
    missing = [k for k in required if k not in answer]
    if missing:
        raise RewardServerError(f"reward server {url} answered without {missing} (keys: {sorted(answer)}); wrong URL or protocol?")
    return answer


def health(url: str, timeout: float = 5.0) -> dict | None:
    """The /health answer of a titan_flow reward server at `url` (any of its paths), or None if unreachable."""
    parts = urlsplit(url)
    try:
        with urllib.request.urlopen(f"{parts.scheme}://{parts.netloc}/health", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None


class RemoteReward(Reward):
    """A reward scored by titan_flow's reward server at `url` (e.g. http://host:18090/pickscore).

    Images travel as PNG (lossless), so the served score equals the local one; requests hold at
    most `chunk_size` images and each is retried on its own, so a server restart mid-batch loses
    nothing.
    """

    remote = True
    takes_video = True  # videos travel as frames; the server's reward decides how to score them

    def __init__(self, name: str, url: str, policy: RetryPolicy = RetryPolicy(), chunk_size: int = protocol.CHUNK_SIZE):
        self.name, self.url, self.policy, self.chunk_size = name, url, policy, chunk_size

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        n = len(prompts)
        frames = images.shape[1] if images.ndim == 5 else None
        pixels = to_uint8(images)
        blobs = protocol.encode_images(pixels if frames is None else pixels.reshape(-1, *pixels.shape[2:]), "PNG")
        refs = None
        if ref_images is not None:  # one at a time: reference images may differ in size
            refs = [protocol.encode_images(to_uint8(im[None]), "PNG")[0] for im in as_float_images(ref_images)]
        scores, extras = [], {}
        per_item = frames or 1  # a request holds about chunk_size frames
        for sl in protocol.chunk_slices(n, max(1, self.chunk_size // per_item)):
            request = {
                "images": blobs[sl.start * per_item : sl.stop * per_item],
                "prompts": list(prompts[sl]),
                "meta_datas": list(metadata[sl]),
                "ref_images": None if refs is None else refs[sl],
                "only_strict": only_strict,
            }
            if frames is not None:
                request["num_frames"] = frames
            answer = post_pickle(self.url, request, self.policy, required=("scores",))
            scores.extend(answer["scores"])
            for key, values in answer.get("extras", {}).items():
                extras.setdefault(key, []).extend(values)
        out = {"score": scores_tensor(scores, self.name, n)}
        out.update({k: scores_tensor(v, f"{self.name}/{k}", n) for k, v in extras.items()})
        return out
