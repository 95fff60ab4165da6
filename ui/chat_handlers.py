"""Gradio callbacks for exporting and importing a chat (a mixin of ui.handlers.Handlers).

An import reads only a file uploaded through the page: `uploads_only` makes the upload
widget refuse any other path (a client can name one in the FileData it sends), and a bad file
is refused with a message that names the field and the kind of value, never its contents.
A session keeps one exported file; it is deleted when replaced and when the session ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from llama.chat import ChatError
from llama.tokenizer import TokenizerError
from ui import chat_io
from ui.outputs import display
from ui.runtime import Runtime
from ui.settings import (
    SAMPLING_FIELDS,
    SettingsError,
    format_stop,
    parse_seed,
    settings_from,
)
from ui.turn import Message, SessionControl, build_prompt


class ChatFileHandlers:
    """export_chat and import_chat; the host class sets `rt` (the Runtime)."""

    rt: Runtime

    def export_chat(
        self,
        history: list[Message],
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
        seed_used: str | None,
        control: SessionControl,
    ) -> str:
        """Write the chat and its sampling settings to a JSON file; return its path. A session
        keeps one exported file: the previous one is deleted (the last at session end)."""
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
        try:
            settings = settings_from(sampling, seed, stop)
        except SettingsError as exc:
            raise gr.Error(f"Cannot export: {exc}") from None
        try:
            last = parse_seed(seed_used)
        except SettingsError:
            last = None
        chat = chat_io.ChatFile(
            [dict(m) for m in history], system or "", template, settings, self.rt.name, last
        )
        forget_export(control)
        control.export = chat_io.write_chat(chat_io.to_json(chat), chat_io.export_dir())
        return str(control.export)

    def import_chat(self, path: Any, control: SessionControl) -> tuple[Any, ...]:
        """Read a chat file; apply all of it or nothing (gr.Error names the problem, and
        `import_failed` shows it under the chat). The status line says what was imported."""
        self._refuse_while_running(control)
        if path is None:
            raise gr.Error("No file was uploaded.")
        try:
            path = Path(getattr(path, "name", path))
            chat = chat_io.read_chat(path)
            self._check_system(chat, path.name)
        except chat_io.ChatFileError as exc:
            raise gr.Error(f"Cannot import: {exc}") from None
        s = chat.settings
        sliders = [getattr(s, k) for k in SAMPLING_FIELDS]
        return (
            chat.messages,
            display(chat.messages),
            chat.system,
            chat.template,
            *sliders,
            "" if s.seed is None else str(s.seed),
            format_stop(s.stop),
            f"Imported {path.name}: {len(chat.messages)} messages  \n{self.rt.describe()}",
        )

    def import_failed(self, path: Any, control: SessionControl) -> Any:
        """After a refused import (wired to its failure): the reason in the status line,
        under the chat, which the refusal left as it was. A toast alone fades, and the page
        is scrolled down to the import button when it shows."""
        try:
            self.import_chat(path, control)
        except gr.Error as exc:
            return f"⚠ {exc.message}  \n{self.rt.describe()}"
        return gr.skip()

    def _check_system(self, chat: chat_io.ChatFile, name: str) -> None:
        """A system prompt the template refuses would make every later turn fail: refuse it
        at import (ChatFileError naming the field)."""
        if chat.template != "chat" or not chat.system.strip():
            return
        probe = [{"role": "user", "content": "?"}]
        try:
            build_prompt(self.rt, probe, "chat", chat.system, 1)
        except (ChatError, TokenizerError) as exc:
            why = str(exc).partition(": ")[2] or str(exc)
            raise chat_io.ChatFileError(f"{name}: system: {why}") from None


def forget_export(control: SessionControl) -> None:
    """Delete the session's exported file (on a new export, and as the session's State is
    deleted when its page closes)."""
    if control.export is not None:
        control.export.unlink(missing_ok=True)
        control.export = None


def uploads_only(button: gr.UploadButton) -> gr.UploadButton:
    """Make `button` accept only files in gradio's upload folder, where the page's uploads
    land: gradio would otherwise copy any server path (or download any URL) a client names
    in the FileData it sends. Done per instance, like layout.named_errors."""
    plain, plain_async = (
        button.move_resource_to_block_cache,
        button.async_move_resource_to_block_cache,
    )

    def check(path: Any) -> None:
        if path is not None and not _in_folder(str(path), button.GRADIO_CACHE):
            raise gr.Error("Import: only a file uploaded through this page can be read.")

    def moved(path: Any) -> str | None:
        check(path)
        return plain(path)

    async def moved_async(path: Any) -> str | None:  # what gradio's routes call
        check(path)
        return await plain_async(path)

    button.move_resource_to_block_cache = moved
    button.async_move_resource_to_block_cache = moved_async
    return button


def _in_folder(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root
