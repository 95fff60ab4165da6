"""Export a chat (messages, system prompt, template, sampling settings) as JSON, and read it back.

The file is plain JSON meant to be read by people and by other tools:

    {"format": "llama-playground-chat", "version": 1, "model": "tinychat",
     "template": "chat", "system": "...", "messages": [{"role": "user", "content": "..."}, ...],
     "sampling": {"temperature": 0.6, "top_p": 0.9, ..., "seed": null, "stop": []},
     "last_seed": 1234}

`read_chat` accepts only what `write_chat` produces and rejects anything else (not JSON, too
big, wrong types, roles out of order, values out of the sliders' ranges) with a `ChatFileError`
naming the file and the field, so an import never half-applies.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama.chat import TEMPLATES as CHAT_TEMPLATES
from llama.sampling import SamplingParams
from ui.settings import SettingsError, settings_from_values, settings_json

FORMAT = "llama-playground-chat"
VERSION = 1
MAX_BYTES = 4 * 1024 * 1024
MAX_MESSAGES = 10_000
TEMPLATES = CHAT_TEMPLATES  # "own", "chat", "completion"


class ChatFileError(ValueError):
    """An imported chat file is unreadable or malformed (names the file and the field)."""


@dataclass(frozen=True)
class ChatFile:
    """A chat as saved: alternating user/assistant messages starting with user."""

    messages: list[dict[str, str]]
    system: str
    template: str
    settings: SamplingParams
    model: str = ""
    last_seed: int | None = None


def to_json(chat: ChatFile) -> str:
    """The chat as JSON text (UTF-8, non-ASCII kept readable)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": chat.model,
        "template": chat.template,
        "system": chat.system,
        "messages": [{"role": m["role"], "content": m["content"]} for m in chat.messages],
        "sampling": settings_json(chat.settings),
        "last_seed": chat.last_seed,
    }
    return json.dumps(payload, ensure_ascii=False, indent=2)


def write_chat(chat: ChatFile, directory: str | Path | None = None) -> Path:
    """Write the chat to a new file named chat-YYYYmmdd-HHMMSS-*.json; return its path."""
    directory = Path(directory or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", suffix=".json", delete=False, prefix=f"chat-{stamp}-", dir=directory
    ) as f:
        f.write(to_json(chat))
    return Path(f.name)


def read_chat(path: str | Path) -> ChatFile:
    """Parse and check a file written by write_chat (ChatFileError on anything else)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ChatFileError(f"{path.name}: cannot read the file ({exc.strerror})") from None
    if size > MAX_BYTES:
        raise ChatFileError(
            f"{path.name}: {size} bytes is too big for a chat (at most {MAX_BYTES})"
        )
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ChatFileError(f"{path.name}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ChatFileError(
            f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    try:
        return parse_chat(raw)
    except ChatFileError as exc:
        raise ChatFileError(f"{path.name}: {exc}") from None


def parse_chat(raw: Any) -> ChatFile:
    """Check a decoded JSON value (see the module docstring for the layout)."""
    if not isinstance(raw, dict):
        raise ChatFileError(f"expected a JSON object, found {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise ChatFileError(f"format: expected {FORMAT!r}, found {raw.get('format')!r}")
    if raw.get("version") != VERSION:
        raise ChatFileError(f"version: expected {VERSION}, found {raw.get('version')!r}")
    template = raw.get("template", "chat")
    if template not in TEMPLATES:
        raise ChatFileError(f"template: expected one of {TEMPLATES}, found {template!r}")
    system = _string(raw, "system", "")
    model = _string(raw, "model", "")
    messages = _messages(raw.get("messages"))
    sampling = raw.get("sampling")
    if not isinstance(sampling, dict):
        raise ChatFileError(f"sampling: expected an object, found {type(sampling).__name__}")
    try:
        settings = settings_from_values(sampling, sampling.get("seed"), sampling.get("stop", []))
    except SettingsError as exc:
        raise ChatFileError(f"sampling.{exc}") from None
    last_seed = raw.get("last_seed")
    if last_seed is not None and (not isinstance(last_seed, int) or isinstance(last_seed, bool)):
        raise ChatFileError(f"last_seed: expected an integer or null, found {last_seed!r}")
    return ChatFile(messages, system, template, settings, model, last_seed)


def _string(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ChatFileError(f"{key}: expected a string, found {type(value).__name__}")
    return value


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise ChatFileError(f"messages: expected a list, found {type(messages).__name__}")
    if len(messages) > MAX_MESSAGES:
        raise ChatFileError(f"messages: at most {MAX_MESSAGES}, found {len(messages)}")
    out = []
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ChatFileError(
                f"messages[{i}]: expected {{'role', 'content': str}}, found {msg!r}"[:200]
            )
        if msg.get("role") != expected:
            raise ChatFileError(
                f"messages[{i}].role: expected {expected!r} (user and assistant alternate, "
                f"user first), found {msg.get('role')!r}"
            )
        out.append({"role": expected, "content": msg["content"]})
    return out
