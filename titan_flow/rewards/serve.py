"""titan_flow's reward server: any registered reward over HTTP, on a GPU (or CPU) of its own.

    python -m titan_flow.rewards.serve --rewards pickscore,ocr --model-path pickscore=/models/pickscore \
        --device cuda:0 --port 18090 [--host 0.0.0.0] [--option ocr.backend=rapidocr] [--config job.toml]

The trainer then scores those rewards remotely with `reward.urls = {pickscore =
"http://<host>:18090/pickscore", ocr = "http://<host>:18090/ocr"}`.

Endpoints:
    POST /<reward>   the pickled protocol of protocol.py (POST / works when one reward is served), images
                     or videos (frames flattened, with "num_frames");
                     200 + pickled {"scores", "extras"}; 500 + traceback when scoring failed (the
                     client retries); 400 for a malformed request, 404 for an unknown reward.
    GET  /health     200 + JSON {"status": "ok", "rewards": [...], "device": ..., "pid": ...}

Requests arriving together (several ranks, several chunks) are merged into one model call of up
to --max-batch-size images per reward, as long as they share the image size. The port is opened
only once every model is loaded, so clients retry until the server is really ready. Requests are
unpickled as plain data only; still, bind to a network only trusted hosts can reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from titan_flow.rewards import protocol
from titan_flow.rewards.registry import Reward, build_reward, call_reward, get_reward_class, scores_tensor

logger = logging.getLogger("titan_flow.rewards.serve")


@dataclass
class Job:
    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    ref_images: list | None
    only_strict: bool
    future: Future = field(default_factory=Future)

    def compatible(self, other: "Job") -> bool:
        return (
            self.images.shape[1:] == other.images.shape[1:]
            and (self.ref_images is None) == (other.ref_images is None)
            and self.only_strict == other.only_strict
        )


class BatchingScorer:
    """One thread per reward: takes queued jobs, merges compatible ones, scores, splits the results."""

    def __init__(self, name: str, reward: Reward, max_batch_size: int):
        self.name, self.reward, self.max_batch_size = name, reward, max_batch_size
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.held: Job | None = None
        threading.Thread(target=self._loop, name=f"score-{name}", daemon=True).start()

    def score(self, job: Job) -> dict[str, list[float]]:
        self.jobs.put(job)
        return job.future.result()

    def _next_batch(self) -> list[Job]:
        first = self.held or self.jobs.get()
        self.held, batch, size = None, [first], len(first.prompts)
        while size < self.max_batch_size:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if not first.compatible(job) or size + len(job.prompts) > self.max_batch_size:
                self.held = job
                break
            batch.append(job)
            size += len(job.prompts)
        return batch

    def _loop(self):
        while True:
            batch = self._next_batch()
            try:
                refs = None if batch[0].ref_images is None else [r for j in batch for r in j.ref_images]
                out = call_reward(
                    self.reward,
                    torch.cat([j.images for j in batch]),
                    [p for j in batch for p in j.prompts],
                    [m for j in batch for m in j.metadata],
                    refs,
                    batch[0].only_strict,
                )
                n = sum(len(j.prompts) for j in batch)
                columns = {key: scores_tensor(v, f"{self.name}/{key}", n).tolist() for key, v in out.items()}
                logger.info("%s: scored %d images from %d requests", self.name, n, len(batch))
                start = 0
                for job in batch:
                    stop = start + len(job.prompts)
                    job.future.set_result({key: values[start:stop] for key, values in columns.items()})
                    start = stop
            except Exception as e:  # every waiting request gets the error (-> HTTP 500, retried)
                logger.exception("%s: scoring failed", self.name)
                for job in batch:
                    job.future.set_exception(e)


class _BadRequest(ValueError):
    pass


def parse_request(payload) -> Job:
    if not isinstance(payload, dict) or "images" not in payload:
        raise _BadRequest("the body must be a pickled dict with at least 'images'")
    frames = payload.get("num_frames")
    if frames is not None and (not isinstance(frames, int) or frames < 1 or len(payload["images"]) % frames):
        raise _BadRequest(f"num_frames = {frames!r} does not divide the {len(payload['images'])} images into videos")
    images = protocol.decode_images(payload["images"])
    n = len(images) // (frames or 1)
    prompts = list(payload.get("prompts") or [""] * n)
    metadata = list(payload.get("meta_datas") or [{} for _ in range(n)])
    refs = payload.get("ref_images")
    if n == 0 or len(prompts) != n or len(metadata) != n or (refs is not None and len(refs) != n):
        raise _BadRequest(f"got {n} images, {len(prompts)} prompts, {len(metadata)} meta_datas"
                          + ("" if refs is None else f", {len(refs)} ref_images"))
    pixels = protocol.pil_to_tensor(images)
    return Job(
        pixels if frames is None else pixels.unflatten(0, (n, frames)), prompts, metadata,
        None if refs is None else protocol.decode_images(refs), bool(payload.get("only_strict", True)),
    )


def make_handler(scorers: dict[str, BatchingScorer], device: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: bytes, content_type: str):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _text(self, code: int, text: str):
            self._send(code, text.encode("utf-8"), "text/plain; charset=utf-8")

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                info = {"status": "ok", "rewards": sorted(scorers), "device": device, "pid": os.getpid()}
                self._send(200, json.dumps(info).encode(), "application/json")
            else:
                self._text(404, f"unknown path {self.path}; GET /health or POST /<reward> with one of {sorted(scorers)}")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            name = self.path.strip("/") or (next(iter(scorers)) if len(scorers) == 1 else "")
            if name not in scorers:
                self._text(404, f"this server scores {sorted(scorers)}; POST to /<reward>, not {self.path}")
                return
            try:
                job = parse_request(protocol.loads(body))
            except Exception as e:
                self._text(400, f"malformed request: {type(e).__name__}: {e}")
                return
            try:
                columns = scorers[name].score(job)
            except Exception:
                self._text(500, traceback.format_exc())
                return
            scores = columns.pop("score")
            self._send(200, protocol.dumps({"scores": scores, "extras": columns}), "application/octet-stream")

        def log_message(self, fmt, *args):
            logger.debug("%s %s", self.address_string(), fmt % args)

    return Handler


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m titan_flow.rewards.serve", description=__doc__.split("\n")[0])
    p.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. pickscore,ocr")
    p.add_argument("--model-path", action="append", default=[], metavar="NAME=PATH", help="local weights of a reward")
    p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="keyword option of a reward (VALUE parsed as JSON when it is JSON)")
    p.add_argument("--config", default="", help="a job TOML; its [reward] model_paths, options and device are used")
    p.add_argument("--device", default="", help="device of the reward models (default: cuda if available, else cpu)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18090, help="0 picks a free port (printed at start)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most images merged into one model call")
    return p.parse_args(argv)


def build_scorers(args) -> tuple[dict[str, BatchingScorer], str]:
    model_paths, options, device = {}, {}, args.device
    if args.config:
        from titan_flow.config.manager import load_toml

        section = load_toml(args.config).get("reward", {})
        model_paths.update(section.get("model_paths", {}))
        options.update(section.get("options", {}))
        device = device or section.get("device", "")
    model_paths.update(_key_values(args.model_path, "--model-path"))
    for key, value in _key_values(args.option, "--option").items():
        name, sep, opt = key.partition(".")
        if not sep:
            raise SystemExit(f"--option expects NAME.KEY=VALUE, got {key!r}")
        try:
            value = json.loads(value)
        except ValueError:
            pass
        options.setdefault(name, {})[opt] = value
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorers = {}
    for name in [n.strip() for n in args.rewards.split(",") if n.strip()]:
        if get_reward_class(name).remote:
            raise SystemExit(f"{name} is scored by its own server (see titan_flow/rewards/{name}.py), not by this one")
        try:
            reward = build_reward(name, model_paths.get(name), device, **options.get(name, {}))
        except FileNotFoundError as e:
            raise SystemExit(f"{e}\n(on the server: --model-path {name}=PATH, or [reward] model_paths of --config)") from None
        scorers[name] = BatchingScorer(name, reward, args.max_batch_size)
    if not scorers:
        raise SystemExit("--rewards names no reward")
    return scorers, device


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    scorers, device = build_scorers(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(scorers, device))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"titan_flow reward server: {', '.join(scorers)} on {device} at http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
