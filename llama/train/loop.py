"""Train a LLaMA-2-architecture model from scratch (or resume): the shipped tinychat model.

`python -m llama.train --out /work/runs/tinychat --tokenizer TOK.model --docs FILE ...
--export assets/tinychat` builds the token streams (llama/train/data.py) into OUT/data once, then
trains with AdamW (betas 0.9/0.95, decoupled weight decay on matrices only), linear warmup +
cosine decay to `min_lr`, gradient clipping and accumulation; fp32 on CPU, bf16 autocast on
CUDA. Every `eval_every` steps: validation loss, loss curve (OUT/loss.csv, OUT/loss.html,
TensorBoard events when tensorboard is importable), a resumable checkpoint (OUT/ckpt,
llama/train/state.py) and, when validation improved, an export of the model in the native
format (params.json + model.safetensors + tokenizer.model) to --export. Re-running the same
command resumes from OUT/ckpt exactly where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama.config import ModelArgs
from llama.model import Transformer
from llama.tokenizer import Tokenizer, load_tokenizer
from llama.train.data import (
    NAMED,
    Batches,
    Naming,
    Source,
    build_stream,
    chunk_documents,
    load_stream,
    read_documents,
    save_stream,
    split_holdout,
)
from llama.train.state import has_state, load_state, load_weights, save_state


@dataclass
class TrainConfig:
    """Optimisation settings. Steps count optimizer updates; one update sees
    batch_size * grad_accum windows of seq_len tokens."""

    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    seed: int = 1337
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(args: ModelArgs, seed: int) -> Transformer:
    """A fresh model: tied embeddings, N(0, 0.02) init, residual outputs scaled by
    1/sqrt(2 * n_layers) (GPT-2), norms at one."""
    torch.manual_seed(seed)
    model = Transformer(args)
    model.output.weight = model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight"))\
                else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
    return model


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (incl. the tied embedding), none on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def loss_of(model: Transformer, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats. x, y: (B, T) ids."""
    logits = model(x)  # (B, T, V) fp32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: Transformer, batches: Batches, n: int, device: torch.device) -> float:
    """Mean validation loss (nats/token) over the first `n` sequential batches."""
    model.eval()
    losses = [loss_of(model, x.to(device), y.to(device)).item()
              for x, y in batches.sequential(n)]
    model.train()
    return sum(losses) / len(losses)


