"""`python -m llama chat`: the REPL (banner, slash commands, the dialog); see llama/cli.py."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

from llama.cli import UsageError, load_model, sampling_params, stream_reply

CHAT_HELP = """commands (a line starting with / is never sent to the model):
  /help           this list
  /reset          forget the dialog (the system prompt stays)
  /system [TEXT]  show the system prompt, or set it to TEXT ("/system -" clears it)
  /quit           leave (also /exit, Ctrl-D; Ctrl-C stops a reply, or leaves at the prompt)
  //text          send "/text" to the model"""


def run_chat(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from llama.chat import ChatError, encode_chat
    from llama.generate import prompt_budget

    params = sampling_params(ns)
    model, tok = load_model(ns)
    template = ns.template
    if template == "auto":
        template = "own" if tok.chat_template is not None else "chat"
    elif template == "own" and tok.chat_template is None:
        raise UsageError(f"--template own: {tok.path} carries no chat template")
    budget = prompt_budget(model.args.max_seq_len, params.max_new_tokens)
    session = _ChatSession(ns.system or "")
    print(_banner(ns, model), file=err)
    for line in _lines(sys.stdin, err):
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            if session.command(line, err):
                continue
            break
        message = line[1:] if line.startswith("//") else line
        try:
            prompt = encode_chat(tok, template, session.messages(message), max_tokens=budget)
        except ChatError as exc:
            print(f"error: {exc}", file=err)
            continue
        reply = stream_reply(model, tok, prompt, params, out, err, ns.stats)
        session.add(message, reply, prompt.dropped_turns)
    return 0


def _banner(ns: argparse.Namespace, model) -> str:
    name = ns.model.name if ns.model is not None else "the shipped model"
    a = model.args
    return (
        f"Chatting with {name} ({a.n_params() / 1e6:.1f}M parameters, context "
        f"{a.max_seq_len} tokens). Type a message and press Enter; /quit or Ctrl-D leaves.\n"
        f"{CHAT_HELP}"
    )


class _ChatSession:
    """The dialog so far and the system prompt; the slash commands act on them."""

    def __init__(self, system: str) -> None:
        self.system = system
        self.history: list[dict[str, str]] = []

    def messages(self, message: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": message}]

    def add(self, message: str, reply: str, dropped_turns: int) -> None:
        self.history += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": reply},
        ]
        self.history = self.history[2 * dropped_turns :]  # what no longer fits stays dropped

    def command(self, line: str, err: TextIO) -> bool:
        """Run a /command; False = leave the chat."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            print(CHAT_HELP, file=err)
        elif name == "/reset":
            self.history.clear()
            print("[dialog forgotten]", file=err)
        elif name == "/system":
            if arg.strip():
                self.system = "" if arg.strip() == "-" else arg.strip()
                self.history.clear()  # the system prompt sits in the first turn
                print(
                    f"[system prompt {'cleared' if not self.system else 'set'}; dialog restarted]",
                    file=err,
                )
            else:
                print(f"[system prompt: {self.system or '(none)'}]", file=err)
        else:
            print(f"unknown command {name}; /help lists them (//text sends /text)", file=err)
        return True


def _lines(stdin: TextIO, err: TextIO) -> Iterator[str]:
    tty = stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=err, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            return
        if not line:
            return
        yield line.rstrip("\n")
