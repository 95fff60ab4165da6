"""The training loop: loss goes down, an interrupted + resumed run equals the straight run,
the LR schedule, and the chat/plain training documents and batches of llama/train/data.py."""

from __future__ import annotations

import itertools
import json
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llama.chat import encode_dialog
from llama.config import ModelArgs
from llama.train.data import (
    HELD_OUT_NAMES,
    NAMES,
    Batches,
    Naming,
    chat_ids,
    invent_name,
    letter_name,
    make_instruction,
    rename,
)
from llama.train.loop import TrainConfig, lr_at, prepare_data, run
from llama.train.state import WEIGHTS

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                 max_seq_len=32)


def _streams(tmp_path):
    """A learnable stream: a fixed random 'text' of 97 tokens repeated, plus its val copy."""
    rng = np.random.default_rng(0)
    unit = rng.integers(3, ARGS.vocab_size, size=97)
    train, val = tmp_path / "train.bin", tmp_path / "val.bin"
    np.tile(unit, 40).astype(np.uint16).tofile(train)
    np.tile(unit, 4).astype(np.uint16).tofile(val)
    return train, val


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, grad_accum=2, seq_len=32, lr=1e-2, min_lr=1e-3,
                warmup=2, eval_every=4, eval_batches=2, seed=3)
    return TrainConfig(**{**base, **kw})


def _train(tmp_path, out_name: str, cfg: TrainConfig, until: int | None = None) -> dict:
    train, val = _streams(tmp_path)
    return run(ARGS, cfg, tmp_path / out_name, train, val, tokenizer=tmp_path / "none",
               export=None, device=torch.device("cpu"), progress=False, until=until)


def _losses(path) -> list[float]:
    lines = path.read_text().splitlines()[1:]
    return [float(line.split(",")[3]) for line in lines if line.split(",")[3]]


def test_loss_decreases(tmp_path):
    meta = _train(tmp_path, "run", _cfg(max_steps=12, eval_every=6))
    val_losses = [float(r.split(",")[4]) for r in
                  (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:] if r.split(",")[4]]
    assert meta["step"] == 12
    assert val_losses[-1] < val_losses[0] < np.log(ARGS.vocab_size) + 0.5
    assert (tmp_path / "run" / "loss.html").stat().st_size > 1000


def test_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = _cfg()
    _train(tmp_path, "straight", cfg)
    first = _train(tmp_path, "resumed", cfg, until=3)
    assert first["step"] == 3
    _train(tmp_path, "resumed", cfg)  # a fresh process would do the same: state comes from disk
    a = load_file(str(tmp_path / "straight" / "ckpt" / WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / "ckpt" / WEIGHTS))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(tmp_path / "straight" / "loss.csv")[-1] == \
        _losses(tmp_path / "resumed" / "loss.csv")[-1]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(lrs[9:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_batches_are_a_pure_function_of_the_step():
    stream = np.arange(1000, dtype=np.uint16)
    b1, b2 = Batches(stream, 16, 4, seed=7), Batches(stream, 16, 4, seed=7)
    for k in (0, 5, 20, 3):  # 20 is in the second pass over the windows
        x1, y1 = b1.batch(k)
        x2, y2 = b2.batch(k)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(b1.batch(0)[0], b1.batch(1)[0])


def test_instruction_renames_the_hero_consistently():
    story = ("Once upon a time, there was a little dog named Max. Max liked to run.\n"
             "Max's ball was red.")
    renamed_count = 0
    for seed in range(30):
        instruction, renamed = make_instruction(story, random.Random(seed))
        asked = [n for n in NAMES if re.search(rf"\b{n}\b", instruction)]
        if asked:
            renamed_count += 1
            (new,) = asked
            assert "dog" in instruction
            assert renamed.count(new) == 3 and ("Max" not in renamed or new == "Max")
        else:
            assert renamed == story
    assert renamed_count >= 15  # most stories with "a dog named Max" get a named instruction
    assert all(make_instruction(story, random.Random(s), Naming(rename=0.0))[1] == story
               for s in range(10))
    assert rename("Tom met Tommy.", "Tom", "Zed") == "Zed met Tommy."
    invented = [make_instruction(story, random.Random(s), Naming(invented=1.0)) for s in range(10)]
    for instruction, renamed in invented:  # made-up names, used in both places
        name = instruction.split("named ")[-1].rstrip(".?") if "named" in instruction else None
        if name and "," not in name and " " not in name:
            assert name not in NAMES and renamed.count(name) == 3


def test_chat_example_is_the_apps_template(trained_tokenizer):
    ids = chat_ids(trained_tokenizer, "Write a story about a cat named Zed.", "Zed sat.")
    prompt = encode_dialog(trained_tokenizer,
                           [{"role": "user", "content": "Write a story about a cat named Zed."}])
    assert ids[: len(prompt.ids)] == prompt.ids  # the app's prompt, then the answer
    assert ids[-1] == trained_tokenizer.eos_id
    assert trained_tokenizer.decode(ids[len(prompt.ids):]).strip() == "Zed sat."


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    from llama.tokenizer import load_tokenizer
    from llama.train.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "the cat dog sat ran on a mat big red ball Zed Max happy park tree".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(300)]
    path = train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "t", vocab_size=320)
    return load_tokenizer(path)


