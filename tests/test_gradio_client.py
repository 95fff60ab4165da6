"""The app as a server, driven through Gradio's API with gradio_client.

One `python app.py` subprocess on a free 127.0.0.1 port serves every test here. The main test
runs 8 sessions x 5 turns at once: every reply must arrive, equal what the same seed gives when
the same dialog is replayed alone in this process (no cross-talk between sessions), and the
server's RSS after the last round must stay within 10% of its RSS after the first round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from gradio_client import Client
from gradio_client.utils import Status

from llama.sampling import SamplingParams
from tests.app_server import AppServer, model_path, model_template, start_app
from ui.outputs import OUTPUT_KEYS
from ui.runtime import load_runtime
from ui.settings import SAMPLING_FIELDS, SLIDERS
from ui.turn import SessionControl, Views, run_turn

N_SESSIONS, N_TURNS, MAX_NEW = 8, 5, 8
API_OUTPUTS = [k for k in OUTPUT_KEYS if k not in ("history", "last", "why", "record")]  # no States
SUBJECTS = [
    "a dog named Max",
    "a cat named Lily",
    "a red ball",
    "a big tree",
    "a little bird",
    "a happy frog",
    "a brave boy named Tim",
    "a blue car",
]
FOLLOW_UPS = ["Tell me more.", "What happened next?", "And then?", "How did it end?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    srv = start_app(tmp_path_factory.mktemp("app"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def template(server: AppServer) -> str:
    """The template the app chose for its model."""
    return model_template()


def respond_args(template: str, seed: int | None, **over: Any) -> list[Any]:
    """/respond's parameters: system, template, 8 sampling values, seed, stop, 5 view values."""
    values = {name: SLIDERS[name].default for name in SAMPLING_FIELDS}
    values.update(temperature=0.9, max_new_tokens=MAX_NEW)
    values.update({k: v for k, v in over.items() if k in values})
    views = over.get("views", ["kv"])
    return [
        "",
        template,
        *[values[k] for k in SAMPLING_FIELDS],
        seed,
        over.get("stop", ""),
        views,
        0,
        -1,
        "heads",
        over.get("every", 64),
    ]


def text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def message(session: int, turn: int) -> str:
    if turn == 0:
        return f"Write a story about {SUBJECTS[session]}."
    return FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]


def chat_turn(client: Client, template: str, text: str, seed: int) -> tuple[str, str]:
    """One turn through the UI's own two events; returns (reply, status line)."""
    client.predict(text, api_name="/add_message")
    out = client.submit(*respond_args(template, seed), api_name="/respond").result(timeout=300)
    return text_of(out[0][-1]), out[5]


def test_eight_sessions_five_turns_no_cross_talk_no_leak(server: AppServer, template: str) -> None:
    clients = [Client(server.url, verbose=False) for _ in range(N_SESSIONS)]
    replies: dict[tuple[int, int], str] = {}
    rss_first = 0
    with ThreadPoolExecutor(N_SESSIONS) as pool:
        for turn in range(N_TURNS):
            futures = {
                s: pool.submit(chat_turn, clients[s], template, message(s, turn), seed(s, turn))
                for s in range(N_SESSIONS)
            }
            for s, future in futures.items():
                reply, status = future.result(timeout=600)
                assert "finished:" in status, status
                replies[(s, turn)] = reply
            if turn == 0:
                rss_first = server.rss_bytes()
    rss_last = server.rss_bytes()
    for c in clients:
        c.close()
    assert len(replies) == N_SESSIONS * N_TURNS and all(replies.values())
    expected = replay_alone(template)
    mismatched = [key for key in replies if replies[key] != expected[key]]
    assert not mismatched, [(k, replies[k], expected[k]) for k in mismatched[:3]]
    print(
        f"server RSS after round 1: {rss_first / 2**20:.1f} MiB, after round "
        f"{N_TURNS}: {rss_last / 2**20:.1f} MiB"
    )
    assert rss_last <= 1.10 * rss_first, (rss_first, rss_last)


def seed(session: int, turn: int) -> int:
    return 1000 * session + turn


