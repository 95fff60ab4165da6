"""Each rank reads only its own slice of a checkpoint (plan.py says which).

- Meta (params.json + consolidated.NN.pth): with as many shards as ranks, rank i maps shard i
  and binds its tensors as they are (no merging, no slicing). With another count, each slice is
  cut from the shards it overlaps (memory-mapped: only those pages are read).
- Native and Hugging Face safetensors: `get_slice` reads just the rows/columns wanted;
  HF's per-head wq/wk permutation is undone on the local heads after slicing.
- HF pytorch_model*.bin and llama2.c: the tensors are memory-mapped and narrowed.
The names, shapes and format rules come from llama.checkpoints (loaded models agree with
`llama.checkpoints.load`, which the tests check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llama.checkpoints import detect, hf, llama2c, meta, native
from llama.checkpoints.common import (
    IGNORABLE_KEYS,
    TOKENIZER_NAME,
    CheckpointError,
    build_on_meta,
    check_finite,
    expected_shapes,
    require_file,
    tokenizer_vocab_size,
)
from llama.checkpoints.io import (
    check_safetensors_size,
    load_pth,
    open_safetensors,
    safetensors_keys,
)
from llama.config import ModelArgs
from llama.parallel.plan import ShardPlan, Slice

Stream = Iterator[tuple[str, Tensor]]


@dataclass
class SlicedSource:
    """A checkpoint's shape, and a function giving the (Meta name, local slice) stream of a
    plan. `tensors` never yields a whole split tensor unless the plan holds it whole."""

    fmt: str
    args: ModelArgs
    tensors: Callable[[ShardPlan], Stream]


def tokenizer_path(path: Path, fmt: str, explicit: str | Path | None) -> Path | None:
    """The tokenizer beside the weights (as llama.checkpoints.load finds it), or `explicit`."""
    if explicit is not None:
        return require_file(Path(explicit), "tokenizer")
    root = path.parent if path.is_file() else path
    if (root / TOKENIZER_NAME).is_file():
        return root / TOKENIZER_NAME
    models = sorted(root.glob("*.model")) if fmt == "llama2c" else []
    return models[0] if len(models) == 1 else None


def open_sliced(path: Path, tokenizer: Path | None) -> SlicedSource:
    """Detect the format at `path` and prepare to read slices of it."""
    fmt = detect(path)
    if fmt == "meta":
        return _meta(path, tokenizer)
    if fmt == "native":
        return _native(path, tokenizer)
    if fmt == "hf":
        return _hf(path)
    source = llama2c.open_source(path if path.is_file() else _one_bin(path))
    return SlicedSource(fmt, source.args, lambda plan: _narrowed(source.tensors, plan,
                                                                 source.tie_allowed))


def narrow(t: Tensor, s: Slice | None) -> Tensor:
    """The slice `s` of a full 2-D tensor (a view), or `t` for a replicated one."""
    return t if s is None else t.narrow(s.axis, s.start, s.size)


def _one_bin(d: Path) -> Path:
    from llama.checkpoints import llama2c_files

    files = llama2c_files(d)
    if len(files) != 1:
        raise CheckpointError(f"{d}: expected one llama2.c .bin file, found {len(files)}")
    return files[0]


def _full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    return expected_shapes(build_on_meta(args))


# Meta shards ---------------------------------------------------------------------------
def _meta(d: Path, tokenizer: Path | None) -> SlicedSource:
    files = meta.shard_files(d)
    if [meta._SHARD.fullmatch(p.name).group(1) for p in files] != \
            [f"{i:02d}" for i in range(len(files))]:
        raise CheckpointError(f"{d}: shard files must be numbered 00..{len(files) - 1:02d}, "
                              f"found {', '.join(p.name for p in files)}")
    vocab = tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    if vocab is None:  # params.json may say -1: the embedding's rows tell (mapped, not read)
        emb = load_pth(files[0]).get("tok_embeddings.weight")
        vocab = int(emb.shape[0]) if emb is not None else None
    args = native.read_args(d, vocab)
    meta.check_rope_freqs(files[0], load_pth(files[0]).get("rope.freqs"), args)
    return SlicedSource("meta", args, lambda plan: _meta_stream(files, args, plan))


def _meta_stream(files: list[Path], args: ModelArgs, plan: ShardPlan) -> Stream:
    k, n, shapes = len(files), plan.world_size, _full_shapes(args)
    opened: dict[int, dict[str, Tensor]] = {}

    def shard(j: int) -> dict[str, Tensor]:
        if j not in opened:
            opened[j] = load_pth(files[j])
            unexpected = set(opened[j]) - set(shapes) - IGNORABLE_KEYS
            if unexpected:
                raise CheckpointError(f"{files[j]}: unexpected keys {sorted(unexpected)[:5]}")
        return opened[j]

    home = plan.rank * k // n  # the shard this rank overlaps most (shard i when k == n)
    for name, full in shapes.items():
        s = plan.slice_of(name)
        if s is None:
            yield name, _meta_piece(files, home, shard(home), name, full)
            continue
        if full[s.axis] % k:
            raise CheckpointError(f"{files[0].parent}: {name!r} has {full[s.axis]} along dim "
                                  f"{s.axis}, which {k} shards cannot split evenly")
        per = full[s.axis] // k
        parts = []
        for j in range(s.start // per, (s.stop - 1) // per + 1):
            shape = list(full)
            shape[s.axis] = per
            t = _meta_piece(files, j, shard(j), name, tuple(shape))
            lo, hi = max(s.start, j * per), min(s.stop, (j + 1) * per)
            parts.append(t.narrow(s.axis, lo - j * per, hi - lo))
        yield name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=s.axis)


def _meta_piece(files: list[Path], j: int, state: dict[str, Tensor], name: str,
                shape: tuple[int, ...]) -> Tensor:
    t = state.get(name)
    if t is None:
        raise CheckpointError(f"{files[j]}: missing tensor {name!r}")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{files[j]}: tensor {name!r} has shape {tuple(t.shape)}, "
                              f"expected {shape} (shard {j} of {len(files)})")
    return t


# Safetensors (native and Hugging Face) ---------------------------------------------------
def _native(d: Path, tokenizer: Path | None) -> SlicedSource:
    vocab = tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    args = native.read_args(d, vocab)
    file = require_file(d / native.WEIGHTS_NAME, native.WEIGHTS_NAME)
    check_safetensors_size(file)
    shapes = _full_shapes(args)
    unexpected = [k for k in safetensors_keys(file) if k not in shapes and k not in IGNORABLE_KEYS]
    if unexpected:
        raise CheckpointError(f"{file}: unexpected keys {unexpected[:5]}")
    names = {n: n for n in shapes}
    return SlicedSource("native", args, lambda plan: _st_stream(
        [file], names, args, plan, tied_ok=True, permuted=False))


def _hf(d: Path) -> SlicedSource:
    args, tied = hf.read_config(d)
    files = hf._weight_files(d)
    if files[0].suffix != ".safetensors":
        return SlicedSource("hf", args, lambda plan: _narrowed(
            _hf_bin(files, tied), plan, tied, lambda name, t: _hf_fix(name, t, args)))
    names = {}
    for f in files:
        check_safetensors_size(f)
        names.update({_hf_name(f, k): k for k in safetensors_keys(f)})
    names.pop(None, None)
    if tied:
        names.pop("output.weight", None)  # HF ignores lm_head when tie_word_embeddings
    return SlicedSource("hf", args, lambda plan: _st_stream(
        files, names, args, plan, tied_ok=tied, permuted=True))


def _hf_name(file: Path, key: str) -> str | None:
    """Meta name of an HF key; None for ignorable ones; CheckpointError for unknown ones."""
    name = hf.meta_name(key)
    if name is None and not key.endswith("rotary_emb.inv_freq"):
        raise CheckpointError(f"{file}: unexpected key {key!r} (not a LlamaForCausalLM weight)")
    return name


def _st_stream(files: list[Path], names: dict[str, str], args: ModelArgs, plan: ShardPlan,
               *, tied_ok: bool, permuted: bool) -> Stream:
    """Slices read with safetensors' get_slice. names: Meta name -> key in the files.
    permuted: wq/wk are in HF's half-rotation layout (undone per local head)."""
    with ExitStack() as stack:
        where = {}
        for f in files:
            h = stack.enter_context(open_safetensors(f))
            keys = h.keys()
            where.update({k: (f, h) for k in keys})
        for name, full in _full_shapes(args).items():
            s = plan.slice_of(name)
            key = names.get(name)
            if name == "output.weight" and key not in where and tied_ok:
                key, s = names.get("tok_embeddings.weight"), Slice(0, *plan.vocab)
            if key not in where:
                raise CheckpointError(f"{files[0]}: missing tensor {key or name!r}")
            t = _read_slice(*where[key], key, full, s)
            yield name, _hf_fix(name, t, args) if permuted else t