def test_teacher_batch_keeps_only_finished_stories():
    from llama.model import Transformer
    from llama.train.teacher import clean_story, sample_batch

    model = Transformer(ARGS).eval()
    gen = torch.Generator().manual_seed(0)
    stops = (1, 2, 5, 6, 7, 8)  # many stop ids: most of the 16 sequences end early
    seqs = sample_batch(model, 16, bos_id=1, stop_ids=stops, max_len=20, temperature=1.0,
                        generator=gen)
    assert 0 < len(seqs) <= 16
    for ids in seqs:
        assert len(ids) < 19 and not set(ids) & set(stops)
    assert clean_story("  a \n\n b  \n") == "a\nb"


def test_init_from_takes_weights_only(tmp_path):
    _train(tmp_path, "phase1", _cfg(max_steps=4))
    train, val = _streams(tmp_path)
    frozen = _cfg(max_steps=2, lr=0.0, min_lr=0.0)  # no update: weights must stay phase 1's
    meta = run(ARGS, frozen, tmp_path / "phase2", train, val, tokenizer=tmp_path / "none",
               export=None, device=torch.device("cpu"), progress=False,
               init_from=tmp_path / "phase1" / "ckpt")
    assert meta["step"] == 2 and meta["init_from"].endswith("ckpt")
    a = load_file(str(tmp_path / "phase1" / "ckpt" / WEIGHTS))
    b = load_file(str(tmp_path / "phase2" / "ckpt" / WEIGHTS))
    for key in (k for k in a if k.startswith("model.")):
        assert torch.equal(a[key], b[key]), key


def test_export_writes_a_loadable_fp16_tied_model(tmp_path, trained_tokenizer):
    from llama.checkpoints import load

    args = ARGS.replace(vocab_size=trained_tokenizer.vocab_size)
    train, val = _streams(tmp_path)
    run(args, _cfg(max_steps=2, eval_every=2), tmp_path / "run", train, val,
        tokenizer=trained_tokenizer.path, export=tmp_path / "export",
        device=torch.device("cpu"), progress=False)
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "output.weight" not in tensors  # tied to the embedding
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    loaded = load(tmp_path / "export", device="cpu", progress=False)
    assert loaded.model.args == args and loaded.tokenizer_path.is_file()


