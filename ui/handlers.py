"""Gradio callbacks: glue between the widgets and llama/ (no model state of their own).

`Handlers(runtime)` holds only the shared Runtime. Everything a user owns arrives as inputs:
the chat history (a list of {"role", "content"} dicts in a gr.State), the session's
`SessionControl` (Stop's cancel Event), the widgets' values, and the last probe trace. The
argument order of each method is the order of its `inputs` in ui/layout.py.

A message goes through two events: `add_message` (instant: shows the message, refuses a
second one while a reply is pending) then `respond` (queued in the model's concurrency group,
streams the reply). Bad input never raises out of `respond`: it shows a warning, puts the
message back in the text box and leaves the history as it was. When gradio itself refuses
`respond` (a value out of a slider's range, an unknown dropdown value, a full queue) the
handler never runs: the pending message is then released by the next `add_message` (which
replaces it), by Stop, or by `release` (wired to respond's failure in the page), so no
refusal leaves a session stuck.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from llama.chat import ChatError
from llama.generate import GenerateError
from llama.sampling import SamplingError, SamplingParams
from llama.tokenizer import TokenizerError, check_text
from ui import figures, inspector
from ui.chat_handlers import ChatFileHandlers
from ui.inspect_handlers import InspectorCallbacks
from ui.live import Frame, LiveTurn
from ui.outputs import (
    ALL_HEADS,
    VIEW_LABELS,
    display,
    outputs,
    views_from,
)
from ui.runtime import Runtime
from ui.session_state import drop_replaced_components
from ui.settings import (
    SAMPLING_FIELDS,
    SLIDERS,
    SettingsError,
    settings_from,
)
from ui.turn import (
    FIGURE_KEYS,
    Message,
    SessionControl,
    TurnUpdate,
    Views,
    draw,
    run_turn,
)
from ui.why import WhyProbe, make_why_probe, why_record

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 100_000
STREAM_INTERVAL_S = 0.1  # 10 text updates/s: the browser re-renders the whole message each time
INPUT_ERRORS = (ChatError, SamplingError, SettingsError, TokenizerError, GenerateError)


class Handlers(ChatFileHandlers, InspectorCallbacks):
    """The callbacks of one playground (one Runtime).

    stream_interval_s: streamed text is sent at most this often (the first token and the end
    always go out). Each update costs gradio a few milliseconds of processing whatever its
    size, more than a small model takes per token. draw_fn: draws the live figures
    (ui.turn.draw in a thread of this process; the app passes a ui.live.DrawingProcess).
    """

    def __init__(
        self,
        runtime: Runtime,
        stream_interval_s: float = STREAM_INTERVAL_S,
        draw_fn: Callable[..., dict[str, Any]] = draw,
    ) -> None:
        self.rt = runtime
        self.stream_interval_s = stream_interval_s
        self.draw_fn = draw_fn

    # Sending, answering, stopping ------------------------------------------------------------
    def add_message(
        self, message: str, history: list[Message], control: SessionControl
    ) -> tuple[str, list[Message], list[Message]]:
        """Append the user's message; gr.Error (text box kept) when it cannot be sent now."""
        message = message if isinstance(message, str) else ""
        if not message.strip():
            raise gr.Error("Type a message first (it is empty).")
        if len(message) > MAX_MESSAGE_CHARS:
            raise gr.Error(
                f"The message has {len(message)} characters; at most "
                f"{MAX_MESSAGE_CHARS} are accepted."
            )
        if control.running:
            raise gr.Error("A reply is still being written: wait for it or press Stop.")
        try:
            check_text(message)
        except TokenizerError as exc:
            raise gr.Error(f"The message cannot be sent: {exc}") from None
        control.cancel.clear()
        # A user message still at the end had its reply refused (or not started): replace it.
        history = [*unanswered(history)[0], {"role": "user", "content": message}]
        return "", history, display(history)

    def release(
        self, history: list[Message], control: SessionControl
    ) -> tuple[Any, list[Message], list[Message]]:
        """Undo a message whose reply never started (gradio refused `respond`): the text
        back in the box, the history as it was. Changes nothing while a reply runs."""
        kept, text = unanswered(history)
        if control.running or text is None:
            return gr.skip(), gr.skip(), gr.skip()
        return text, kept, display(kept)

    def respond(  # one parameter per widget, named for the API docs
        self,
        history: list[Message],
        control: SessionControl,
        system: str,
        template: str,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        repetition_penalty: float,
        presence_penalty: float,
        frequency_penalty: float,
        max_new_tokens: int,
        seed: str | None,
        stop: str,
        views: list[str],
        layer: int,
        head: int,
        mode: str,
        every: int,
        why_views: list[str] | None = None,
        lens_every: Any = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Stream the reply to the pending user message; `_outputs` gives the output order.
        why_views: the Why tab's views that are on (ui/why.py; none = no capture);
        lens_every: the logit lens runs at every k-th layer and the last (None: the default)."""
        if not history or history[-1]["role"] != "user":
            if control.cancel.is_set():  # Stop took the message back before this started
                yield outputs(status="Stopped before the first token.")
                return
            gr.Warning("There is no message waiting for a reply.")
            return
        # A component never rendered yet (a closed accordion) can send None.
        system, template = system or "", template or self.rt.default_template
        sampling = (
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            max_new_tokens,
        )
        control.running = True
        try:
            try:
                settings = settings_from(sampling, seed, stop)
            except SettingsError as exc:
                control.running = False
                yield self._refused(history, str(exc))
                return
            shown = views_from(views, layer, head, mode, every)
            why = make_why_probe(self.rt, why_views, lens_every)
            yield from self._stream(
                history, control, settings, shown, template, system, why=why
            )
        finally:
            control.running = False
            drop_replaced_components()  # gradio's copies of skipped outputs (ui/session_state)

    def _stream(
        self,
        history: list[Message],
        control: SessionControl,
        settings: SamplingParams,
        views: Views,
        template: str,
        system: str,
        branch: inspector.Branch | None = None,
        why: WhyProbe | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Text at most every stream_interval_s and figures when ready, each in its own
        update (ui/live.py); the last update carries the reply's token record, and the Why
        record (ui/why.py) goes out whenever the generation thread took a new snapshot."""
        prefix = [s.token_id for s in branch.prefix_steps()] if branch is not None else []
        turn = run_turn(
            self.rt, history, settings, views, template, system, control, prefix, why
        )
        live = LiveTurn(
            turn, views, control.cancel, self.rt.ranks, self.stream_interval_s, self.draw_fn
        )
        update: TurnUpdate | None = None
        recorded = False
        why_sent: Any = None
        first = True  # the reader may skip updates: prompt and seed go out on the first frame
        try:
            for frame in live.frames():
                update = frame.update
                if update.done and update.step is None and branch is not None:
                    yield outputs(status="Stopped before the first token.")
                    return
                if update.done and update.step is None and not update.chat[-1]["content"]:
                    control.running = False
                    yield self._refused(history, "Stopped before the first token.", warn=False)
                    return
                # Free the session before the last update reaches the page: a message
                # sent the moment the reply shows as finished must not be refused.
                control.running = control.running and not update.done
                record = None
                if update.done and not recorded:
                    recorded = True
                    record = inspector.record_of(
                        update, live.steps, settings, views, template, system, branch
                    )
                why_new = update.why is not None and update.why is not why_sent
                why_sent = update.why if why_new else why_sent
                why = why_record(update, settings) if why_new else None
                yield self._outputs(update, frame, record, why, first)
                first = False
        except Exception as exc:
            control.running = False
            if update is None and isinstance(exc, INPUT_ERRORS):
                yield self._refused(history, str(exc))
                return
            log.exception("generation failed")
            if update is None:
                yield self._refused(history, f"Generation failed: {exc}")
                return
            # Keep the partial reply: the history already holds it.
            gr.Warning(f"Generation failed: {exc}")
            yield outputs(status=f"⚠ Generation failed: {exc}")

    def _outputs(
        self,
        u: TurnUpdate,
        frame: Frame,
        record: inspector.ReplyRecord | None,
        why: Any = None,
        first: bool = False,
    ) -> tuple[Any, ...]:
        """Text and status always; figures and the last trace when a new set was drawn;
        prompt and seed on the first and last update; the token record at the end;
        the Why record (ui/why.py) when one is given."""
        values: dict[str, Any] = {"chatbot": display(u.chat), "history": u.chat}
        values["status"] = u.status
        if frame.figures is not None:
            values.update({f"plot_{k}": v for k, v in frame.figures.items()})
            values["last"] = (frame.trace, frame.step)
        if first or u.done:
            values.update(prompt_text=u.prompt.text, prompt_ids=" ".join(map(str, u.prompt.ids)))
        if first:
            values["seed_used"] = str(u.seed)
        if record is not None:
            values.update(inspector.record_outputs(self.rt, record))
        if why is not None:
            values["why"] = why
        return outputs(**values)

    def _refused(self, history: list[Message], why: str, warn: bool = True) -> tuple[Any, ...]:
        """Outputs that undo the pending message: history back, the text in the box."""
        if warn:
            gr.Warning(why)
        kept, text = history[:-1], history[-1]["content"]
        return outputs(chatbot=display(kept), history=kept, status=f"⚠ {why}", message=text)

    def stop(
        self, history: list[Message], control: SessionControl
    ) -> tuple[Any, list[Message], list[Message]]:
        """Ask the running reply to end after its current token (pressing twice is harmless);
        with none running, take back a message whose reply was refused or never started."""
        control.cancel.set()
        return self.release(history, control)

    # Editing the chat ------------------------------------------------------------------------
    def regenerate(
        self, history: list[Message], control: SessionControl
    ) -> tuple[list[Message], list[Message]]:
        """Drop the last reply so `respond` writes a new one."""
        self._refuse_while_running(control)
        if not history:
            raise gr.Error("Nothing to regenerate: the chat is empty.")
        if history[-1]["role"] == "assistant":
            history = history[:-1]
        control.cancel.clear()
        return history, display(history)

    def undo(self, history: list[Message], control: SessionControl) -> tuple[Any, ...]:
        """Remove the last exchange and put its message back in the box for editing; the
        status, figures and inspector forget the removed reply (OUTPUT_KEYS order)."""
        self._refuse_while_running(control)
        if not history:
            raise gr.Error("Nothing to undo: the chat is empty.")
        if history[-1]["role"] == "assistant":
            history = history[:-1]
        text = history[-1]["content"]
        history = history[:-1]
        return self._emptied(history, text)

    def clear(self, control: SessionControl) -> tuple[Any, ...]:
        """Empty chat, figures back to their placeholders, status back to the model line."""
        self._refuse_while_running(control)
        return self._emptied([], "")

    def _emptied(self, history: list[Message], message: str) -> tuple[Any, ...]:
        empty = draw(None, None, Views())
        return outputs(
            chatbot=display(history),
            history=history,
            **{f"plot_{k}": empty[k] for k in FIGURE_KEYS},
            status=self.rt.describe(),
            prompt_text="",
            prompt_ids="",
            seed_used="",
            last=None,
            message=message,
            **inspector.cleared(),
        )

    @staticmethod
    def _refuse_while_running(control: SessionControl) -> None:
        if control.running:
            raise gr.Error("A reply is being written: press Stop first.")

    # Figures ---------------------------------------------------------------------------------
    def redraw(
        self, last: tuple[Any, Any] | None, shown: list[str], layer: Any, head: Any, mode: str
    ) -> tuple[Any, ...]:
        """Figures again from the last trace (layer, head or mode changed; no model run)."""
        views = views_from(shown, layer, head, mode, 1)
        trace, step = last if last else (None, None)
        figs = draw(trace, step, views, self.rt.ranks)
        return tuple(figs.get(k, gr.skip()) for k in FIGURE_KEYS)

    def set_views(self, shown: list[str]) -> tuple[Any, ...]:
        """Show the plots that are on; hidden ones cost nothing (no probe, no drawing)."""
        return tuple(gr.update(visible=k in (shown or [])) for k in FIGURE_KEYS)

    # Settings ----------------------------------------------------------------------------------
    def reset_defaults(self) -> tuple[Any, ...]:
        """Meta's chat defaults (temperature 0.6, top-p 0.9, no other filter), seed random."""
        keep = {"max_new_tokens"}
        values = [gr.skip() if k in keep else SLIDERS[k].default for k in SAMPLING_FIELDS]
        return (*values, "")

    def examples(self, template: str) -> Any:
        return gr.Dataset(samples=[[e] for e in self.rt.examples(template)])


def unanswered(history: list[Message]) -> tuple[list[Message], str | None]:
    """(history without a trailing user message, that message's text or None)."""
    if history and history[-1]["role"] == "user":
        return history[:-1], history[-1]["content"]
    return history, None


def placeholder_figures() -> dict[str, Any]:
    """What the plots show before the first reply."""
    return draw(None, None, Views())


__all__ = ["ALL_HEADS", "VIEW_LABELS", "Handlers", "figures", "placeholder_figures"]
