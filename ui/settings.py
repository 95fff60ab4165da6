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
    """A setting is missing, of the wrong type or out of range (names the field).

    str() shows the value found (it came from the user's own widgets); `safe` names only its
    kind, for messages about a file whose contents must not be echoed back.
    """

    def __init__(self, field: str, expected: str, found: Any = None, shown: bool = True) -> None:
        self.field = field
        self.safe = f"{field}: expected {expected}, found {describe(found)}"
        super().__init__(f"{field}: expected {expected}, found {found!r}" if shown else self.safe)

    @classmethod
    def from_sampling(cls, exc: SamplingError) -> SettingsError:
        """SamplingParams' own refusals: their text holds counts and limits, not values."""
        error = cls.__new__(cls)
        error.field = str(exc).partition(":")[0]
        error.safe = str(exc)
        ValueError.__init__(error, str(exc))
        return error


def describe(value: Any) -> str:
    """What a value is, without its contents: "a str of 12 characters", "a list of 3 items"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (str, list, tuple, dict)):
        unit = "characters" if isinstance(value, str) else "items"
        return f"a {type(value).__name__} of {len(value)} {unit}"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


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
            raise SettingsError(name, "a value", None)
        out[name] = check_range(name, values[name], spec)
    try:
        return SamplingParams(**out, seed=parse_seed(seed), stop=parse_stop(stop))
    except SamplingError as exc:
        raise SettingsError.from_sampling(exc) from None


def settings_from(values: tuple[Any, ...], seed: Any, stop: Any) -> SamplingParams:
    """SamplingParams from the sampling widgets, in SAMPLING_FIELDS order."""
    return settings_from_values(dict(zip(SAMPLING_FIELDS, values, strict=True)), seed, stop)


def check_range(name: str, value: Any, spec: SliderSpec) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SettingsError(name, "a number", value)
    if not spec.minimum <= value <= spec.maximum:
        raise SettingsError(name, f"a value in [{spec.minimum}, {spec.maximum}]", value)
    if name in INT_FIELDS and value != int(value):
        raise SettingsError(name, "a whole number", value)
    return _typed(name, value)


def _typed(name: str, value: float) -> float | int:
    return int(value) if name in INT_FIELDS else float(value)


def parse_seed(seed: Any) -> int | None:
    """Blank (None, "", whitespace) = random; else an int in [0, 2**63 - 1].

    Text is read as an exact integer (a float has 53 bits: 2**63 - 1 would become 2**63). A
    float is accepted only where it holds a whole number exactly (up to 2**53)."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return None
    expected = "a whole number in [0, 2**63 - 1] or blank"
    if isinstance(seed, bool) or not isinstance(seed, (str, int, float)):
        raise SettingsError("seed", expected, seed)
    if isinstance(seed, float) and not (seed.is_integer() and abs(seed) <= 2**53):
        raise SettingsError("seed", expected, seed)
    try:
        value = int(seed.strip()) if isinstance(seed, str) else int(seed)
    except ValueError:  # not digits, or more digits than int() converts
        raise SettingsError("seed", expected, seed[:40]) from None
    if not 0 <= value <= SEED_MAX:
        raise SettingsError("seed", expected, seed)
    return value


def parse_stop(stop: Any) -> tuple[str, ...]:
    r"""Stop strings from the text box: one per line; "\n" and "\t" written as escapes.

    A list (from an imported chat) is taken as the strings themselves.
    """
    if stop is None:
        return ()
    if isinstance(stop, (list, tuple)):
        if not all(isinstance(s, str) and s for s in stop):
            raise SettingsError("stop", "a list of non-empty strings", stop)
        return tuple(stop)
    if not isinstance(stop, str):
        raise SettingsError("stop", "text", stop, shown=False)
    lines = [line for line in stop.splitlines() if line]
    return tuple(line.replace("\\n", "\n").replace("\\t", "\t") for line in lines)


def format_stop(stop: tuple[str, ...] | list[str]) -> str:
    """The inverse of parse_stop for the text box."""
    return "\n".join(s.replace("\n", "\\n").replace("\t", "\\t") for s in stop)
