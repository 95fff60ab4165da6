"""Bound what gradio keeps per session across turns.

gradio 6.31 leaks one component per output that a streaming event skips and later fills:
a skipped output (`gr.skip()`) becomes a fresh copy of the component in the session's config,
and the next real value stores that copy again under the copy's own new id, with its full
config and value (a plotly figure's JSON for a plot). Every turn of `respond` skips plots and
text boxes between two updates, so a session grew by ~9 components (~1.5 MB with the live
figures on) per turn, kept for as long as the session lives. `drop_replaced_components` removes
the entries whose ids the app never declared; no event reads or writes them.
"""

from __future__ import annotations

from gradio.context import LocalContext


def drop_replaced_components() -> int:
    """Within an event handler: delete the session's stray component copies; return how many.
    Outside one (a direct call, a test), does nothing."""
    blocks = LocalContext.blocks.get(None)
    request = LocalContext.request.get(None)
    session = getattr(request, "session_hash", None)
    holder = getattr(blocks, "state_holder", None)
    if blocks is None or holder is None or session not in holder:
        return 0
    state = holder.session_data.get(session)
    if state is None:
        return 0
    declared = blocks.default_config.blocks
    stray = [k for k in list(state.blocks_config.blocks) if k not in declared]
    for k in stray:
        state.blocks_config.blocks.pop(k, None)
        state.config_values.pop(k, None)
    return len(stray)
