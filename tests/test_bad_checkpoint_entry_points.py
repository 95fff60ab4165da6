"""The CLI and app.py end on one line naming the file and field for every bad checkpoint of
tests/bad_checkpoints.py (issue 15 item 6: these were KeyError/TypeError/RuntimeError
tracebacks, or silent loads).

Each case runs through both entry points' `main` in-process; a sample of them also runs as
the real command line in a subprocess (each costs ~5 s of interpreter and torch start-up).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import app
from llama.cli import main as cli_main
from tests.bad_checkpoints import CASES
from tests.conftest import REPO

SUBPROCESS_CASES = (
    "safetensors_without_data_offsets",
    "rope_scaling_string",
    "hidden_dim_string",
    "weight_nan",
)


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    return {name: build(root / name) for name, (build, _) in CASES.items()}


def assert_one_line(code: int, out: str, err: str, patterns: tuple[str, ...]) -> None:
    assert code == 2, err
    assert "Traceback" not in out + err
    # As a terminal shows it (a bar cleared with \r leaves nothing); app.py also draws the
    # loading bar when stderr is not a terminal, and those lines are a log, not the error.
    lines = [ln.rsplit("\r", 1)[-1] for ln in err.split("\n")]
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert err.rstrip().endswith(lines[0])
    for pattern in patterns:
        assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_main_one_line(case: str, bad_dirs: dict[str, Path]) -> None:
    out, err = io.StringIO(), io.StringIO()
    argv = ["complete", "--model", str(bad_dirs[case]), "--prompt", "x", "--device", "cpu"]
    code = cli_main(argv, out=out, err=err)
    assert_one_line(code, out.getvalue(), err.getvalue(), CASES[case][1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_app_main_one_line(
    case: str, bad_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = app.main(["--model", str(bad_dirs[case]), "--device", "cpu"])
    captured = capsys.readouterr()
    assert_one_line(code, captured.out, captured.err, CASES[case][1])


@pytest.mark.parametrize("entry", ["cli", "app"])
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_command_line_one_line(entry: str, case: str, bad_dirs: dict[str, Path]) -> None:
    model = str(bad_dirs[case])
    command = {
        "cli": [sys.executable, "-m", "llama", "complete", "--model", model, "--prompt", "x"],
        "app": [sys.executable, str(REPO / "app.py"), "--model", model],
    }[entry]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [*command, "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, CASES[case][1])
