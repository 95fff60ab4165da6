"""The playground's callbacks without a browser: streaming order, Stop, editing, bad input.

Runs on the shipped model (assets/tinychat) when it is there, else on stories260K from
../shared/data. Replies are kept short (a few tokens) so the file stays fast on 2 cores.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
import pytest
import torch
from gradio.components.plot import PlotData

from tests.app_server import model_path, model_template
from ui import chat_io
from ui.handlers import Handlers
from ui.live import LiveTurn
from ui.outputs import ALL_HEADS, OUTPUT_KEYS, VIEW_LABELS, display
from ui.runtime import Runtime, load_runtime
from ui.settings import SAMPLING_FIELDS, SLIDERS, defaults
from ui.turn import FIGURE_KEYS, SessionControl, Views, make_probe, run_turn

ALL_VIEWS = list(VIEW_LABELS)
N_OUT = len(OUTPUT_KEYS)  # chatbot, history, 4 plots, status, text, ids, seed, last, box, ...
AT = {key: i for i, key in enumerate(OUTPUT_KEYS)}


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as app.py does for a tiny model: faster than 2 on 2 cores
    yield load_runtime(model_path(), template=model_template(), progress=False)
    torch.set_num_threads(threads)


@pytest.fixture()
def h(rt: Runtime) -> Handlers:
    return Handlers(rt, stream_interval_s=0.0)  # every token is an update


def widgets(rt: Runtime, **over):
    """respond's arguments after (history, control): system, template, sampling, views."""
    values = {name: SLIDERS[name].default for name in SAMPLING_FIELDS}
    values.update(max_new_tokens=6)
    # Views off unless a test looks at figures: drawing them is the slow part on 2 cores.
    extra = dict(
        system="",
        template=rt.default_template,
        seed=7,
        stop="",
        views=[],
        layer=0,
        head=ALL_HEADS,
        mode="heads",
        every=2,
    )
    values.update(extra)
    values.update(over)
    return [
        values["system"],
        values["template"],
        *[values[k] for k in SAMPLING_FIELDS],
        None if values["seed"] is None else str(values["seed"]),  # a Textbox sends text
        values["stop"],
        values["views"],
        values["layer"],
        values["head"],
        values["mode"],
        values["every"],
    ]


def send(h: Handlers, text: str, history: list, control: SessionControl, **over):
    """add_message then the whole respond stream; returns (outputs list, final history)."""
    _, history, _ = h.add_message(text, history, control)
    outs = list(h.respond(history, control, *widgets(h.rt, **over)))
    return outs, outs[-1][1]


def reply_of(out) -> str:
    """The reply as the history holds it, checked against what the Chatbot shows."""
    shown = out[0][-1]["content"][0]["text"]
    assert shown == out[1][-1]["content"]
    return shown


def is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def test_respond_yields_chat_figures_status_in_order(h: Handlers) -> None:
    control = SessionControl()
    outs, history = send(
        h, "Once upon a time", [], control, max_new_tokens=6, every=2, views=ALL_VIEWS
    )
    assert all(len(o) == N_OUT for o in outs)
    replies = [reply_of(o) for o in outs]
    assert len(set(replies)) >= 2  # streamed: more than one text
    for earlier, later in itertools.pairwise(replies):
        assert later.startswith(earlier)  # the reply only grows while it streams
    first = outs[0]
    assert first[1][0] == {"role": "user", "content": "Once upon a time"}
    assert first[0][0] == {
        "role": "user",
        "content": [{"type": "text", "text": "Once upon a time"}],
    }
    # Figures arrive in their own updates, serialised, the last ones drawn at the reply's end.
    drawn = [o for o in outs if not is_skip(o[2])]
    assert drawn
    for key, fig in zip(FIGURE_KEYS, drawn[-1][2:6]):
        assert isinstance(fig, PlotData) and json.loads(fig.plot)["data"], key
    trace, step = drawn[-1][AT["last"]]
    assert trace is not None and trace.n_steps == 6 and step.finish_reason == "length"
    ended = [o for o in outs if "finished:" in str(o[6])]
    assert ended and ended[0] is not outs[0]
    last = ended[0]
    # status: tokens, speed, TTFT, context, KV bytes, why it finished
    assert "6 tokens" in last[6] and "TTFT" in last[6] and "finished: length" in last[6]
    assert f"/ {h.rt.max_seq_len}" in last[6] and "KV cache" in last[6]
    assert h.rt.describe() in last[6]  # model name, shape, device, dtype, 8-bit
    assert last[7].startswith("<s>") and last[8].split()[0] == str(h.rt.tokenizer.bos_id)
    assert first[9] == "7"  # the seed used is shown
    record = last[AT["record"]]
    assert [s.position for s in record.steps] == list(
        range(record.steps[0].position, record.steps[0].position + 6)
    )
    assert history[-1]["role"] == "assistant" and history[-1]["content"] == replies[-1]
    assert not control.running and not h.rt.slot.locked()


