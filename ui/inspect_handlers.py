"""The token inspector's callbacks (a mixin of ui.handlers.Handlers: it uses its runtime `rt`,
`_stream` and `_refuse_while_running`). The inspector's logic is in ui/inspector.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import gradio as gr

from ui import inspector
from ui.outputs import display, outputs, views_from
from ui.session_state import drop_replaced_components
from ui.turn import FIGURE_KEYS, Message, SessionControl, draw


class InspectorCallbacks:
    def inspect(
        self,
        record: inspector.ReplyRecord | None,
        shown: list[str],
        layer: Any,
        head: Any,
        mode: str,
        evt: gr.SelectData,
    ) -> tuple[Any, ...]:
        """A token was clicked: its candidates and the views as they were at its step
        (outputs: 4 plots, last trace, description, candidate dropdown, selected index)."""
        index = evt.index if isinstance(evt.index, int) else None
        if record is None or index is None or not 0 <= index < len(record.steps):
            raise gr.Error("Click a token of the last reply (it is no longer shown).")
        views = views_from(shown, layer, head, mode, 1)
        step = record.steps[index]
        trace = inspector.views_at(self.rt, record, index, views)
        figs = draw(trace, step, views, self.rt.ranks)
        inspector.run_hooks(self.rt, record, index)
        choices = inspector.candidate_choices(self.rt, step)
        return (
            *(figs.get(k, gr.skip()) for k in FIGURE_KEYS),
            (trace, step),
            inspector.describe_step(self.rt, record, index),
            gr.update(choices=choices, value=choices[0][1] if choices else None),
            index,
        )

    def branch(
        self,
        record: inspector.ReplyRecord | None,
        index: int | None,
        token_id: int | None,
        history: list[Message],
        control: SessionControl,
    ) -> Iterator[tuple[Any, ...]]:
        """Continue the reply from token `index`, written as `token_id`; the old version
        stays in record.versions (the version picker)."""
        if record is None or index is None or token_id is None:
            raise gr.Error("Click a token of the reply, then pick a candidate.")
        if control.running or not history or history[-1]["role"] != "assistant":
            raise gr.Error("A reply is being written: press Stop first.")
        control.arm()
        control.running = True
        branch = inspector.Branch(record, int(index), int(token_id))
        try:
            yield from self._stream(
                record.history,
                control,
                record.settings,
                record.views,
                record.template,
                record.system,
                branch,
            )
        finally:
            control.running = False
            drop_replaced_components()  # as respond: gradio's copies of skipped outputs

    def pick_version(
        self,
        record: inspector.ReplyRecord | None,
        which: Any,
        history: list[Message],
        control: SessionControl,
    ) -> tuple[Any, ...]:
        """Show another version of the last reply (a branch or the original)."""
        self._refuse_while_running(control)
        if record is None or which is None or not 0 <= int(which) < len(record.versions):
            return outputs()
        chosen = dataclasses.replace(record, current=int(which))
        text = chosen.versions[chosen.current].text
        chat = [*record.history, {"role": "assistant", "content": text}]
        return outputs(
            chatbot=display(chat),
            history=chat,
            tokens=inspector.spans(self.rt, chosen),
            record=chosen,
            inspect_info=inspector.HINT,
        )