def train_step(model: Transformer, opt: torch.optim.Optimizer, batches: Batches, step: int,
               cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """One optimizer update (grad_accum micro-batches). Returns (mean loss, grad norm)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    total = 0.0
    for micro in range(cfg.grad_accum):
        x, y = batches.batch(step * cfg.grad_accum + micro)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(model, x.to(device), y.to(device)) / cfg.grad_accum
        loss.backward()
        total += loss.item()
    norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, float(norm)


class LossLog:
    """loss.csv (one row per logged step), loss.html (plotly), TensorBoard when available."""

    FIELDS = ("step", "tokens", "lr", "train_loss", "val_loss", "elapsed_s")

    def __init__(self, out: Path) -> None:
        self.out = out
        self.csv = out / "loss.csv"
        if not self.csv.exists():
            with self.csv.open("w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
        self.tb = _tensorboard(out / "tb")

    def row(self, **values: float | int | str) -> None:
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([values.get(k, "") for k in self.FIELDS])
        if self.tb is not None:
            for key in ("train_loss", "val_loss", "lr"):
                if values.get(key, "") != "":
                    self.tb.add_scalar(key, float(values[key]), int(values["step"]))
            self.tb.flush()

    def plot(self, png: bool = False) -> None:
        from llama.train.plot import write_plot

        write_plot(self.csv, self.out / "loss.html", self.out / "loss.png" if png else None)


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


def prepare_data(out: Path, tok: Tokenizer, docs_files: list[Path], epochs: float,
                 chat_share: float, holdout: float, seed: int,
                 extra_files: list[Path] | None = None, extra_epochs: float = 0.0,
                 extra_chat_share: float = 0.0, naming: Naming | None = None,
                 copy_epochs: float = 0.0) -> tuple[Path, Path]:
    """Build OUT/data/{train,val}.bin once (reused on resume). Val: held-out docs of
    `docs_files`, plain. `extra_files` (long texts, cut into ~1.5 kB chunks of paragraphs) add
    `extra_epochs` passes to the train stream (`extra_chat_share` of them as chat examples)
    and nothing to val. `copy_epochs` adds that many more passes over the train docs and extra
    chunks that name their hero ("a dog named Max"), all as chat examples whose hero is renamed:
    each pass draws fresh names, so the model learns to copy the name from the instruction."""
    train_bin, val_bin = out / "data" / "train.bin", out / "data" / "val.bin"
    if train_bin.is_file() and val_bin.is_file():
        return train_bin, val_bin
    docs = [d for f in docs_files for d in read_documents(f)]
    train_docs, val_docs = split_holdout(docs, holdout, seed)
    sources = [Source(train_docs, epochs, chat_share)]
    extra = chunk_documents([d for f in extra_files or [] for d in read_documents(f)], 1500)
    if extra and extra_epochs > 0:
        sources.append(Source(extra, extra_epochs, extra_chat_share))
    if copy_epochs > 0:
        named = [d for d in train_docs + extra if NAMED.search(d)]
        sources.append(Source(named, copy_epochs, 1.0))
    naming = naming or Naming()
    train = build_stream(tok, sources, seed, naming)
    val = build_stream(tok, [Source(val_docs, 1.0, 0.0)], seed + 1)
    save_stream(train, train_bin)
    save_stream(val, val_bin)
    val_bytes = sum(len(d.encode()) for d in val_docs)
    info = {"train_docs": len(train_docs), "val_docs": len(val_docs), "train_tokens": len(train),
            "val_tokens": len(val), "val_bytes": val_bytes, "files": [str(f) for f in docs_files],
            "epochs": epochs, "chat_share": chat_share,
            "extra_files": [str(f) for f in extra_files or []], "extra_epochs": extra_epochs,
            "extra_chat_share": extra_chat_share, "rename_share": naming.rename,
            "invented_share": naming.invented, "letter_share": naming.letters,
            "copy_epochs": copy_epochs}
    (out / "data" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return train_bin, val_bin


def run(args: ModelArgs, cfg: TrainConfig, out: Path, train_bin: Path, val_bin: Path,
        tokenizer: Path, export: Path | None, device: torch.device, progress: bool = True,
        until: int | None = None, init_from: Path | None = None,
        export_latest: bool = False) -> dict[str, Any]:
    """Train (resuming from OUT/ckpt if present) up to cfg.max_steps, or stop after step
    `until` (checkpointed, as if interrupted there). `init_from`: a checkpoint directory whose
    model weights (not optimizer, not step) start a fresh run (a second training phase).
    `export_latest`: export at every evaluation, not only when validation improved (for a phase
    that trades a little validation loss for a skill, such as copying names).
    Returns the last checkpoint's meta."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args, cfg.seed).to(device)
    opt = make_optimizer(model, cfg)
    meta: dict[str, Any] = {"step": 0, "best_val": None, "elapsed_s": 0.0}
    if has_state(out / "ckpt"):
        meta = load_state(out / "ckpt", model, opt)
    elif init_from is not None:
        load_weights(init_from, model)
        meta["init_from"] = str(init_from)
    train = Batches(load_stream(train_bin), cfg.seq_len, cfg.batch_size, cfg.seed)
    val = Batches(load_stream(val_bin), cfg.seq_len, cfg.batch_size, cfg.seed)
    log = LossLog(out)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    last = cfg.max_steps if until is None else min(until, cfg.max_steps)
    bar = tqdm(range(meta["step"], last), initial=meta["step"], total=cfg.max_steps,
               disable=not progress, mininterval=5.0, dynamic_ncols=True)
    model.train()
    t0, elapsed0 = time.time(), meta["elapsed_s"]
    for step in bar:
        t_step = time.time()
        loss, norm = train_step(model, opt, train, step, cfg, device)
        tok_s = tokens_per_step / (time.time() - t_step)
        bar.set_postfix(loss=f"{loss:.3f}", gnorm=f"{norm:.2f}", tok_s=f"{tok_s:.0f}",
                        refresh=False)
        done = step + 1
        row = {"step": done, "tokens": done * tokens_per_step, "lr": f"{lr_at(step, cfg):.3e}",
               "train_loss": f"{loss:.4f}", "elapsed_s": f"{elapsed0 + time.time() - t0:.1f}"}
        if done % cfg.eval_every == 0 or done == last:
            val_loss = evaluate(model, val, cfg.eval_batches, device)
            row["val_loss"] = f"{val_loss:.4f}"
            improved = meta["best_val"] is None or val_loss < meta["best_val"]
            if improved:
                meta["best_val"] = val_loss
            exported = export is not None and (improved or export_latest)
            if exported:
                _export(model, export, tokenizer, done, val_loss)
            meta.update(step=done, elapsed_s=elapsed0 + time.time() - t0,
                        config=asdict(cfg), model=args.to_params_json())
            save_state(out / "ckpt", model, opt, meta)
            bar.write(f"step {done}: train {loss:.4f} val {val_loss:.4f}"
                      f"{' (best)' if improved else ''}{' (exported)' if exported else ''}")
            log.row(**row)
            log.plot()
        elif done % 10 == 0:
            log.row(**row)
    return meta


def _export(model: Transformer, directory: Path, tokenizer: Path, step: int, val: float) -> None:
    """Write the model in the native format with fp16 weights (half the bytes of fp32, so the
    shipped model fits the repository; loaders upcast to fp32 on CPU)."""
    from llama.checkpoints import save

    save(copy.deepcopy(model).to(torch.float16), directory, tokenizer_path=tokenizer)
    (directory / "training_state.json").write_text(
        json.dumps({"step": step, "val_loss": round(val, 4)}, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the tinychat model (resumes from OUT/ckpt)")
    p.add_argument("--out", type=Path, required=True, help="run directory (data, ckpt, logs)")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--docs", type=Path, nargs="+", required=True, help="corpus text files")
    p.add_argument("--export", type=Path, default=None, help="write the best model here")
    p.add_argument("--export-latest", action="store_true",
                   help="export at every evaluation, not only at the best validation loss")
    p.add_argument("--epochs", type=float, default=8.0, help="passes over the docs in the stream")
    p.add_argument("--extra-docs", type=Path, nargs="*", default=[],
                   help="extra corpus files (books): plain text, train only, no holdout")
    p.add_argument("--extra-epochs", type=float, default=0.0)
    p.add_argument("--extra-chat-share", type=float, default=0.0)
    p.add_argument("--rename-share", type=float, default=1.0,
                   help="share of 'a X named Y' chat stories whose hero is renamed")
    p.add_argument("--invented-share", type=float, default=0.0,
                   help="share of renamed heroes given a made-up name instead of a listed one")
    p.add_argument("--letter-share", type=float, default=0.0,
                   help="share of made-up names in the looser letter-group style")
    p.add_argument("--copy-epochs", type=float, default=0.0,
                   help="extra passes over the stories that name their hero, as chat examples "
                        "with the hero renamed (teaches copying the name from the prompt)")
    p.add_argument("--chat-share", type=float, default=0.4)
    p.add_argument("--holdout", type=float, default=0.05, help="share of docs kept for val")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--until", type=int, default=None, help="stop (checkpointed) after this step")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this checkpoint directory's weights (fresh optimizer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup",
              "weight_decay", "grad_clip", "eval_every", "eval_batches", "seed"):
        default = getattr(TrainConfig, f)
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    a = p.parse_args(argv)
    for flag in ("chat_share", "extra_chat_share", "rename_share", "invented_share",
                 "letter_share", "holdout"):
        if not 0.0 <= getattr(a, flag) <= 1.0:
            p.error(f"--{flag.replace('_', '-')}: expected a share in [0, 1], "
                    f"found {getattr(a, flag)}")
    for flag in ("epochs", "extra_epochs", "copy_epochs"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')}: expected >= 0 passes, found {getattr(a, flag)}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.tokenizer)
    margs = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                      vocab_size=tok.vocab_size, hidden_dim=a.hidden_dim,
                      max_seq_len=a.max_seq_len)
    cfg = TrainConfig(**{f: getattr(a, f) for f in (
        "max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "weight_decay",
        "grad_clip", "eval_every", "eval_batches", "seed")}, seq_len=a.max_seq_len)
    train_bin, val_bin = prepare_data(a.out, tok, a.docs, a.epochs, a.chat_share, a.holdout,
                                      a.seed, a.extra_docs, a.extra_epochs, a.extra_chat_share,
                                      Naming(a.rename_share, a.invented_share, a.letter_share),
                                      a.copy_epochs)
    print(f"model: {margs.attention_kind} {margs.n_params(tied=True) / 1e6:.2f}M params; "
          f"{json.dumps(margs.to_params_json())}", flush=True)
    meta = run(margs, cfg, a.out, train_bin, val_bin, a.tokenizer, a.export,
               torch.device(a.device), until=a.until, init_from=a.init_from,
               export_latest=a.export_latest)
    LossLog(a.out).plot(png=True)
    print(f"done: step {meta['step']}, best val {meta['best_val']:.4f}", flush=True)


if __name__ == "__main__":
    main()