def test_streamed_updates_are_coalesced(rt: Runtime) -> None:
    control = SessionControl()
    slow = Handlers(rt, stream_interval_s=1e6)  # only what must go out: first token and end
    _, history, _ = slow.add_message("Once upon a time", [], control)
    outs = list(slow.respond(history, control, *widgets(rt, max_new_tokens=6)))
    assert len(outs) == 2 and "finished: length" in outs[-1][6]
    assert reply_of(outs[-1]) == reply_of(
        send(Handlers(rt, 0.0), "Once upon a time", [], SessionControl())[0][-1]
    )


def live_turn(rt: Runtime, views: Views, draw_fn, n: int = 7) -> LiveTurn:
    history = [{"role": "user", "content": "Once upon a time"}]
    settings = defaults().__class__(max_new_tokens=n, seed=1)
    turn = run_turn(rt, history, settings, views, rt.default_template, "")
    return LiveTurn(turn, views, threading.Event(), interval_s=0.0, draw_fn=draw_fn)


def test_figures_every_n_tokens_from_snapshots(rt: Runtime) -> None:
    drawn: list[int] = []

    def record(trace, step, views, ranks):
        drawn.append(trace.n_steps)
        return {}

    views = Views(shown=frozenset({"kv"}), every=3, pace=0.0, min_interval_s=0.0)
    frames = list(live_turn(rt, views, record).frames())
    assert drawn[0] == 1 and drawn[-1] == 7  # the first token and the last
    assert set(drawn) <= {1, 3, 6, 7} and drawn == sorted(set(drawn))
    assert frames[-1].update.done
    off = live_turn(rt, Views(shown=frozenset()), record)
    assert all(f.figures is None and f.update.probe is None for f in off.frames())


def test_finished_views_show_the_last_real_token_not_the_end_of_turn(rt: Runtime) -> None:
    """A reply that ends with EOS: the last figures are drawn for the last token of the text
    (the inspector still lists the EOS token, so a branch can continue the reply there)."""
    drawn: list = []

    def record(trace, step, views, ranks):
        drawn.append((trace, step))
        return {}

    history = [{"role": "user", "content": "Hi! What is your name?"}]
    settings = defaults().replace(max_new_tokens=400, temperature=0.0)
    views = Views(shown=frozenset({"kv"}), every=1000, pace=0.0, min_interval_s=0.0)
    turn = run_turn(rt, history, settings, views, rt.default_template, "")
    live = LiveTurn(turn, views, threading.Event(), interval_s=0.0, draw_fn=record)
    frames = list(live.frames())
    end = live.steps[-1]
    if end.finish_reason != "eos":
        pytest.skip(f"this model's greedy reply ended with {end.finish_reason}, not EOS")
    assert end.token_id in rt.tokenizer.stop_ids
    trace, step = drawn[-1]
    assert step is live.steps[-2] and step.token_id != end.token_id
    assert trace.positions[-1] == step.position  # the trace ends at that token too
    assert frames[-1].step is step and frames[-1].update.done


