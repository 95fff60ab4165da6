"""build_demo(runtime) -> gr.Blocks: the playground's components and their wiring, nothing else.

Every event that runs the model (`respond`) is in the runtime's concurrency group with limit 1:
one generation at a time per model, others wait in gradio's queue and see their position.
Everything else (adding a message, Stop, redrawing a figure, export/import) is instant and runs
outside that group, so Stop is never stuck behind a generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ui import figures, inspector
from ui.chat_handlers import forget_export, uploads_only
from ui.handlers import Handlers, placeholder_figures
from ui.live import DrawingProcess
from ui.outputs import ALL_HEADS, OUTPUT_KEYS, VIEW_LABELS
from ui.runtime import Runtime
from ui.settings import SAMPLING_FIELDS, SLIDERS
from ui.turn import FIGURE_KEYS, SessionControl
from ui.why import build_why_tab, wire_why

CSS_PATH = Path(__file__).with_name("style.css")
RANGE_NOTE_JS = Path(__file__).with_name("range_note.js")  # says when a slider clamps
FIGURE_TITLES = {
    "attention": "Attention per GQA group",
    "probs": "Token probabilities",
    "rope": "RoPE rotation",
    "kv": "KV-cache growth",
}
INTRO = (
    "Chat with a LLaMA-2 model written from scratch and watch it decode: attention per GQA "
    "group, RoPE, the KV cache and the probabilities behind each token update while the reply "
    "streams."
)


def build_demo(runtime: Runtime) -> gr.Blocks:
    """The playground for one loaded model (launch it with `launch_kwargs()`)."""
    drawing = DrawingProcess()
    drawing.start()  # its imports overlap the page's first load
    h = Handlers(runtime, draw_fn=drawing)
    # delete_cache: gradio keeps a copy of every served or uploaded file (exported chats
    # included); drop those older than an hour so they cannot pile up.
    title = f"LLaMA-2 playground · {runtime.name}"
    with gr.Blocks(title=title, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"# LLaMA-2 playground\n{INTRO}", elem_id="intro")
        gr.Markdown(f"**Model:** {runtime.describe()}", elem_id="model-line")
        with gr.Tab("Playground"):
            ui = _playground(runtime)
        ui.update(build_why_tab(runtime))  # the "Why" tab
        with gr.Tab("RoPE lab"):
            _rope_lab(runtime)
        _wire(h, runtime, ui, demo)
        wire_why(runtime, ui)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Arguments for demo.launch() that belong to the app's look (Gradio 6: css, theme, js)."""
    theme = gr.themes.Soft(primary_hue="indigo")
    return {"css_paths": [CSS_PATH], "theme": theme, "js": RANGE_NOTE_JS.read_text()}


def _playground(rt: Runtime) -> dict[str, Any]:
    ui: dict[str, Any] = {
        "history": gr.State([]),
        "control": gr.State(SessionControl(), delete_callback=forget_export),
        "last": gr.State(None),
        "record": gr.State(None),
        "selected": gr.State(None),
    }
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=360, elem_id="chat-column"):
            _chat_column(rt, ui)
        with gr.Column(scale=7, min_width=480, elem_id="figure-column"):
            _figure_column(rt, ui)
    return ui


