"""The LLaMA-2 playground: parse flags -> load the model -> ui.build_demo(runtime) -> launch.

    python app.py                                        # the shipped model (assets/tinychat)
    python app.py --model ~/llama-2-7b-chat              # any format llama.checkpoints reads
    python app.py --model ~/Llama-2-7b-chat-hf --load-in-8bit --share --auth me:secret

A bad path or a broken checkpoint ends with the loader's message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A flag's value cannot be used (the message names the flag)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LLaMA-2 playground (Gradio)")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="checkpoint directory or llama2.c .bin (default: the shipped model)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.model (default: the one beside the weights)",
    )
    p.add_argument(
        "--template",
        choices=("auto", "chat", "completion"),
        default="auto",
        help="prompt format; auto reads it from the checkpoint's files",
    )
    p.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes LLM.int8 weights")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if any)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context length (sizes the KV cache; default: the model's)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve the network)"
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument(
        "--auth", default=None, help="USER:PASSWORD, or a file with one USER:PASSWORD per line"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 for small models on CPU, where "
        "more threads only add synchronisation, else torch's default)",
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
    """The Runtime for the flags; the shipped model when --model is not given."""
    from llama.assets import shipped_model_dir
    from ui.runtime import load_runtime

    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UsageError(f"--max-seq-len: expected at least 2, found {args.max_seq_len}")
    template = args.template
    if args.model is None:
        path = shipped_model_dir()
        # The shipped model is trained on Llama-2-chat dialogs (assets/tinychat/MODEL_CARD.md).
        template = "chat" if template == "auto" else template
    else:
        path = args.model
    return load_runtime(
        path,
        device=args.device,
        dtype=resolve_dtype(args.dtype),
        load_in_8bit=args.load_in_8bit,
        max_seq_len=args.max_seq_len,
        tokenizer_path=args.tokenizer,
        template=template,
        progress=True,
    )


def set_threads(requested: int | None, runtime) -> None:  # runtime: ui.runtime.Runtime
    """torch's intra-op threads for this process (a tiny model decodes fastest on one)."""
    import torch

    from ui.runtime import SMALL_MODEL_PARAMS

    if requested is not None:
        torch.set_num_threads(max(1, requested))
    elif runtime.device.type == "cpu" and runtime.args.n_params() < SMALL_MODEL_PARAMS:
        torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
        runtime = load(args)
    except Exception as exc:
        if not _is_input_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    set_threads(args.threads, runtime)
    warning = sharing_warning(args.share, auth, args.host)
    if warning:
        print(warning, file=sys.stderr)
    from ui.layout import build_demo, launch_kwargs

    demo = build_demo(runtime)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    print(f"Loaded {runtime.describe()}", file=sys.stderr)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        show_error=True,
        **launch_kwargs(),
    )
    return 0


def _is_input_error(exc: Exception) -> bool:
    """Errors that mean bad flags or files (a clear message, no traceback)."""
    from llama.checkpoints import CheckpointError
    from llama.config import ConfigError
    from llama.tokenizer import TokenizerError

    return isinstance(
        exc,
        (UsageError, CheckpointError, ConfigError, TokenizerError, FileNotFoundError, ValueError),
    )


if __name__ == "__main__":
    sys.exit(main())
