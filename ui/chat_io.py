"""Export a chat (messages, system prompt, template, sampling settings) as JSON, and read it back.

The file is plain JSON meant to be read by people and by other tools:

    {"format": "llama-playground-chat", "version": 1, "model": "tinychat",
     "template": "chat", "system": "...", "messages": [{"role": "user", "content": "..."}, ...],
     "sampling": {"temperature": 0.6, "top_p": 0.9, ..., "seed": null, "stop": []},
     "last_seed": 1234}

`read_chat` accepts only what `write_chat` produces and rejects anything else (not JSON, too
big or too deeply nested, wrong types, roles out of order, text that is not valid Unicode,
values out of the sliders' ranges) with a `ChatFileError` naming the file and the field, so an
import never half-applies. The messages name the kind of a bad value, never its contents: the
file may not be the user's own.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama.chat import TEMPLATES as CHAT_TEMPLATES
from llama.sampling import SamplingParams
from llama.tokenizer import TokenizerError, check_text
from ui.settings import SettingsError, describe, settings_from_values, settings_json

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


def write_chat(text: str, directory: str | Path) -> Path:
    """Write chat JSON (to_json's text) to a new file chat-YYYYmmdd-HHMMSS-*.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", suffix=".json", delete=False, prefix=f"chat-{stamp}-", dir=directory
    ) as f:
        f.write(text)
    return Path(f.name)


_export_dir: list[Path] = []  # created on the first export


def export_dir() -> Path:
    """This process's own folder for exported chats (remove_exports deletes it)."""
    if not _export_dir:
        _export_dir.append(Path(tempfile.mkdtemp(prefix="llama-playground-chats-")))
        atexit.register(remove_exports)
    return _export_dir[0]


def remove_exports() -> None:
    """Delete the folder of exported chats, if one was made (at exit)."""
    while _export_dir:
        shutil.rmtree(_export_dir.pop(), ignore_errors=True)


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
    except RecursionError:
        raise ChatFileError(f"{path.name}: JSON nested too deeply for a chat") from None
    except ValueError:  # Python's int() limit: a number with thousands of digits
        raise ChatFileError(f"{path.name}: a number in the file has too many digits") from None
    try:
        return parse_chat(raw)
    except ChatFileError as exc:
        raise ChatFileError(f"{path.name}: {exc}") from None


def parse_chat(raw: Any) -> ChatFile:
    """Check a decoded JSON value (see the module docstring for the layout)."""
    if not isinstance(raw, dict):
        raise ChatFileError(f"expected a JSON object, found {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise _error("format", repr(FORMAT), raw.get("format"))
    if raw.get("version") != VERSION:
        raise _error("version", str(VERSION), raw.get("version"))
    template = raw.get("template", "chat")
    if template not in TEMPLATES:
        raise _error("template", f"one of {TEMPLATES}", template)
    system = _string(raw, "system", "")
    model = _string(raw, "model", "")
    messages = _messages(raw.get("messages"))
    sampling = raw.get("sampling")
    if not isinstance(sampling, dict):
        raise _error("sampling", "an object", sampling)
    stop = sampling.get("stop", [])
    if not isinstance(stop, list):  # a text box's text is split into lines; a file has a list
        raise _error("sampling.stop", "a list of strings", stop)
    try:
        settings = settings_from_values(sampling, sampling.get("seed"), stop)
    except SettingsError as exc:
        raise ChatFileError(f"sampling.{exc.safe}") from None
    for i, stop in enumerate(settings.stop):
        _check_unicode(f"sampling.stop[{i}]", stop)
    last_seed = raw.get("last_seed")
    if last_seed is not None and (not isinstance(last_seed, int) or isinstance(last_seed, bool)):
        raise _error("last_seed", "an integer or null", last_seed)
    return ChatFile(messages, system, template, settings, model, last_seed)


def _error(field: str, expected: str, found: Any) -> ChatFileError:
    return ChatFileError(f"{field}: expected {expected}, found {describe(found)}")


def _string(raw: dict[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise _error(key, "a string", value)
    return _check_unicode(key, value)


def _check_unicode(field: str, text: str) -> str:
    """JSON can spell a lone surrogate (\\ud800) that no UTF-8 file or tokenizer accepts."""
    try:
        check_text(text)
    except TokenizerError as exc:
        raise ChatFileError(f"{field}: {exc}") from None
    return text


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise _error("messages", "a list", messages)
    if len(messages) > MAX_MESSAGES:
        raise ChatFileError(f"messages: at most {MAX_MESSAGES}, found {len(messages)}")
    out = []
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise _error(f"messages[{i}]", "{'role', 'content': str}", msg)
        if msg.get("role") != expected:
            raise ChatFileError(
                f"messages[{i}].role: expected {expected!r} (user and assistant alternate, "
                f"user first), found {_role(msg.get('role'))}"
            )
        content = _check_unicode(f"messages[{i}].content", msg["content"])
        out.append({"role": expected, "content": content})
    return out


def _role(role: Any) -> str:
    """A role named only when it is one of the template's own (others may be file contents)."""
    return repr(role) if role in ("user", "assistant", "system") else describe(role)