def test_text_never_waits_for_figures_and_stale_ones_are_dropped(rt: Runtime) -> None:
    """Drawing blocks until the reply has ended: the whole text still streams, then only the
    newest snapshot (the last step) is drawn; those taken meanwhile were never drawn."""
    release, drawn = threading.Event(), []

    def slow(trace, step, views, ranks):
        assert release.wait(120)
        drawn.append(trace.n_steps)
        return {"kv": go.Figure()}

    views = Views(shown=frozenset({"kv"}), every=1, pace=0.0, min_interval_s=0.0)
    frames = live_turn(rt, views, slow, n=12).frames()
    texts = []
    for frame in frames:
        assert frame.figures is None  # nothing drawn yet
        texts.append(frame.update)
        if frame.update.done:
            break
    assert texts[-1].done and len({u.chat[-1]["content"] for u in texts}) >= 2
    release.set()
    rest = list(frames)
    assert [f for f in rest if f.figures] and drawn == [1, 12]  # first, then the newest
    assert isinstance(rest[-1].figures["kv"], PlotData)


def test_stop_ends_the_reply_cleanly_and_twice_is_harmless(h: Handlers) -> None:
    control = SessionControl()
    _, history, _ = h.add_message("Once upon a time", [], control)
    stream = h.respond(
        history, control, *widgets(h.rt, max_new_tokens=200, every=50, views=ALL_VIEWS)
    )
    outs = [next(stream), next(stream)]
    for _ in range(2):  # while the reply runs, Stop leaves the chat to the stream
        assert all(is_skip(v) for v in h.stop(outs[-1][1], control))
    outs += list(stream)  # ends by itself after Stop
    ended = [o for o in outs if "finished:" in str(o[6])]
    assert "finished: cancelled" in ended[0][6]
    assert all(isinstance(f, PlotData) for f in outs[-1][2:6])  # final figures drawn
    final = outs[-1][1]
    assert final[-1]["role"] == "assistant" and final[-1]["content"] == reply_of(outs[-1])
    assert not control.running and not h.rt.slot.locked()
    # The model is free and the session can chat on.
    outs2, _ = send(h, "The dog", final, control, max_new_tokens=3)
    assert "finished: length" in outs2[-1][6]


def test_stop_before_the_first_token_gives_the_message_back(h: Handlers) -> None:
    control = SessionControl()
    _, history, _ = h.add_message("Once upon a time", [], control)
    # pressed while the reply was still queued: the page gets the message back at once
    assert h.stop(history, control) == ("Once upon a time", [], [])
    outs = list(h.respond(history, control, *widgets(h.rt)))
    assert len(outs) == 1
    assert outs[0][1] == [] and outs[0][AT["message"]] == "Once upon a time"


def test_same_seed_same_reply_and_random_seed_is_shown(h: Handlers) -> None:
    a, _ = send(h, "Once upon a time", [], SessionControl(), seed=123, temperature=1.0)
    b, _ = send(h, "Once upon a time", [], SessionControl(), seed=123, temperature=1.0)
    assert reply_of(a[-1]) == reply_of(b[-1])
    c, _ = send(h, "Once upon a time", [], SessionControl(), seed=None, temperature=1.0)
    shown = c[0][9]
    assert shown.isdigit() and f"seed {shown}" in c[-1][6]
    d, _ = send(h, "Once upon a time", [], SessionControl(), seed=shown, temperature=1.0)
    assert reply_of(d[-1]) == reply_of(c[-1])  # the shown seed reproduces the reply


def test_views_off_attach_no_probe(h: Handlers, rt: Runtime) -> None:
    assert make_probe(rt, Views(shown=frozenset({"probs"}))) is None
    seen = []
    short = defaults().__class__(max_new_tokens=4)
    for _ in run_turn(
        rt,
        [{"role": "user", "content": "Hi"}],
        short,
        Views(shown=frozenset()),
        rt.default_template,
        "",
    ):
        seen.append([layer.attention.observer for layer in rt.model.layers])
    assert seen and all(obs is None for row in seen for obs in row)
    on = []
    for _ in run_turn(
        rt, [{"role": "user", "content": "Hi"}], short, Views(), rt.default_template, ""
    ):
        on.append(any(layer.attention.observer is not None for layer in rt.model.layers))
    assert any(on)
    assert all(layer.attention.observer is None for layer in rt.model.layers)  # detached