def _chat_column(rt: Runtime, ui: dict[str, Any]) -> None:
    ui["chatbot"] = gr.Chatbot(
        label="Chat",
        height=460,
        elem_id="chatbot",
        buttons=["copy"],
        feedback_options=None,
        placeholder=_placeholder(rt),
    )
    with gr.Row(elem_id="input-row"):
        ui["message"] = gr.Textbox(
            show_label=False,
            placeholder="Type a message and press Enter",
            lines=1,
            max_lines=6,
            scale=8,
            elem_id="message",
            autofocus=True,
        )
        ui["send"] = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
        ui["stop"] = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
    with gr.Row(elem_id="edit-row"):
        ui["regenerate"] = gr.Button("↻ Regenerate", size="sm", elem_id="regenerate")
        ui["undo"] = gr.Button("↶ Undo / edit last", size="sm", elem_id="undo")
        ui["clear"] = gr.Button("✕ Clear", size="sm", elem_id="clear")
    ui["status"] = gr.Markdown(rt.describe(), elem_id="status")
    with gr.Accordion("Token inspector", open=True, elem_id="inspector"):
        _inspector(ui)
    ui["examples"] = gr.Examples(
        [[e] for e in rt.examples(rt.default_template)], inputs=[ui["message"]], label="Examples"
    )
    with gr.Accordion("Template and system prompt", open=False):
        ui["template"] = gr.Radio(
            rt.template_choices(),
            value=rt.default_template,
            label="Chat template",
            info="default from the model",
            elem_id="template",
        )
        ui["system"] = gr.Textbox(
            label="System prompt (chat templates only; blank = the template's default)",
            lines=2,
            elem_id="system",
        )
    with gr.Accordion("Sampling", open=True, elem_id="sampling"):
        _sampling_controls(ui, rt)
    with gr.Accordion("Prompt the model saw", open=False, elem_id="prompt-panel"):
        ui["prompt_text"] = gr.Textbox(
            label="Text as the template rendered it (special tokens shown: <s>, <|im_start|>)",
            lines=4,
            max_lines=12,
            interactive=False,
            elem_id="prompt-text",
        )
        ui["prompt_ids"] = gr.Textbox(
            label="Token ids", lines=2, max_lines=8, interactive=False, elem_id="prompt-ids"
        )
    with gr.Accordion("Export / import chat", open=False, elem_id="io-panel"):
        with gr.Row():
            ui["export"] = gr.Button("Export chat (JSON)", size="sm", elem_id="export")
            ui["import"] = uploads_only(
                gr.UploadButton("Import chat", file_types=[".json"], size="sm", elem_id="import")
            )
        ui["export_file"] = gr.File(label="Exported chat", interactive=False, elem_id="export-file")


def _inspector(ui: dict[str, Any]) -> None:
    ui["tokens"] = gr.HighlightedText(
        [],
        label="The last reply, token by token (colour: the model's probability of the token)",
        color_map=inspector.colour_map(),
        combine_adjacent=False,
        show_legend=True,
        interactive=False,
        elem_id="tokens",
    )
    ui["inspect_info"] = gr.Markdown(inspector.HINT, elem_id="inspect-info")
    with gr.Row(equal_height=True):
        ui["candidate"] = gr.Dropdown(
            [], label="Another candidate for that token", elem_id="candidate", scale=3
        )
        ui["branch"] = gr.Button(
            "Continue from here with this candidate", size="sm", elem_id="branch", scale=2
        )
    ui["branch_pick"] = gr.Radio(
        [], label="Versions of this reply", visible=False, elem_id="versions"
    )


def _sampling_controls(ui: dict[str, Any], rt: Runtime) -> None:
    fitted = {"max_new_tokens": rt.default_max_new_tokens}  # a story or a full answer
    for pair in range(0, len(SAMPLING_FIELDS), 2):
        with gr.Row():
            for name in SAMPLING_FIELDS[pair : pair + 2]:
                ui[name] = _slider(name, fitted.get(name))
    with gr.Row(equal_height=True):
        ui["seed"] = gr.Textbox(
            label="Seed", info="blank = random", placeholder="random", elem_id="seed", max_lines=1
        )
        ui["seed_used"] = gr.Textbox(
            label="Seed used", interactive=False, elem_id="seed-used", max_lines=1
        )
        ui["reuse_seed"] = gr.Button("Reuse seed", size="sm", elem_id="reuse-seed")
    ui["stop_strings"] = gr.Textbox(
        label="Stop strings",
        info="one per line; \\n = newline",
        lines=1,
        max_lines=4,
        elem_id="stop-strings",
    )
    ui["reset"] = gr.Button("Reset to Meta defaults (T 0.6, top-p 0.9)", size="sm", elem_id="reset")


def named_errors(component: Any) -> Any:
    """Prefix gradio's out-of-range error (a value sent through the API) with the control's
    label. Done per instance: gradio writes a .pyi stub beside any component subclass."""
    plain = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return plain(payload)
        except gr.Error as exc:
            raise gr.Error(f"{component.label}: {exc.message}") from None

    component.preprocess = preprocess
    return component