def replay_alone(template: str) -> dict[tuple[int, int], str]:
    """The same dialogs run one after another in this process, straight through run_turn."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rt = load_runtime(model_path(), progress=False)
        out = {}
        for s in range(N_SESSIONS):
            history: list[dict[str, str]] = []
            for turn in range(N_TURNS):
                history.append({"role": "user", "content": message(s, turn)})
                settings = SamplingParams(
                    temperature=0.9, max_new_tokens=MAX_NEW, seed=seed(s, turn)
                )
                *_, last = run_turn(
                    rt, history, settings, Views(shown=frozenset()), template, "", SessionControl()
                )
                history = last.chat
                out[(s, turn)] = history[-1]["content"]
        return out
    finally:
        torch.set_num_threads(threads)


OUT_OF_RANGE = [
    ("temperature", 5.0, "Temperature"),
    ("top_p", 1.5, "Top-p"),
    ("top_k", -1, "Top-k"),
    ("max_new_tokens", 100_000, "Max new tokens"),
]


def test_out_of_range_values_through_the_api_get_a_clear_error(
    server: AppServer, template: str
) -> None:
    client = Client(server.url, verbose=False)
    client.predict("Once upon a time", api_name="/add_message")
    for field, value, label in OUT_OF_RANGE:
        args = respond_args(template, 1)
        args[2 + SAMPLING_FIELDS.index(field)] = value
        with pytest.raises(Exception, match=label) as info:
            client.predict(*args, api_name="/respond")
        assert "maximum" in str(info.value) or "minimum" in str(info.value), field
    # The seed is a text box: a bad seed is refused by the handler, naming the field, and the
    # message goes back to the text box (the last output) instead of being lost.
    args = respond_args(template, 1)
    args[2 + len(SAMPLING_FIELDS)] = "-5"
    out = client.predict(*args, api_name="/respond")
    assert "seed" in out[5] and out[API_OUTPUTS.index("message")] == "Once upon a time"
    client.predict("Once upon a time", api_name="/add_message")
    # Nothing was lost: the same session still gets its reply with valid values.
    reply = client.predict(*respond_args(template, 1), api_name="/respond")
    assert text_of(reply[0][-1]) and text_of(reply[0][0]) == "Once upon a time"
    client.close()


def long_reply(client: Client, template: str, seed: int) -> Any:
    """Send a message and return its reply job once it streams (1024 tokens at most; it may
    still end early on EOS, which callers check)."""
    client.predict("Once upon a time", api_name="/add_message")
    job = client.submit(
        *respond_args(template, seed, max_new_tokens=1024, views=[]), api_name="/respond"
    )
    wait_for_output(job)
    return job


def queue_rank(job: Any, while_running: Any, timeout: float = 30) -> int | None:
    """The queue rank gradio reports for `job` while `while_running` is still going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not while_running.done():
        update = job.status()
        if update.code == Status.IN_QUEUE and update.rank is not None:
            return update.rank
        time.sleep(0.02)
    return None


def test_busy_session_queue_position_stop_twice_and_dropped_job(
    server: AppServer, template: str
) -> None:
    a, b, c = (Client(server.url, verbose=False) for _ in range(3))
    for seed_ in range(3, 9):  # a reply that ends on its own (EOS) too soon is tried again
        long = long_reply(a, template, seed_)
        try:
            a.predict("Another message", api_name="/add_message")  # sent while generating
        except Exception as exc:
            assert "still being written" in str(exc)
        else:
            assert long.done()  # accepted only because the reply had just ended: answer it
            a.predict(*respond_args(template, 1, max_new_tokens=2, views=[]), api_name="/respond")
            continue
        b.predict("The little dog", api_name="/add_message")
        waiting = b.submit(
            *respond_args(template, 2, max_new_tokens=4, views=[]), api_name="/respond"
        )
        rank = queue_rank(waiting, long)  # what b's page shows: its place in the queue
        a.predict(api_name="/stop")
        a.predict(api_name="/stop")  # pressed twice: harmless
        final = long.result(timeout=120)
        assert "finished:" in waiting.result(timeout=120)[5]
        if "finished: cancelled" in final[5]:
            assert rank == 0, rank
            break
    else:
        pytest.fail("every long reply ended on its own before Stop")
    # A job dropped by its client (what a closed tab does) frees the model for the next one.
    for seed_ in range(10, 16):
        dropped = long_reply(b, template, seed_)
        if not dropped.done():
            break
    dropped.cancel()
    c.predict("Once upon a time", api_name="/add_message")
    start = time.monotonic()
    out = c.predict(*respond_args(template, 5, max_new_tokens=4), api_name="/respond")
    assert "finished:" in out[5] and time.monotonic() - start < 60
    for client in (a, b, c):
        client.close()