def test_unrendered_widgets_sending_none_are_defaults(h: Handlers) -> None:
    """A closed accordion's components send None until they are first shown."""
    outs, _ = send(h, "Hello", [], SessionControl(), system=None, template=None, stop=None)
    assert "finished:" in outs[-1][6] and "⚠" not in outs[-1][6]


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_message_is_refused(h: Handlers, text: str) -> None:
    with pytest.raises(gr.Error, match="empty"):
        h.add_message(text, [], SessionControl())


def test_message_while_a_reply_runs_is_refused(h: Handlers) -> None:
    control = SessionControl()
    _, history, _ = h.add_message("Once upon a time", [], control)
    stream = h.respond(history, control, *widgets(h.rt, max_new_tokens=50))
    first = next(stream)
    with pytest.raises(gr.Error, match="still being written"):
        h.add_message("again", first[1], control)  # reply streaming
    for name, call in (("regenerate", h.regenerate), ("undo", h.undo)):
        with pytest.raises(gr.Error, match="press Stop"):
            call(first[1], control)
    h.stop(first[1], control)
    for out in stream:
        if "finished:" in out[6]:
            break  # the page shows the reply as finished; the generator has not returned yet
    assert h.add_message("again", out[1], control)[0] == ""  # accepted at once
    assert list(stream) == []


@pytest.mark.parametrize("text", ["مرحبا بالعالم، كيف حالك؟", "I love 🐶 and 🍕! ✨", "שלום 👋 hi"])
def test_emoji_and_right_to_left_text(h: Handlers, text: str) -> None:
    outs, history = send(h, text, [], SessionControl(), max_new_tokens=4)
    assert history[0]["content"] == text  # kept exactly
    assert "finished:" in outs[-1][6]
    assert text.strip() in outs[-1][7] or h.rt.default_template == "completion"


def test_huge_message(h: Handlers, rt: Runtime) -> None:
    control = SessionControl()
    with pytest.raises(gr.Error, match="characters"):
        h.add_message("a" * 100_001, [], control)
    huge = "the cat sat on the mat. " * 2000  # ~48k chars, far past the context
    _, history, _ = h.add_message(huge, [], control)
    outs = list(h.respond(history, control, *widgets(rt, template="chat")))
    # Chat: the last message alone cannot fit, so it is refused and handed back intact.
    assert outs[-1][1] == [] and outs[-1][AT["message"]] == huge and "⚠" in outs[-1][6]
    _, history, _ = h.add_message(huge, [], control)
    outs = list(h.respond(history, control, *widgets(rt, template="completion")))
    # Completion: the oldest tokens are dropped with a visible notice.
    assert "dropped" in outs[-1][6] and "finished:" in outs[-1][6]
    assert len(outs[-1][8].split()) <= rt.max_seq_len


def test_context_overflow_drops_oldest_turns_with_a_notice(h: Handlers, rt: Runtime) -> None:
    long_turn = "the little dog ran to the park and played with a big red ball. " * 12
    history = []
    for i in range(12):  # far more than max_seq_len tokens in total
        history += [
            {"role": "user", "content": f"{i}: {long_turn}"},
            {"role": "assistant", "content": long_turn},
        ]
    history.append({"role": "user", "content": "What happened next?"})
    outs = list(h.respond(history, SessionControl(), *widgets(rt, template="chat")))
    assert "dropped the" in outs[-1][6] and "oldest turn" in outs[-1][6]
    assert "finished:" in outs[-1][6]
    assert outs[-1][1][:-1] == history  # the chat shown keeps every turn
    assert len(outs[-1][8].split()) < rt.max_seq_len


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 5.0),
        ("top_p", -0.1),
        ("top_k", 3.5),
        ("max_new_tokens", 0),
        ("seed", -3),
        ("seed", "abc"),
        ("seed", "1.5"),
        ("stop", "\n".join(f"s{i}" for i in range(20))),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(h: Handlers, field, value) -> None:
    control = SessionControl()
    _, history, _ = h.add_message("Once upon a time", [], control)
    outs = list(h.respond(history, control, *widgets(h.rt, **{field: value})))
    assert len(outs) == 1 and field in outs[0][6]
    assert outs[0][1] == [] and outs[0][AT["message"]] == "Once upon a time"
    assert not control.running


