"""The trainer with remote rewards for real: its reward server killed mid-run, and GenEval's protocol.

Both run `python -m titan_flow.train` under torchrun (1 gloo process, tiny debug model) against
servers on 127.0.0.1.
"""

import json
import pickle
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_rewards_remote import Server, free_port

REPO = Path(__file__).resolve().parents[1]
FAST = ["--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml"), "--training.steps", "6", "--sampling.num_steps", "4", "--eval.freq", "0", "--checkpoint.enable", "false",
        "--metrics.enable_tensorboard", "false"]


def start_trainer(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "titan_flow.train", "--job.output_dir", str(out), *FAST, *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_epochs(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [m for m in map(json.loads, path.read_text().splitlines()) if "reward/avg_mean" in m]


def test_trainer_survives_its_reward_server_being_killed(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/jpeg_compressibility"
    server = Server(["--rewards", "jpeg_compressibility"], port)
    server.wait_ready()
    trainer = start_trainer(tmp_path, "--job.run_name", "remote", "--reward.urls", json.dumps({"jpeg_compressibility": url}),
                            "--reward.retry_backoff_seconds", "0.2", "--reward.max_retries", "100")
    run = tmp_path / "remote"
    try:
        deadline = time.monotonic() + 300
        while len(logged_epochs(run)) < 2:  # let it train a little on the first server
            assert trainer.poll() is None, trainer.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "the trainer logged no epochs"
            time.sleep(0.2)
        served_before = server.scored()
        server.kill()
        epochs_while_down = len(logged_epochs(run))
        time.sleep(4)  # the trainer is retrying now
        assert len(logged_epochs(run)) <= epochs_while_down + 1  # at most the epoch already scored finishes
        server = Server(["--rewards", "jpeg_compressibility"], port)
        server.wait_ready()
        output, _ = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
        server.kill()
    assert trainer.returncode == 0, output[-5000:]
    epochs = logged_epochs(run)
    assert [m["step"] for m in epochs] == list(range(6))
    assert all(-0.02 < m["reward/jpeg_compressibility_mean"] < 0 for m in epochs)  # real JPEG sizes, never 0
    assert served_before >= 2 and server.scored() >= 1  # both servers scored
    assert "retry" in output.lower() and url in output  # the retries are visible in the log


# A GenEval-protocol server that "detects" the count written in each prompt's metadata.
TASKS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def geneval_server():
    def answer(body: bytes) -> bytes:
        data = pickle.loads(body)
        scores, strict, groups = [], [], {t: [] for t in TASKS}
        for meta in data["meta_datas"]:
            want, found = meta["include"][0]["count"], meta["found"]
            scores.append(1 - abs(want - found) / want)
            strict.append(float(found == want))
            for t in TASKS:
                groups[t].append(strict[-1] if t == meta["tag"] else -10.0)
        return pickle.dumps({"scores": scores, "rewards": strict, "strict_rewards": strict,
                             "group_rewards": groups, "group_strict_rewards": groups})

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            reply = answer(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_geneval_rewards_in_training_and_its_breakdown_in_eval(tmp_path):
    data = tmp_path / "geneval"
    data.mkdir()
    # counting prompts are all right (found == count), single_object ones all wrong, colors half right
    records = [{"tag": "counting", "include": [{"class": "cup", "count": 2}], "found": 2},
               {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "found": 0},
               {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "found": 1},
               {"tag": "colors", "include": [{"class": "bus", "count": 1, "color": "blue"}], "found": 3}]
    lines = [json.dumps({**r, "prompt": f"prompt {i} {r['tag']}"}) for i, r in enumerate(records)]
    for split in ("train", "test"):
        (data / f"{split}_metadata.jsonl").write_text("\n".join(lines) + "\n")
    server = geneval_server()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "titan_flow.train",
             "--job.output_dir", str(tmp_path), "--job.run_name", "geneval", *FAST, "--training.steps", "2",
             "--eval.freq", "1", "--reward.fns", "geneval=1.0",
             "--reward.urls", json.dumps({"geneval": f"http://127.0.0.1:{server.server_address[1]}"}),
             "--data.path", str(data)],
            cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = [json.loads(line) for line in (tmp_path / "geneval" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "reward/geneval_mean" in m]
    assert len(train) == 2 and all(-2.0 <= m["reward/geneval_mean"] <= 1.0 for m in train)
    evals = [m for m in metrics if "eval/reward_geneval" in m]
    assert len(evals) == 2
    e = evals[0]
    # partial credit of the four prompts: 1, 0, 1, -1 -> mean 0.25; strict accuracy per task
    assert e["eval/reward_geneval"] == pytest.approx(0.25)
    assert e["eval/geneval/counting_strict"] == 1.0 and e["eval/geneval/single_object_strict"] == 0.0
    assert e["eval/geneval/colors_strict"] == 0.5
    assert e["eval/geneval/overall_strict"] == pytest.approx(0.5)
