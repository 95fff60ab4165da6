"""The project's own format: params.json + model.safetensors (Meta names) + tokenizer.model.

`output.weight` absent from the file means the output is tied to tok_embeddings; `save`
writes a tied model that way (safetensors refuses two names for one storage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from llama.checkpoints.common import (
    TOKENIZER_NAME,
    CheckpointError,
    Source,
    TensorStream,
    build_on_meta,
    config_error,
    release_pages,
    require_file,
    tokenizer_vocab_size,
)
from llama.checkpoints.io import (
    check_safetensors_size,
    open_safetensors,
    read_safetensor,
    safetensors_keys,
)
from llama.config import ConfigError, ModelArgs
from llama.model import Transformer

WEIGHTS_NAME = "model.safetensors"
PARAMS_NAME = "params.json"


def read_args(directory: Path, vocab_size: int | None = None, **overrides: object) -> ModelArgs:
    """params.json -> ModelArgs (shared with the Meta format)."""
    path = require_file(directory / PARAMS_NAME, "params.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and raw.get("vocab_size", -1) in (-1, None) and vocab_size:
        overrides["vocab_size"] = vocab_size
    try:
        return ModelArgs.from_params_json(path, **overrides)
    except ConfigError as exc:
        raise config_error(exc) from None


def read(directory: Path, args: ModelArgs) -> tuple[TensorStream, int]:
    """-> (stream of (name, mapped tensor), number of tensors)."""
    path = require_file(directory / WEIGHTS_NAME, "model.safetensors")
    check_safetensors_size(path)
    keys = safetensors_keys(path)
    return _stream(path, keys), len(keys)


def _stream(path: Path, keys: list[str]) -> TensorStream:
    with open_safetensors(path) as handle:
        for key in keys:
            t = read_safetensor(handle, path, key)
            yield key, t
            release_pages(t)


def save(
    model: Transformer, directory: str | Path, tokenizer_path: str | Path | None = None
) -> Path:
    """Write `model` as params.json + model.safetensors (+ a copy of the tokenizer).

    Only the Meta-named parameters are written (post-load extras such as fused projections
    are not); tensors are copied to CPU in their current dtype. Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in build_on_meta(model.args).named_parameters()]
    state = model.state_dict()
    tied = model.output_tied
    tensors = {}
    for name in names:
        if name == "output.weight" and tied:
            continue
        t = state.get(name)
        if t is None or not t.is_floating_point():
            raise CheckpointError(
                f"save({directory}): parameter {name!r} is missing or not floating point "
                "(8-bit models cannot be saved; save the model before quantising)"
            )
        tensors[name] = t.detach().to("cpu").contiguous()
    (directory / PARAMS_NAME).write_text(json.dumps(model.args.to_params_json(), indent=2) + "\n")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer_path is not None:
        source = require_file(Path(tokenizer_path), "tokenizer")
        target = directory / TOKENIZER_NAME
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    return directory



def open_source(directory: Path, tokenizer: Path | None) -> Source:
    """A native directory as a Source (output tied when output.weight is absent)."""
    vocab = tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    args = read_args(directory, vocab)
    tensors, count = read(directory, args)
    return Source(args, tensors, count, tie_allowed=True, origin=directory / WEIGHTS_NAME)