def _slider(name: str, value: float | None = None) -> gr.Slider:
    spec = SLIDERS[name]
    return named_errors(
        gr.Slider(
            spec.minimum,
            spec.maximum,
            value=spec.default if value is None else value,
            step=spec.step,
            label=spec.label,
            info=spec.info,
            elem_id=name.replace("_", "-"),
            min_width=120,
        )
    )


def _figure_column(rt: Runtime, ui: dict[str, Any]) -> None:
    a = rt.args
    with gr.Group(elem_id="view-controls"):
        with gr.Row(equal_height=True):
            ui["shown"] = gr.CheckboxGroup(
                [(v, k) for k, v in VIEW_LABELS.items()],
                value=list(VIEW_LABELS),
                label="Live views (off = no probe, no cost)",
                elem_id="views",
                scale=3,
            )
            ui["every"] = named_errors(
                gr.Slider(
                    1,
                    64,
                    value=8,
                    step=1,
                    label="Redraw every N tokens",
                    elem_id="every",
                    scale=1,
                    min_width=170,
                )
            )
        with gr.Row(equal_height=True, elem_id="picker-row"):
            ui["layer"] = gr.Dropdown(
                [(f"layer {i}", i) for i in range(a.n_layers)],
                value=0,
                label="Layer",
                elem_id="layer",
                min_width=110,
            )
            heads = [(f"head {i} (group {i // a.n_rep})", i) for i in range(a.n_heads)]
            ui["head"] = gr.Dropdown(
                [("all heads", ALL_HEADS), *heads],
                value=ALL_HEADS,
                label="Head",
                elem_id="head",
                min_width=140,
            )
            ui["mode"] = gr.Dropdown(
                [("each head", "heads"), ("group mean", "mean"), ("group spread", "spread")],
                value="heads",
                label="Attention panels",
                elem_id="mode",
                min_width=140,
            )
    start = placeholder_figures()
    for key in FIGURE_KEYS:
        ui[f"plot_{key}"] = gr.Plot(
            start[key],
            label=FIGURE_TITLES[key],
            show_label=False,
            elem_id=f"plot-{key}",
            elem_classes=["live-figure"],
        )


def _rope_lab(rt: Runtime) -> None:
    gr.Markdown(
        f"Static RoPE figures for this model (head_dim {rt.args.head_dim}, "
        f"rope_theta {rt.args.rope_theta:g}); no generation needed."
    )
    for name, fig in figures.rope_lab(rt.args).items():
        gr.Plot(fig, label=name, elem_classes=["rope-lab-figure"])


def _placeholder(rt: Runtime) -> str:
    labels = {key: label for label, key in rt.template_choices()}
    mode = labels.get(rt.default_template, rt.default_template)
    return f"**{rt.name}** is ready ({mode}). {rt.about()} Type a message or pick an example below."


def _wire_inspector(
    h: Handlers, ui: dict[str, Any], model: dict[str, Any], free: dict[str, Any]
) -> None:
    plots = [ui[f"plot_{k}"] for k in FIGURE_KEYS]
    ui["tokens"].select(
        h.inspect,
        [ui["record"], ui["shown"], ui["layer"], ui["head"], ui["mode"]],
        [*plots, ui["last"], ui["inspect_info"], ui["candidate"], ui["selected"]],
        api_visibility="private",
        show_progress="hidden",
        **model,
    )
    ui["branch"].click(
        h.branch,
        [ui["record"], ui["selected"], ui["candidate"], ui["history"], ui["control"]],
        [ui[k] for k in OUTPUT_KEYS],
        api_visibility="private",
        show_progress="minimal",
        show_progress_on=[ui["status"]],
        **model,
    )
    ui["branch_pick"].input(
        h.pick_version,
        [ui["record"], ui["branch_pick"], ui["history"], ui["control"]],
        [ui[k] for k in OUTPUT_KEYS],
        api_visibility="private",
        **free,
    )