def test_invented_names_are_new_varied_and_never_the_benchmark_names():
    rng = random.Random(5)
    names = [invent_name(rng) for _ in range(3000)]
    assert not set(names) & (set(NAMES) | HELD_OUT_NAMES)
    assert all(3 <= len(n) <= 8 and n[0].isupper() and n[1:].islower() for n in names)
    assert len(set(names)) > 2000  # a model cannot memorise them: it has to copy
    assert any(n[0] in "AEIOUY" for n in names)  # some start with a vowel, as "Oscar" does


def test_letter_names_have_no_fixed_shape_and_are_never_listed_names():
    rng = random.Random(6)
    names = [letter_name(rng) for _ in range(3000)]
    assert not set(names) & (set(NAMES) | HELD_OUT_NAMES)
    assert len(set(names)) > 2500 and all(3 <= len(n) <= 8 for n in names)
    # clusters at the start, middle and end alike (the syllable style ends "tt" names only)
    assert any(n.endswith("tt") for n in names) and any("tt" in n[1:-2] for n in names)
    story = "Once upon a time there was a big dog named Max. Max ran."
    seen = {make_instruction(story, random.Random(s), Naming(invented=1.0, letters=1.0))[1]
            for s in range(20)}
    assert len(seen) == 20 and not any("Max" in t for t in seen)


def test_copy_passes_add_renamed_named_stories_as_chat(tmp_path, trained_tokenizer):
    named = "Once upon a time there was a big dog named Max. Max ran to the park."
    plain = "The cat sat on the mat. It was a happy cat."
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n<|endoftext|>\n".join([named, plain] * 20) + "\n")

    def stream(copy_epochs: float) -> list[int]:
        out = tmp_path / f"run{copy_epochs}"
        train_bin, _ = prepare_data(out, trained_tokenizer, [corpus], epochs=1.0, chat_share=0.0,
                                    holdout=0.1, seed=0, naming=Naming(invented=1.0),
                                    copy_epochs=copy_epochs)
        return np.fromfile(train_bin, dtype=np.uint16).tolist()

    base, more = stream(0.0), stream(2.0)
    bos, eos = trained_tokenizer.bos_id, trained_tokenizer.eos_id
    docs = [trained_tokenizer.decode(d) for d in _split(more, bos, eos)]
    chats = [d for d in docs if "[INST]" in d]
    assert len(base) < len(more) and len(chats) == len(docs) - len(_split(base, bos, eos))
    assert len(chats) >= 30 and all("named" in c or "called" in c or "," in c for c in chats)
    assert not any("Max" in c for c in chats)  # every copy example renames the hero


def _split(ids: list[int], bos: int, eos: int) -> list[list[int]]:
    docs, cur = [], []
    for t in ids:
        cur.append(t)
        if t == eos:
            docs.append(cur)
            cur = []
    return docs


def test_export_latest_exports_even_when_validation_gets_worse(tmp_path, trained_tokenizer):
    args = ARGS.replace(vocab_size=trained_tokenizer.vocab_size)
    train, val = _streams(tmp_path)
    steps = []
    for latest in (False, True):
        out = tmp_path / f"export{latest}"
        run(args, _cfg(max_steps=4, eval_every=2, lr=5.0, min_lr=5.0, warmup=0), tmp_path /
            f"run{latest}", train, val, tokenizer=trained_tokenizer.path, export=out,
            device=torch.device("cpu"), progress=False, export_latest=latest)
        steps.append(json.loads((out / "training_state.json").read_text())["step"])
    assert steps == [2, 4]  # best (step 2: lr 5 then wrecks the model) vs the latest


@pytest.mark.parametrize("flags, message", [
    (["--letter-share", "1.5"], "--letter-share: expected a share in [0, 1], found 1.5"),
    (["--invented-share", "-0.1"], "--invented-share: expected a share in [0, 1], found -0.1"),
    (["--copy-epochs", "-2"], "--copy-epochs: expected >= 0 passes, found -2.0"),
])
def test_bad_training_flags_are_named(flags, message, capsys):
    from llama.train.loop import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--out", "o", "--tokenizer", "t", "--docs", "d", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