def wait_for_output(job: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not job.outputs():
        assert time.monotonic() < deadline, "no streamed output"
        time.sleep(0.05)


def test_export_then_import_through_the_api(
    server: AppServer, template: str, tmp_path: Path
) -> None:
    from gradio_client import handle_file

    client = Client(server.url, verbose=False)
    reply, _ = chat_turn(client, template, "Hello!", 11)
    export_args = respond_args(template, 11)
    path = client.predict(*export_args[:11], "", "11", api_name="/export_chat")
    other = Client(server.url, verbose=False)
    out = other.predict(handle_file(path), api_name="/import_chat")
    assert [text_of(m) for m in out[0]] == ["Hello!", reply]
    client.close()
    other.close()


# Issue 15: no refusal leaves a session stuck; imports read only uploads ---------------------
REFUSED = [  # (respond argument index, value): gradio refuses each before the handler runs
    (2 + SAMPLING_FIELDS.index("temperature"), -1),
    (2 + SAMPLING_FIELDS.index("top_p"), float("nan")),
    (2 + len(SAMPLING_FIELDS) + 3, 999),  # layer
    (2 + len(SAMPLING_FIELDS) + 5, "bogus"),  # attention panel mode
]


@pytest.mark.parametrize(("index", "value"), REFUSED)
def test_a_refused_reply_leaves_the_session_free(
    server: AppServer, template: str, index: int, value: Any
) -> None:
    client = Client(server.url, verbose=False)
    client.predict("Once upon a time", api_name="/add_message")
    args = respond_args(template, 1, max_new_tokens=2)
    args[index] = value
    with pytest.raises(Exception):
        client.predict(*args, api_name="/respond")
    # The next message is accepted and answered; the refused one is not in the history.
    client.predict("Hello", api_name="/add_message")
    out = client.predict(*respond_args(template, 1, max_new_tokens=2), api_name="/respond")
    assert text_of(out[0][0]) == "Hello" and len(out[0]) == 2, out[0]
    client.close()


def test_stop_takes_back_a_message_whose_reply_was_refused(
    server: AppServer, template: str
) -> None:
    client = Client(server.url, verbose=False)
    client.predict("Once upon a time", api_name="/add_message")
    with pytest.raises(Exception):
        client.predict(*respond_args(template, 1, temperature=-1), api_name="/respond")
    box, chat = client.predict(api_name="/stop")
    assert box == "Once upon a time" and chat == []
    client.predict("Hello", api_name="/add_message")
    client.close()


def raw_call(server: AppServer, api_name: str, *data: Any) -> str:
    """Call an endpoint over plain HTTP: gradio_client would upload a local file it is given
    (from the client's own disk), which is not what a hostile client sends."""
    import httpx

    call = f"{server.url}gradio_api/call/{api_name}"
    event = httpx.post(call, json={"data": list(data)}, timeout=60).json()["event_id"]
    with httpx.stream("GET", f"{call}/{event}", timeout=120) as stream:
        return stream.read().decode()


def test_import_reads_no_server_file(server: AppServer, tmp_path: Path) -> None:
    """The repro: a FileData naming a server path (or a URL), no upload. Nothing is read and
    nothing of the file comes back; an uploaded bad file is named by field, not by value."""
    from gradio_client import handle_file

    secret = tmp_path / "secret.json"
    chat = {"format": "llama-playground-chat", "version": 1, "template": "chat", "system": "",
            "messages": [{"role": "user", "content": "SECRET-CONTENT"}],
            "sampling": {"temperature": "SECRET-VALUE"}}  # fmt: skip
    secret.write_text(json.dumps(chat))
    for path in (str(secret), "/etc/hostname", "http://127.0.0.1:9/chat.json"):
        answer = raw_call(
            server, "import_chat", {"path": path, "meta": {"_type": "gradio.FileData"}}
        )
        assert "event: error" in answer and "upload" in answer, answer
        assert "SECRET" not in answer and "complete" not in answer, answer
    client = Client(server.url, verbose=False)
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(secret)), api_name="/import_chat")
    assert "sampling.temperature" in str(info.value) and "SECRET" not in str(info.value)
    client.close()


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    srv = start_app(tmp_path_factory.mktemp("app-queue"), "--max-queue", "2")
    yield srv
    srv.stop()


def test_full_queue_leaves_every_session_free(small_queue: AppServer, template: str) -> None:
    """6 sessions, a queue of 2: the replies gradio turns away (queue full) leave their
    sessions free to send again, and every session then gets its reply."""
    clients = [Client(small_queue.url, verbose=False) for _ in range(6)]
    for client in clients:  # first: these pass through the same queue
        client.predict("Once upon a time", api_name="/add_message")
    jobs = [
        client.submit(*respond_args(template, i, max_new_tokens=200, views=[]), api_name="/respond")
        for i, client in enumerate(clients)
    ]
    turned_away = []
    for i, job in enumerate(jobs):
        try:
            job.result(timeout=300)
        except Exception as exc:  # gradio_client's QueueError
            assert "Queue is full" in str(exc), exc
            turned_away.append(i)
    assert turned_away, "the queue of 2 took all 6 replies"
    for i in turned_away:
        clients[i].predict("Hello", api_name="/add_message")
        out = clients[i].predict(*respond_args(template, i, max_new_tokens=2), api_name="/respond")
        assert text_of(out[0][0]) == "Hello" and len(out[0]) == 2
    for client in clients:
        client.close()