def _wire(h: Handlers, rt: Runtime, ui: dict[str, Any], demo: gr.Blocks) -> None:
    sampling = [ui[name] for name in SAMPLING_FIELDS]
    views = [ui["shown"], ui["layer"], ui["head"], ui["mode"], ui["every"]]
    plots = [ui[f"plot_{k}"] for k in FIGURE_KEYS]
    chat_out = [ui["history"], ui["chatbot"]]
    turn_out = [ui[k] for k in OUTPUT_KEYS]  # respond, branch, undo, clear, versions
    model = {"concurrency_id": rt.concurrency_id, "concurrency_limit": 1}
    free = {"concurrency_limit": None, "show_progress": "hidden"}

    respond_args = {
        "fn": h.respond,
        "inputs": [
            ui["history"],
            ui["control"],
            ui["system"],
            ui["template"],
            *sampling,
            ui["seed"],
            ui["stop_strings"],
            *views,
            ui["why_views"],
            ui["why_lens_every"],
        ],
        "outputs": turn_out,
        "show_progress": "minimal",
        "show_progress_on": [ui["status"]],
        **model,
    }
    add = {
        "fn": h.add_message,
        "inputs": [ui["message"], ui["history"], ui["control"]],
        "outputs": [ui["message"], *chat_out],
        **free,
    }
    # gradio may refuse respond before it runs (a value out of range, a full queue): take the
    # message back then, so the session is not left with a message waiting for no reply.
    release = {
        "fn": h.release,
        "inputs": [ui["history"], ui["control"]],
        "outputs": [ui["message"], *chat_out],
        "api_visibility": "private",
        **free,
    }
    ui["message"].submit(**add, api_name="add_message").success(
        **respond_args, api_name="respond"
    ).failure(**release)
    ui["send"].click(**add, api_visibility="private").success(
        **respond_args, api_visibility="private"
    ).failure(**release)
    ui["stop"].click(
        h.stop,
        [ui["history"], ui["control"]],
        [ui["message"], *chat_out],
        api_name="stop",
        queue=False,
        **free,
    )
    ui["regenerate"].click(
        h.regenerate, [ui["history"], ui["control"]], chat_out, api_name="regenerate", **free
    ).success(**respond_args, api_visibility="private").failure(**release)
    ui["undo"].click(h.undo, [ui["history"], ui["control"]], turn_out, api_name="undo", **free)
    ui["clear"].click(h.clear, [ui["control"]], turn_out, api_name="clear", **free)
    _wire_inspector(h, ui, model, free)

    redraw = {
        "fn": h.redraw,
        "inputs": [ui["last"], ui["shown"], ui["layer"], ui["head"], ui["mode"]],
        "outputs": plots,
        **free,
    }
    for picker in (ui["layer"], ui["head"], ui["mode"]):
        picker.change(**redraw, api_visibility="private")
    ui["shown"].change(h.set_views, [ui["shown"]], plots, api_visibility="private", **free).then(
        **redraw, api_visibility="private"
    )
    ui["reset"].click(h.reset_defaults, None, [*sampling, ui["seed"]], api_name="reset", **free)
    ui["reuse_seed"].click(
        lambda s: s, [ui["seed_used"]], [ui["seed"]], api_visibility="private", **free
    )
    ui["template"].change(
        h.examples, [ui["template"]], [ui["examples"].dataset], api_visibility="private", **free
    )
    ui["export"].click(
        h.export_chat,
        [
            ui["history"],
            ui["system"],
            ui["template"],
            *sampling,
            ui["seed"],
            ui["stop_strings"],
            ui["seed_used"],
            ui["control"],
        ],
        [ui["export_file"]],
        api_name="export_chat",
        **free,
    )
    chat_file = [ui["import"], ui["control"]]
    chat_settings = [ui["system"], ui["template"], *sampling, ui["seed"], ui["stop_strings"]]
    ui["import"].upload(
        h.import_chat,
        chat_file,
        [*chat_out, *chat_settings, ui["status"]],
        api_name="import_chat",
        # A refusal marks these with gradio's "Error" veil: not the chat, which must stay
        # readable beside the reason (import_failed puts it in the status line).
        show_progress_on=[ui["import"]],
        **free,
    ).failure(h.import_failed, chat_file, [ui["status"]], api_visibility="private", **free)