def test_regenerate_undo_clear(h: Handlers) -> None:
    control = SessionControl()
    _, history = send(h, "Once upon a time", [], control, temperature=1.0, seed=1)
    history_r, shown = h.regenerate(history, control)
    assert history_r == history[:-1] and shown == display(history_r)
    outs = list(h.respond(history_r, control, *widgets(h.rt, temperature=1.5, seed=2)))
    assert outs[-1][1][:-1] == history[:-1]
    undone = h.undo(outs[-1][1], control)
    assert undone[AT["message"]] == "Once upon a time" and undone[AT["history"]] == []
    # the removed reply's status, figures and tokens are gone too
    assert undone[AT["status"]] == h.rt.describe() and undone[AT["last"]] is None
    assert undone[AT["tokens"]] == [] and undone[AT["record"]] is None
    assert not isinstance(undone[AT["plot_kv"]], dict)
    with pytest.raises(gr.Error, match="empty"):
        h.undo([], control)
    with pytest.raises(gr.Error, match="empty"):
        h.regenerate([], control)
    cleared = h.clear(control)
    assert cleared[0] == [] and cleared[1] == [] and h.rt.name in cleared[6]


def test_redraw_switches_layer_and_head(h: Handlers, rt: Runtime) -> None:
    outs, _ = send(
        h, "Once upon a time", [], SessionControl(), max_new_tokens=4, views=ALL_VIEWS, every=100
    )
    last = [o for o in outs if not is_skip(o[AT["last"]])][-1][AT["last"]]
    a = h.redraw(last, ALL_VIEWS, 0, ALL_HEADS, "heads")[0]
    b = h.redraw(last, ALL_VIEWS, rt.args.n_layers - 1, ALL_HEADS, "heads")[0]
    c = h.redraw(last, ALL_VIEWS, 0, 1, "heads")[0]
    assert a.to_json() != b.to_json() and a.to_json() != c.to_json()
    assert len(c.data) < len(a.data)  # one head instead of all
    off = h.redraw(last, ["probs"], 0, ALL_HEADS, "heads")
    assert is_skip(off[0]) and isinstance(off[1], go.Figure)
    assert [u["visible"] for u in h.set_views(["attention", "kv"])] == [True, False, False, True]


def test_examples_follow_the_template(h: Handlers) -> None:
    chat = h.examples("chat").constructor_args["samples"]
    completion = h.examples("completion").constructor_args["samples"]
    assert chat and completion and chat != completion
    assert [s[0] for s in chat] == h.rt.examples("chat")


def test_reset_to_meta_defaults(h: Handlers) -> None:
    out = dict(zip([*SAMPLING_FIELDS, "seed"], h.reset_defaults()))
    assert out["temperature"] == 0.6 and out["top_p"] == 0.9
    assert out["top_k"] == 0 and out["min_p"] == 0.0 and out["repetition_penalty"] == 1.0
    assert is_skip(out["max_new_tokens"]) and out["seed"] == ""


def export_args(h: Handlers, history, control: SessionControl | None = None, **over):
    w = widgets(h.rt, **over)
    control = control or SessionControl()
    return [history, w[0], w[1], *w[2 : 2 + len(SAMPLING_FIELDS)], w[10], w[11], 7, control]


