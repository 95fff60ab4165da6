"""The app under torchrun: `torchrun --nproc-per-node 2 app.py` on CPU (gloo), driven with
gradio_client.

One run serves the first tests, in order: a greedy reply equals the single-process reply on the
same random checkpoint, the status line and the KV-cache figure report 2 ranks, then killing
rank 1 mid-reply makes rank 0 name it and the whole run exit, leaving no process. A second run
checks that Ctrl-C mid-reply stops every rank without blaming one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gradio_client import Client

from llama.assets import shipped_model_dir
from llama.checkpoints import save
from llama.config import ModelArgs
from llama.model import Transformer
from llama.sampling import SamplingParams
from tests.app_server import free_port
from tests.conftest import REPO
from tests.test_gradio_client import respond_args, text_of, wait_for_output
from ui.runtime import load_runtime
from ui.turn import SessionControl, Views, format_bytes, run_turn

START_TIMEOUT_S = 180  # torchrun + 2 ranks importing torch (+ gradio on rank 0), 2 busy cores
EXIT_TIMEOUT_S = 30  # a killed rank -> rank 0 names it and every process is gone
PROMPT, GREEDY_TOKENS = "Once upon a time", 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GQA model (native format) with the shipped tokenizer. The EOS row of
    the output projection is zero, so greedy replies never end early (other logits win)."""
    tokenizer = shipped_model_dir() / "tokenizer.model"
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=1200)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    for p in model.parameters():
        p.data.normal_(0.0, 0.5)
    model.output.weight.data[2] = 0.0  # EOS (id 2 in the Llama tokenizer)
    return save(model, tmp_path_factory.mktemp("tp-app") / "tiny", tokenizer)


@dataclass
class Run:
    proc: subprocess.Popen
    url: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ranks(self) -> dict[int, int]:
        """RANK -> pid of torchrun's workers (read from their environment)."""
        out = {}
        for pid in _children(self.proc.pid):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = pid
        return out


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _launch(checkpoint: Path, log: Path) -> Run:
    """`torchrun --nproc-per-node 2 app.py` on free ports; returns once the page answers."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(REPO / "app.py"),
        "--model",
        str(checkpoint),
        "--template",
        "completion",
        "--threads",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "LLAMA_TP_HEARTBEAT": "5",
        "OMP_NUM_THREADS": "1",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Run(proc, f"http://127.0.0.1:{port}/", log)
    try:
        _wait_until_served(served)
    except BaseException:
        _stop(served)
        raise
    return served


def _stop(served: Run) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(10)


@pytest.fixture(scope="module")
def run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    served = _launch(checkpoint, tmp_path_factory.mktemp("tp-app-log") / "torchrun.log")
    yield served
    _stop(served)


def _wait_until_served(served: Run) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            pytest.fail(f"torchrun exited with {served.proc.returncode}:\n{served.text()}")
        try:
            with urllib.request.urlopen(served.url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer within {START_TIMEOUT_S} s:\n{served.text()}")


def _greedy_args(max_new_tokens: int, views: list[str]) -> list:
    return respond_args(
        "completion", 1, temperature=0.0, max_new_tokens=max_new_tokens, views=views, every=1
    )


def test_greedy_reply_equals_one_process_and_status_shows_two_ranks(
    run: Run, checkpoint: Path
) -> None:
    client = Client(run.url, verbose=False)
    client.predict(PROMPT, api_name="/add_message")
    out = client.predict(*_greedy_args(GREEDY_TOKENS, ["kv"]), api_name="/respond")
    client.close()
    reply, kv_figure, status = text_of(out[0][-1]), out[4], out[5]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rt = load_runtime(checkpoint, template="completion", progress=False)
        settings = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_TOKENS, seed=1)
        history = [{"role": "user", "content": PROMPT}]
        *_, last = run_turn(
            rt, history, settings, Views(shown=frozenset()), "completion", "", SessionControl()
        )
    finally:
        torch.set_num_threads(threads)
    assert reply and reply == last.chat[-1]["content"]
    assert "finished: length" in status, status
    # Status: the whole model's KV bytes (as one process holds them), then 2 ranks x each
    # rank's (half the KV heads each); the model line names the ranks.
    used = last.step.position + 1
    total, capacity = rt.kv_bytes(used), rt.kv_bytes(rt.max_seq_len)
    whole = f"KV cache {format_bytes(total)} of {format_bytes(capacity)}"
    each = f"(2 ranks × {format_bytes(total // 2)} of {format_bytes(capacity // 2)})"
    assert f"{whole} {each}" in status and "cpu × 2 ranks" in status, status
    figure = json.dumps(kv_figure)
    assert "over 2 ranks" in figure and "per rank" in figure and "all 2 ranks" in figure


def _mid_reply(run: Run) -> tuple[Client, dict[int, int]]:
    """A long greedy reply streaming; -> (its client, RANK -> pid)."""
    ranks = run.ranks()
    assert sorted(ranks) == [0, 1], ranks
    client = Client(run.url, verbose=False)
    client.predict(PROMPT, api_name="/add_message")
    job = client.submit(*_greedy_args(1024, []), api_name="/respond")
    wait_for_output(job)
    assert not job.done(), "the reply ended before the test could interrupt it"
    return client, ranks


def _wait_exit(run: Run, what: str) -> int:
    t0 = time.monotonic()
    try:
        code = run.proc.wait(EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {EXIT_TIMEOUT_S} s after {what}:\n{run.text()}")
    print(f"torchrun exited {time.monotonic() - t0:.1f} s after {what}")
    return code


def test_killed_rank_is_named_and_every_process_exits(run: Run) -> None:
    client, ranks = _mid_reply(run)
    os.kill(ranks[1], signal.SIGKILL)  # as the OOM killer would
    code = _wait_exit(run, "rank 1 was killed")
    log = run.text()
    assert code != 0 and "tensor-parallel rank 1 of 2 failed" in log, log
    assert "pid" in log.split("rank 1 of 2 failed", 1)[1].splitlines()[0], log
    assert not [pid for pid in ranks.values() if _alive(pid)], log
    client.close()


def test_ctrl_c_stops_every_rank_without_blaming_one(checkpoint: Path, tmp_path: Path) -> None:
    run = _launch(checkpoint, tmp_path / "torchrun.log")
    try:
        client, ranks = _mid_reply(run)
        run.proc.send_signal(signal.SIGINT)  # Ctrl-C reaches torchrun, which forwards it
        _wait_exit(run, "Ctrl-C")
        log = run.text()
        assert not [pid for pid in ranks.values() if _alive(pid)], log
        assert "tensor-parallel rank" not in log, log  # nobody failed
        client.close()
    finally:
        _stop(run)