def _read_slice(file: Path, handle: object, key: str, full: tuple[int, ...],
                s: Slice | None) -> Tensor:
    view = handle.get_slice(key)
    found = tuple(view.get_shape())
    if found != full:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {found}, expected {full}")
    if s is None:
        return view[:]
    return view[s.start:s.stop] if s.axis == 0 else view[:, s.start:s.stop]


def _hf_fix(name: str, t: Tensor, args: ModelArgs) -> Tensor:
    """Undo HF's per-head q/k permutation on the local heads (it never crosses heads)."""
    if name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return hf.unpermute(t, t.shape[0] // args.head_dim)
    return t


def _hf_bin(files: list[Path], tied: bool) -> Stream:
    for f in files:
        for key, t in load_pth(f).items():
            name = _hf_name(f, key)
            if name is not None and not (tied and name == "output.weight"):
                yield name, t


Fix = Callable[[str, Tensor], Tensor]


def _narrowed(stream: Stream, plan: ShardPlan, tie_allowed: bool, fix: Fix | None = None
              ) -> Stream:
    """Narrow a stream of full (memory-mapped) tensors, then apply `fix`; an absent output
    ties to the embedding's vocabulary rows."""
    embedding, seen = None, False
    for name, t in stream:
        if name in IGNORABLE_KEYS:
            continue
        seen |= name == "output.weight"
        if name == "tok_embeddings.weight":
            embedding = t
        local = narrow(t, plan.slice_of(name))
        yield name, fix(name, local) if fix is not None else local
    if not seen and tie_allowed and embedding is not None:
        yield "output.weight", narrow(embedding, Slice(0, *plan.vocab))


# Binding ---------------------------------------------------------------------------------
Quantiser = Callable[[torch.nn.Module, str, Tensor], bool]


def bind(model: torch.nn.Module, stream: Stream, source: Path, device: torch.device,
         dtype: torch.dtype, quantise: Quantiser | None = None) -> None:
    """Check each (name, local slice) against `model` (built on the meta device), convert it
    to dtype/device as it arrives (or let `quantise` consume it) and bind all by name."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    state: dict[str, Tensor] = {}
    seen: set[str] = set()
    for name, t in stream:
        if name not in shapes:
            raise CheckpointError(f"{source}: unexpected key {name!r} (not a LLaMA-2 parameter)")
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{source}: slice of {name!r} has shape {tuple(t.shape)}, "
                                  f"this rank expects {shapes[name]}")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {t.dtype}, "
                                  "expected floats")
        seen.add(name)
        t = check_finite(t.to(device=device, dtype=dtype).contiguous(), name, source)
        if quantise is None or not quantise(model, name, t):
            state[name] = t
    missing = [n for n in shapes if n not in seen]
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {missing[:5]}")
    model.load_state_dict(state, strict=quantise is None, assign=True)
