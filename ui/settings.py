"""What the sampling widgets hold, their ranges, and how they become SamplingParams.

One table (`SLIDERS`) gives every numeric control its bounds and default, so the layout, the
import of a saved chat and the handlers agree on what is in range. Gradio itself rejects a
slider value outside these bounds sent through its API (before any handler runs).
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

from llama.sampling import SamplingError, SamplingParams

SEED_MAX = (1 << 63) - 1  # SamplingParams accepts seeds in [0, 2**63 - 1]


@dataclass(frozen=True)
class SliderSpec:
    label: str
    minimum: float
    maximum: float
    step: float
    default: float
    info: str


# Meta's defaults for Llama-2-chat (llama/generation.py): temperature 0.6, top-p 0.9.
SLIDERS: dict[str, SliderSpec] = {
    "temperature": SliderSpec("Temperature", 0.0, 2.0, 0.05, 0.6, "0 = greedy"),
    "top_p": SliderSpec("Top-p", 0.0, 1.0, 0.01, 0.9, "nucleus mass kept; 1 = off"),
    "top_k": SliderSpec("Top-k", 0, 200, 1, 0, "0 = off"),
    "min_p": SliderSpec("Min-p", 0.0, 1.0, 0.01, 0.0, "relative to the top token; 0 = off"),
    "repetition_penalty": SliderSpec("Repetition penalty", 1.0, 2.0, 0.01, 1.0, "1 = off"),
    "presence_penalty": SliderSpec("Presence penalty", -2.0, 2.0, 0.05, 0.0, "0 = off"),
    "frequency_penalty": SliderSpec("Frequency penalty", -2.0, 2.0, 0.05, 0.0, "0 = off"),
    "max_new_tokens": SliderSpec("Max new tokens", 1, 1024, 1, 128, "reply length cap"),
}
SAMPLING_FIELDS = tuple(SLIDERS)
INT_FIELDS = ("top_k", "max_new_tokens")


class SettingsError(ValueError):
    """A setting is missing, of the wrong type or out of range (names the field)."""


def pick_seed(params: SamplingParams) -> int:
    """The seed a reply uses: the chosen one, or a fresh random one (shown to the user).

    The widgets' values travel as SamplingParams; its seed None means "draw one per reply"."""
    return params.seed if params.seed is not None else secrets.randbelow(1 << 31)


def settings_json(params: SamplingParams) -> dict[str, Any]:
    """The widgets' values as saved in an exported chat."""
    out = asdict(params)
    out["stop"] = list(params.stop)
    return out


def defaults() -> SamplingParams:
    """The widgets' start values (Meta's chat defaults for temperature and top-p)."""
    return SamplingParams(**{n: _typed(n, spec.default) for n, spec in SLIDERS.items()})


def settings_from_values(
    values: dict[str, Any], seed: Any = None, stop: Any = ""
) -> SamplingParams:
    """Check and convert widget (or imported) values; SettingsError names the bad field."""
    out: dict[str, Any] = {}
    for name, spec in SLIDERS.items():
        if name not in values:
            raise SettingsError(f"{name}: missing")
        out[name] = check_range(name, values[name], spec)
    try:
        return SamplingParams(**out, seed=parse_seed(seed), stop=parse_stop(stop))
    except SamplingError as exc:
        raise SettingsError(str(exc)) from None


def check_range(name: str, value: Any, spec: SliderSpec) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SettingsError(f"{name}: expected a number, found {value!r}")
    if not spec.minimum <= value <= spec.maximum:
        raise SettingsError(
            f"{name}: expected a value in [{spec.minimum}, {spec.maximum}], found {value!r}"
        )
    if name in INT_FIELDS and value != int(value):
        raise SettingsError(f"{name}: expected a whole number, found {value!r}")
    return _typed(name, value)


def _typed(name: str, value: float) -> float | int:
    return int(value) if name in INT_FIELDS else float(value)


def parse_seed(seed: Any) -> int | None:
    """Blank (None, "", whitespace) = random; else an int in [0, 2**63 - 1]."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return None
    if isinstance(seed, bool):
        raise SettingsError(f"seed: expected a whole number or blank, found {seed!r}")
    try:
        number = float(seed) if isinstance(seed, str) else seed
        value = int(number)
    except (TypeError, ValueError, OverflowError):
        raise SettingsError(f"seed: expected a whole number or blank, found {seed!r}") from None
    if value != number or not 0 <= value <= SEED_MAX:
        raise SettingsError(f"seed: expected a whole number in [0, 2**63 - 1], found {seed!r}")
    return value


def parse_stop(stop: Any) -> tuple[str, ...]:
    r"""Stop strings from the text box: one per line; "\n" and "\t" written as escapes.

    A list (from an imported chat) is taken as the strings themselves.
    """
    if stop is None:
        return ()
    if isinstance(stop, (list, tuple)):
        if not all(isinstance(s, str) and s for s in stop):
            raise SettingsError(f"stop: expected a list of non-empty strings, found {stop!r}")
        return tuple(stop)
    if not isinstance(stop, str):
        raise SettingsError(f"stop: expected text, found {type(stop).__name__}")
    lines = [line for line in stop.splitlines() if line]
    return tuple(line.replace("\\n", "\n").replace("\\t", "\t") for line in lines)


def format_stop(stop: tuple[str, ...] | list[str]) -> str:
    """The inverse of parse_stop for the text box."""
    return "\n".join(s.replace("\n", "\\n").replace("\t", "\\t") for s in stop)
