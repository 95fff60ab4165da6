"""The chat REPL's parts for llama/cli.py: the banner, the slash commands, the dialog kept."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import TextIO

CHAT_HELP = """commands (a line starting with / is never sent to the model):
  /help           this list
  /reset          forget the dialog (the system prompt stays)
  /system [TEXT]  show the system prompt, or set it to TEXT ("/system -" clears it)
  /quit           leave (also /exit, Ctrl-D; Ctrl-C stops a reply, or leaves at the prompt)
  //text          send "/text" to the model"""


def banner(ns: argparse.Namespace, model) -> str:
    name = ns.model.name if ns.model is not None else "the shipped model"
    a = model.args
    n = a.n_params(tied=model.output_tied)  # a tied output projection counts once
    return (
        f"Chatting with {name} ({n / 1e6:.1f}M parameters, context "
        f"{a.max_seq_len} tokens). Type a message and press Enter; /quit or Ctrl-D leaves.\n"
        f"{CHAT_HELP}"
    )


class ChatSession:
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


def lines(stdin: TextIO, err: TextIO) -> Iterator[str]:
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
