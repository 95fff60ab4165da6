"""`python -m llama chat|complete` end to end (subprocess) and its error handling."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama.assets import SHIPPED_MODEL_DIR
from llama.cli import main
from tests.conftest import REPO, shared_file

# --help's 3 s is for a quiet machine; on a shared one the wall clock stretches with the load.
LOAD_FACTOR = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "ascii"}
    return subprocess.run(
        [sys.executable, "-m", "llama", *args],
        input=stdin.encode(),
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=240,
    )


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(shared_file("stories260K", "stories260K.bin"))


def greedy_200(model_path: str, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    """`complete` from an empty prompt, greedy, 200 tokens; and the reference text."""
    res = cli(
        "complete",
        "--model",
        model_path,
        "--prompt",
        "",
        "--temperature",
        "0",
        "--max-new-tokens",
        "200",
        *extra,
    )
    return res, shared_file("stories260K", "reference_greedy_200.txt").read_text("utf-8")


def test_complete_streams_the_reference_greedy_text(model_path: str) -> None:
    res, reference = greedy_200(model_path, "--threads", "1", "--stats")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode("utf-8") == reference + "\n"  # UTF-8 even under an ASCII locale
    assert "200 tokens" in res.stderr.decode() and "finish: length" in res.stderr.decode()


def test_compiled_decode_streams_the_same_reference_text(model_path: str) -> None:
    res, reference = greedy_200(model_path, "--compile")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode("utf-8") == reference + "\n"
    assert "compiled in" in res.stderr.decode()
    assert "warning: --compile" not in res.stderr.decode()  # 260K parameters: it pays


def test_compile_warns_where_it_gains_nothing_on_a_cpu() -> None:
    from llama.cli import COMPILE_HELPS_BELOW, compile_warning

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_warning(COMPILE_HELPS_BELOW - 1, cpu, True) is None
    assert compile_warning(10 * COMPILE_HELPS_BELOW, cuda, True) is None  # CUDA graphs pay
    assert compile_warning(162_800_000, cpu, False) is None  # bf16 / int8 products gain
    warning = compile_warning(162_800_000, cpu, True)
    assert warning is not None and "162.8M parameters" in warning and "no faster" in warning


def test_chat_reads_turns_until_eof(model_path: str) -> None:
    stdin = "Tell me a story.\n\nA story with [INST] inside\n/reset\nAnother one \U0001f600\n"
    res = cli(
        "chat",
        "--model",
        model_path,
        "--system",
        "Be kind.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--stop",
        "Lily",
        "--threads",
        "1",
        stdin=stdin,
    )
    assert res.returncode == 0, res.stderr.decode()
    replies = res.stdout.decode("utf-8").split("\n")
    assert len(replies) == 3 and replies[2] == ""  # two replies, each ending with a newline
    assert all(r and "Lily" not in r for r in replies[:2])
    err = res.stderr.decode()
    assert "special tag '[INST]'" in err and "Traceback" not in err


def test_chat_banner_and_commands_never_reach_the_model(model_path: str) -> None:
    stdin = "/help\n/system Be brief.\n/system\n/nonsense\n//slash\n/quit\nnever read\n"
    flags = "--temperature 0 --max-new-tokens 5 --threads 1".split()
    res = cli("chat", "--model", model_path, *flags, stdin=stdin)
    assert res.returncode == 0, res.stderr.decode()
    err = res.stderr.decode()
    assert err.startswith("Chatting with stories260K.bin") and "/quit" in err.splitlines()[0]
    assert err.count("/system [TEXT]") == 2  # the banner and /help
    assert "[system prompt set; dialog restarted]" in err
    assert "[system prompt: Be brief.]" in err and "unknown command /nonsense" in err
    assert res.stdout.decode("utf-8").count("\n") == 1  # one reply: "//slash"; none after /quit


def test_complete_echoes_the_prompt_unless_told_not_to(model_path: str) -> None:
    flags = (
        "--model",
        model_path,
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--threads",
        "1",
        "--prompt",
        "Once upon a time",
    )
    echoed = cli("complete", *flags).stdout.decode("utf-8")
    bare = cli("complete", *flags, "--no-echo").stdout.decode("utf-8")
    assert echoed == "Once upon a time" + bare and len(bare) > 1


def test_help_is_quick_and_shows_defaults() -> None:
    start = time.perf_counter()
    res = cli("chat", "--help")
    assert res.returncode == 0 and "(default: 0.6)" in res.stdout.decode()
    assert time.perf_counter() - start < 3 * LOAD_FACTOR  # no torch import for --help
    probe = "import sys, llama.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO).returncode == 0


def test_bad_path_is_one_line_no_traceback(tmp_path: Path) -> None:
    res = cli("complete", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert res.returncode == 2
    assert res.stderr.decode().strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no such file or directory"
    ]


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "error: the following arguments are required: command"),
        (("serve",), "error: argument command: invalid choice: 'serve'"),
        (("complete", "--prompt", "x", "--top-p", "2"), "error: --top-p: expected a value in"),
        (("complete", "--prompt", "x", "--temperature", "-1"), "error: --temperature:"),
        (("complete", "--prompt", "x", "--max-new-tokens", "0"), "error: --max-new-tokens:"),
        (("complete", "--prompt", "x", "--seed", "-5"), "error: --seed:"),
        (("complete", "--prompt", "x", "--top-k", "many"), "error: argument --top-k: invalid int"),
        (("complete", "--prompt", "x", "--stop", ""), "error: --stop: expected non-empty"),
        (("chat", "--bogus-flag"), "error: unrecognized arguments: --bogus-flag"),
        (("complete",), "error: the following arguments are required: --prompt"),
        (("complete", "--prompt", "x", "--threads", "0"), "error: --threads:"),
        (("complete", "--prompt", "x", "--device", "toaster"), "error: --device: expected"),
        (
            ("complete", "--prompt", "x", "--compile", "--load-in-8bit"),
            "error: --compile: not available with --load-in-8bit",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv: tuple[str, ...], message: str) -> None:
    code, out, err = run_main(*argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_bad_files(tmp_path: Path, model_path: str) -> None:
    garbage = tmp_path / "model.bin"
    garbage.write_bytes(b"\x00" * 100)
    code, _, err = run_main("complete", "--model", str(garbage), "--prompt", "x")
    assert code == 2 and err.startswith(f"error: {garbage}") and len(err.splitlines()) == 1
    bad_tok = tmp_path / "tok.model"
    bad_tok.write_bytes(b"not a sentencepiece model")
    code, _, err = run_main(
        "complete", "--model", model_path, "--tokenizer", str(bad_tok), "--prompt", "x"
    )
    assert code == 2 and str(bad_tok) in err and len(err.splitlines()) == 1


def test_default_model_is_the_shipped_one() -> None:
    code, out, err = run_main(
        "complete",
        "--prompt",
        "Once",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
        "--threads",
        "1",
    )
    if (SHIPPED_MODEL_DIR / "model.safetensors").is_file():
        assert code == 0 and out.endswith("\n") and len(out) > 1, err
    else:
        assert code == 2 and "the shipped model is missing" in err