def test_export_then_import_round_trip(h: Handlers, tmp_path: Path) -> None:
    control = SessionControl()
    _, history = send(h, "Hello there 👋", [], control, max_new_tokens=3)
    path = h.export_chat(*export_args(h, history, temperature=0.8, stop="THE END\\n"))
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    assert saved["messages"] == history and saved["sampling"]["temperature"] == 0.8
    assert saved["sampling"]["stop"] == ["THE END\n"] and saved["last_seed"] == 7
    out = h.import_chat(path, SessionControl())
    assert out[0] == history and out[1] == display(history)
    names = ["history", "chatbot", "system", "template", *SAMPLING_FIELDS, "seed", "stop"]
    values = dict(zip(names, out))
    assert values["temperature"] == 0.8 and values["seed"] == "7"
    assert values["stop"] == "THE END\\n"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\xff\xfe garbage", "not UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"format": "something-else", "version": 1}', "format"),
        (None, "messages\\[1\\].role"),
        ("temperature", "sampling.temperature"),
        ("seed", "sampling.seed"),
    ],
)
def test_import_rejects_bad_files_and_applies_nothing(
    h: Handlers, tmp_path: Path, content, match
) -> None:
    good = json.loads(
        chat_io.to_json(
            chat_io.ChatFile(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "",
                "chat",
                defaults(),
            )
        )
    )
    if content is None:
        good["messages"][1]["role"] = "user"
        content = json.dumps(good).encode()
    elif content == "temperature":
        good["sampling"]["temperature"] = 9.0
        content = json.dumps(good).encode()
    elif content == "seed":
        good["sampling"]["seed"] = "abc"
        content = json.dumps(good).encode()
    path = tmp_path / "chat.json"
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=match):
        h.import_chat(str(path), SessionControl())


def test_import_rejects_huge_file(h: Handlers, tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (chat_io.MAX_BYTES + 1))
    with pytest.raises(gr.Error, match="too big"):
        h.import_chat(str(path), SessionControl())


def test_a_refused_import_is_explained_in_the_status_line(h: Handlers, tmp_path: Path) -> None:
    """The page shows the reason under the chat (import_failed, wired to the refusal), and a
    good import says what it read there, replacing an earlier refusal's reason."""
    path = tmp_path / "chat.json"
    path.write_text('{"format": "llama-playground-chat", "version": 1, "messages": 3}')
    with pytest.raises(gr.Error, match="messages: expected a list") as refused:
        h.import_chat(str(path), SessionControl())
    status = h.import_failed(str(path), SessionControl())
    assert status.startswith(f"⚠ {refused.value.message}") and h.rt.describe() in status
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good = chat_io.ChatFile(chat, "", "chat", defaults())
    path.write_text(chat_io.to_json(good))
    assert h.import_chat(str(path), SessionControl())[-1].startswith("Imported chat.json: 2 ")
    assert is_skip(h.import_failed(str(path), SessionControl()))


def test_one_generation_at_a_time(h: Handlers, rt: Runtime) -> None:
    """Two sessions generating from two threads: the slot serialises them, both finish."""
    results: dict[int, str] = {}

    def run(i: int) -> None:
        outs, _ = send(h, "Once upon a time", [], SessionControl(), seed=i, temperature=1.0)
        results[i] = reply_of(outs[-1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    alone = {
        i: reply_of(
            send(h, "Once upon a time", [], SessionControl(), seed=i, temperature=1.0)[0][-1]
        )
        for i in range(2)
    }
    assert results == alone


def test_model_line_counts_a_tied_output_once(rt):
    from ui.runtime import format_count

    a = rt.args
    expected = format_count(a.n_params(tied=rt.model.output_tied))
    assert f"· {expected} params ·" in rt.describe()
    if rt.model.output_tied:  # the shipped model: 3.1M, not 3.9M with the embedding counted twice
        assert a.n_params(tied=True) < a.n_params()


def test_model_line_names_int8_weights_and_counts_a_tied_output_once(rt):
    int8 = load_runtime(model_path(), template=model_template(), progress=False, weights="int8")
    line = int8.describe()
    assert "int8 weights" in line and "8-bit off" not in line
    assert rt.describe().endswith("8-bit off")
    # the int8 copy of a tied output is still one matrix of the model's
    params = line.split(" params ·")[0].rsplit("· ", 1)[1]
    assert f"· {params} params ·" in rt.describe()
