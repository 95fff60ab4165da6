"""A reply generated in its own thread and read by the page at the page's pace.

Measured in the browser before this module: the first reply text appeared 3-8 s after Enter
with the views on, because the generator that produced the text also drew four plotly figures
and gradio serialised them before the next token was computed. Now three parties never wait
for each other:

- the generation thread runs `run_turn` flat out and keeps only the newest update;
- the drawing thread, when the views are on, asks the generation thread for a probe snapshot
  (taken between two tokens, when the model is idle), draws and serialises the figures
  (gradio's PlotData, so the event loop only forwards a string) and then rests for
  max(min_interval_s, pace * drawing time), so drawing takes at most ~1/(1 + pace) of a core;
  a snapshot nobody has drawn yet is replaced by a newer one (stale figures are dropped);
- the page's reader (`updates`) wakes on any news and gets the newest text at most every
  `interval_s`, and figures whenever a new set is ready. Stop sets the cancel event, which the
  generation thread checks between tokens; from then on nothing stale goes out (no text the
  page would show growing after the click, no figures), and the final text goes out at once,
  before the final figures. `as_shown` cuts the stopped reply back to what the page showed.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from gradio.components.plot import PlotData

from llama.generate import Step
from llama.probes import Trace
from ui.turn import Message, TurnUpdate, Views, draw, draw_json

WAIT_S = 0.5  # the reader wakes at least this often (a closed page is noticed by gradio)


@dataclass
class Frame:
    """What the reader hands the page. figures: serialised, by view key (None = unchanged).
    trace/step: the snapshot the figures were drawn from."""

    update: TurnUpdate
    figures: dict[str, Any] | None = None
    trace: Trace | None = None
    step: Step | None = None


class LiveTurn:
    """Runs `updates` (a run_turn iterator) in a thread; `frames()` reads it.

    steps: every step that carried a token, in order (the token inspector's record).
    Exceptions of the turn re-raise from `frames()`; closing `frames()` early (page closed)
    sets `cancel` and waits for the generation thread to end.
    """

    def __init__(
        self,
        updates: Iterator[TurnUpdate],
        views: Views,
        cancel: threading.Event,
        ranks: int = 1,
        interval_s: float = 0.05,
        draw_fn: Callable[..., dict[str, Any]] = draw,
    ) -> None:
        self.views, self.cancel, self.ranks, self.interval_s = views, cancel, ranks, interval_s
        self.steps: list[Step] = []
        self._steps_at: dict[int, int] = {}  # reply length in characters -> steps behind it
        self._draw_fn = draw_fn
        self._cond = threading.Condition()
        self._latest: TurnUpdate | None = None
        self._seq = 0  # counts updates
        self._error: BaseException | None = None
        self._gen_done = False
        self._want_snapshot = bool(views.shown)  # the drawer is ready for a snapshot
        self._snapshot: tuple[Trace | None, Step | None, bool] | None = None  # (.., last)
        self._figures: tuple[dict[str, Any], Trace | None, Step | None] | None = None
        self._draw_done = not views.shown
        self._gen = threading.Thread(target=self._generate, args=(updates,), daemon=True)
        self._drawer = threading.Thread(target=self._draw_loop, daemon=True)

    # Generation thread -------------------------------------------------------------------
    def _generate(self, updates: Iterator[TurnUpdate]) -> None:
        try:
            for u in updates:
                if u.step is not None and (not self.steps or self.steps[-1] is not u.step):
                    self.steps.append(u.step)
                self._steps_at.setdefault(len(u.chat[-1]["content"]), len(self.steps))
                with self._cond:
                    due = bool(self.views.shown) and self._snapshot_due(u)
                    self._want_snapshot = self._want_snapshot and not due
                # The model is idle between two updates: the probe can be read safely.
                trace = u.probe.snapshot() if due and u.probe is not None else None
                with self._cond:
                    self._latest, self._seq = u, self._seq + 1
                    if due:
                        self._snapshot = (trace, u.view_step, u.done)
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the reader, which re-raises it
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._gen_done = True
                self._cond.notify_all()

    def _snapshot_due(self, u: TurnUpdate) -> bool:
        if u.done:
            return True
        scheduled = u.index == 0 or (u.index + 1) % max(1, self.views.every) == 0
        return self._want_snapshot and scheduled

    # Drawing thread ----------------------------------------------------------------------
    def _draw_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._snapshot is not None or self._gen_done)
                if self._snapshot is None:
                    self._draw_done = True
                    self._cond.notify_all()
                    return
                trace, step, last = self._snapshot
                self._snapshot = None
            start = time.perf_counter()
            drawn = self._draw_fn(trace, step, self.views, self.ranks)
            figs = {k: _serialised(f) for k, f in drawn.items()}
            spent = time.perf_counter() - start
            with self._cond:
                self._figures = (figs, trace, step)
                self._cond.notify_all()
                if last:
                    self._draw_done = True
                    return
                rest = max(self.views.min_interval_s, self.views.pace * spent)
                # Rest unless the reply ends meanwhile (its last figures are not delayed).
                self._cond.wait_for(lambda: self._gen_done or self._error is not None, rest)
                self._want_snapshot = True

    # The page's reader -------------------------------------------------------------------
    def frames(self) -> Iterator[Frame]:
        """Frames until the turn ended and its last figures went out."""
        self._gen.start()
        if self.views.shown:
            self._drawer.start()
        sent_seq, sent_at = 0, -1.0
        try:
            while True:
                with self._cond:
                    while not self._news(sent_seq, sent_at):
                        self._cond.wait(self._wait_s(sent_seq, sent_at))
                    if self._error is not None:
                        raise self._error
                    latest, seq, figures = self._latest, self._seq, self._figures
                    self._figures = None
                    finished = self._gen_done and self._draw_done and figures is None
                if latest is not None and (seq != sent_seq or figures is not None):
                    sent_seq, sent_at = seq, time.monotonic()
                    yield Frame(latest, *(figures or (None, None, None)))
                if finished and seq == sent_seq:
                    return
        finally:
            if self._gen.is_alive():
                self.cancel.set()
            self._gen.join()

    def _stopping(self) -> bool:
        """Stop was pressed and the generation thread has not ended the reply yet."""
        done = self._gen_done or (self._latest is not None and self._latest.done)
        return self.cancel.is_set() and not done

    def _wait_s(self, sent_seq: int, sent_at: float) -> float:
        """Until text held back by the interval may go, else until the next notify."""
        if self._seq != sent_seq and not self._stopping():
            return max(0.001, sent_at + self.interval_s - time.monotonic())
        return WAIT_S

    def _news(self, sent_seq: int, sent_at: float) -> bool:
        if self._error is not None:
            return True
        if self._stopping():  # anything sent now would be text the page shows after Stop
            return False
        if self._figures is not None:
            return True
        if self._gen_done and (self._draw_done or self._seq != sent_seq):
            return True
        fresh = self._seq != sent_seq
        first_or_last = sent_seq == 0 or (self._latest is not None and self._latest.done)
        return fresh and (first_or_last or time.monotonic() - sent_at >= self.interval_s)

    def as_shown(self, u: TurnUpdate, shown: list[Message] | None) -> tuple[TurnUpdate, list[Step]]:
        """The last update of a stopped reply and its steps, cut back to the reply as the page
        showed it at the click (`shown`: the page's chat then; its last message is the reply,
        or the user's message when no reply text had appeared yet). Unchanged when `shown` is
        None or is not an earlier state of this reply."""
        reply = u.chat[-1]["content"]
        same_turn = shown is not None and len(shown) in (len(u.chat), len(u.chat) - 1)
        if not same_turn or shown[len(u.chat) - 2]["content"] != u.chat[-2]["content"]:
            return u, self.steps
        text = shown[-1]["content"] if len(shown) == len(u.chat) else ""
        n = self._steps_at.get(len(text), 0 if not text else None)
        if n is None or not reply.startswith(text) or n >= len(self.steps):
            return u, self.steps
        step = self.steps[n - 1] if n else None
        kept = f"finished: cancelled · kept as shown at Stop: {n} token{'s' * (n != 1)}"
        cut = dataclasses.replace(
            u,
            chat=[*u.chat[:-1], {"role": "assistant", "content": text}],
            status=u.status.replace("finished: cancelled", kept),
            step=step,
            view_step=step if u.view_step is not None else None,
        )
        return cut, self.steps[:n]


def _serialised(fig: Any) -> Any:
    """A plotly figure (or its JSON) as gradio's PlotData, made off the event loop."""
    if isinstance(fig, str):
        return PlotData(type="plotly", plot=fig)
    if hasattr(fig, "to_json"):
        return PlotData(type="plotly", plot=fig.to_json())
    return fig


class DrawingProcess:
    """Draws figures in a separate process: plotly builds a figure in pure Python (0.2-0.5 s
    each here, ~1 s for the four views), and in the server process that time holds the GIL
    the decoding thread needs. One worker, started on first use (or by `start()`, so the
    first reply does not wait for its imports); spawned, since forking a threaded server is
    unsafe. A call is `draw_fn`-shaped: (trace, step, views, ranks) -> {key: JSON}."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._pool is None:
                ctx = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(1, mp_context=ctx)
                atexit.register(self._pool.shutdown, cancel_futures=True)
                self._pool.submit(draw_json, None, None, Views(), 1)  # warm: imports

    def __call__(
        self, trace: Trace | None, step: Step | None, views: Views, ranks: int
    ) -> dict[str, str]:
        self.start()
        assert self._pool is not None
        try:
            return self._pool.submit(draw_json, trace, step, views, ranks).result()
        except BrokenProcessPool:  # the worker died (killed, out of memory): draw here
            with self._lock:
                self._pool = None
            return draw_json(trace, step, views, ranks)
