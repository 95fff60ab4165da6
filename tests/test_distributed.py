"""Tensor-parallel inference (llama/parallel/runtime.py) on CPU with gloo, in spawned processes.

The test writes random tiny MHA/GQA/MQA checkpoints, runs 2 and 4 ranks (forkserver children
that join like torchrun workers: RANK, WORLD_SIZE, MASTER_ADDR/PORT), and compares what rank 0
computes with a single process running the same files through llama.checkpoints.load.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_CONFIGS

from llama.checkpoints import hf, load, save
from llama.config import ModelArgs
from llama.model import Transformer
from llama.parallel.runtime import (
    DistributedError,
    RankFailure,
    ShardingError,
    ShardPlan,
    init_from_env,
    kv_cache_bytes,
    load_parallel,
    run_worker_loop,
    shutdown,
    stop_workers,
)
from llama.probes import Probe
from llama.probes.ablation import Ablation, AblationProbe, forced_probs
from llama.probes.attribution import grad_x_input
from llama.probes.why import WhyProbe
from llama.quant import weight_bytes
from llama.rope import rope_frequencies

KINDS = ("mha", "gqa", "mqa")
PROMPT = [1, 5, 9, 13, 2]
NEW_TOKENS = 6
DECODE_STEPS = 600  # a failure scenario's rank 0 decodes ~0.1 s per step until then
# Children fork from a server that imported all this once (torch._dynamo is imported lazily
# by the first meta-device model build: ~2 s of CPU per process otherwise).
MP = mp.get_context("forkserver")
MP.set_forkserver_preload(["torch", "torch._dynamo", "bitsandbytes", __name__])


# Checkpoints -------------------------------------------------------------------------------
def _meta_shards(model: Transformer, directory: Path, n: int) -> None:
    """Meta's layout, transcribed: wo, w2 and the embedding split along dim 1, the other
    matrices along dim 0, norms replicated, plus the rope.freqs key real shards carry."""
    directory.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in model.state_dict().items():
        dim1 = name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight"))
        parts = [t] * n if "norm" in name else t.chunk(n, dim=1 if dim1 else 0)
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = rope_frequencies(model.args.head_dim, model.args.rope_theta)
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    (directory / "params.json").write_text(json.dumps(model.args.to_params_json()))


_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
       "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
       "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
       "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
       "ffn_norm": "post_attention_layernorm"}


def _hf_files(model: Transformer, directory: Path) -> None:
    """Hugging Face's layout: renamed keys, wq/wk permuted for rotate_half."""
    from safetensors.torch import save_file

    a = model.args
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("layers."):
            i, module = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name).groups()
            if module in ("attention.wq", "attention.wk"):
                t = hf.permute(t, a.n_heads if module == "attention.wq" else a.kv_heads)
            out[f"model.layers.{i}.{_HF[module]}.weight"] = t.contiguous()
        else:
            top = {"tok_embeddings.weight": "model.embed_tokens.weight",
                   "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
            out[top[name]] = t
    directory.mkdir(parents=True)
    save_file(out, str(directory / "model.safetensors"))
    config = {"hidden_size": a.dim, "num_hidden_layers": a.n_layers,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.kv_heads,
              "vocab_size": a.vocab_size, "intermediate_size": a.ffn_hidden_dim,
              "rms_norm_eps": a.norm_eps, "max_position_embeddings": a.max_seq_len,
              "rope_theta": a.rope_theta, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tp")
    forkserver.ensure_running()  # its imports run while this process writes the files
    torch.manual_seed(0)
    for kind in KINDS:
        model = Transformer(TINY_CONFIGS[kind]).eval()
        for p in model.parameters():  # random norms too, so a wrong norm would show
            p.data.normal_(0.0, 0.3)
        save(model, root / kind / "native")
        if kind == "gqa":
            _hf_files(model, root / kind / "hf")
            # Meta shards split the vocabulary evenly: drop the odd 97th token.
            even = Transformer(model.args.replace(vocab_size=96)).eval()
            even.load_state_dict({k: v[:96] if k in ("tok_embeddings.weight", "output.weight")
                                  else v for k, v in model.state_dict().items()})
            _meta_shards(even, root / kind / "meta2", 2)
    return root


# What every run computes (rank 0 in a run, or the single-process reference) ------------------
def _tokens(args: ModelArgs) -> torch.Tensor:
    return (torch.arange(2 * 9).view(2, 9) * 31 + 3) % args.vocab_size  # (B, T)


def _greedy(model: Transformer, probe: Probe | None = None) -> tuple[list[int], torch.Tensor]:
    """Prefill PROMPT, then NEW_TOKENS greedy decode steps; -> (tokens, stacked logits)."""
    if probe is not None:
        probe.begin(model, PROMPT)
    tokens, logits = list(PROMPT), []
    pos = torch.arange(len(PROMPT))
    step_in = torch.tensor([PROMPT])
    for _ in range(NEW_TOKENS):
        out = model(step_in, input_pos=pos, last_only=True)[0, -1]  # (V,)
        logits.append(out)
        tokens.append(int(out.argmax()))
        if probe is not None:
            probe.on_step(SimpleNamespace(token_id=tokens[-1], position=len(tokens) - 1))
        step_in, pos = torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1])
    if probe is not None:
        probe.end(model)
    return tokens, torch.stack(logits)


def _trace(trace) -> dict[str, torch.Tensor]:
    out = {}
    for layer, view in trace.attention.items():
        for field in ("probs", "outside", "group_mean", "group_spread"):
            out[f"attention{layer}.{field}"] = getattr(view, field)
    for field in ("q_raw", "q_rot", "k_raw", "k_rot", "scores_rope", "scores_plain", "q_path"):
        out[f"rope.{field}"] = getattr(trace.rope, field)
    return out


def _exercise(model: Transformer) -> dict:
    """Logits, greedy tokens, raw captures and a probe's trace (rank 0 or single process)."""
    res: dict = {}
    with torch.inference_mode():
        res["logits"] = model(_tokens(model.args))
        model.setup_caches(1)
        res["greedy"], res["step_logits"] = _greedy(model)
        res["kv"] = kv_cache_bytes(model, positions=10)
        captures = []
        model.set_observer(captures.append, {1})
        _greedy(model)
        model.set_observer(None)
        # keys/values view the KV cache, which later runs (an ablated replay) overwrite
        res["captures"] = [{k: getattr(c, k).clone() for k in ("q_raw", "k_raw", "q", "keys",
                                                                "values", "out")}
                           for c in captures]
        probe = Probe(model.args, layers={0, 1}, window=16)
        res["probe_greedy"], _ = _greedy(model, probe)
        res["trace"] = _trace(probe.snapshot())
        res["why"] = _why(model)
    return res


def _why(model: Transformer) -> dict[str, torch.Tensor]:
    """The logit lens of a plain forward (every layer, the last 4 positions) and a WhyProbe's
    lens, sink and attribution records over a greedy run."""
    lens: list[torch.Tensor] = []
    model.set_residual_observer(lambda cap: lens.append(cap.lens), lens_rows=4)
    model(_tokens(model.args))
    some: list[torch.Tensor | None] = []  # the lens at the last layer only: fewer collectives
    model.set_residual_observer(lambda cap: some.append(cap.lens), lens_rows=4, lens_layers=[1])
    model(_tokens(model.args))
    model.set_residual_observer(None)
    assert some[0] is None and some[1] is not None, "the lens ran at a layer not chosen"
    why = WhyProbe(model.args, window=16)
    greedy, _ = _greedy(model, why)
    trace = why.snapshot()
    # Heads 1 and 3 of layer 1 from the 2nd reply token on: held by different ranks (2 or 4).
    ablation = Ablation(1, (1, 3), len(PROMPT) + 1)
    ablated, _ = _greedy(model, AblationProbe(ablation))
    return {"lens": torch.stack(lens), "greedy": torch.tensor(greedy),
            "lens_last_only": some[1],
            "ablated_greedy": torch.tensor(ablated),
            "forced": forced_probs(model, greedy, len(PROMPT), None),
            "forced_ablated": forced_probs(model, greedy, len(PROMPT), ablation),
            "grad_x_input": grad_x_input(model, greedy, len(greedy) - 1),
            "top_ids": torch.stack([c.top_ids for c in trace.lens]),
            "top_probs": torch.stack([c.top_probs for c in trace.lens]),
            "token_prob": torch.stack([c.token_prob for c in trace.lens]),
            "sinks": trace.sinks.mass,
            "attribution": torch.cat([trace.attribution[p] for p in sorted(trace.attribution)],
                                     dim=1)}


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds `t`'s data (None: heap memory)."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi and len(fields) >= 6:
            return fields[5]
    return None


# Children ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, scenario: str, ckpt: Path, root: Path,
           env: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    torch.set_num_threads(1)
    err = open(root / f"rank{rank}.err", "w", buffering=1)
    os.dup2(err.fileno(), 2)
    sys.stderr = err
    try:
        SCENARIOS[scenario](ckpt, root)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(f"cpu {ru.ru_utime + ru.ru_stime:.2f}", file=sys.stderr)


def _suite(ckpt: Path, root: Path) -> None:
    """Every check of one world size, in one process group."""
    ctx = init_from_env()
    out: dict = {}
    for kind in KINDS:
        model = load_parallel(ckpt / kind / "native", ctx).model
        out[kind] = {"bytes": _param_bytes(model)}
        if ctx.is_leader:
            if kind == "mha":
                out["rejected"] = _bad_requests(model)
            out[kind].update(_exercise(model))
            if kind == "gqa" and hasattr(model, "fuse_projections"):
                model.broadcast_call("fuse_projections")  # a post-load pass on every rank
                with torch.inference_mode():
                    out[kind]["fused_logits"] = model(_tokens(model.args))
            stop_workers(model)
        else:
            run_worker_loop(model)
    model = load_parallel(ckpt / "gqa" / "native", ctx, load_in_8bit=True).model
    if ctx.is_leader:
        single = load(ckpt / "gqa" / "native", device="cpu", dtype=torch.float32,
                      load_in_8bit=True, progress=False).model
        with torch.inference_mode():
            out["int8"] = {"logits": model(_tokens(model.args)),
                           "single_logits": single(_tokens(single.args))}
        stop_workers(model)
    else:
        run_worker_loop(model)
    out.setdefault("int8", {})["bytes"] = weight_bytes(model)
    out["int8"]["modules"] = {type(m).__name__ for m in model.layers.modules()}
    for fmt in ("meta2", "hf"):
        model = load_parallel(ckpt / "gqa" / fmt, ctx).model
        wq = model.layers[0].attention.wq.weight
        out[fmt] = {"wq_file": _mapped_file(wq)}
        if ctx.is_leader:
            with torch.inference_mode():
                out[fmt]["logits"] = model(_tokens(model.args))
            stop_workers(model)
        else:
            run_worker_loop(model)
    torch.save(out, root / f"rank{ctx.rank}.pt")
    shutdown(ctx)


def _bad_requests(model: torch.nn.Module) -> list[str]:
    """Requests rank 0 must refuse before announcing them (the workers never see them)."""
    errors = []
    for bad in (lambda: model(torch.tensor([[model.args.vocab_size]])),
                lambda: model.setup_caches(0),
                lambda: model(torch.tensor([[1]]), input_pos=torch.tensor([0]))):  # no caches
        try:
            bad()
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _decode_until_failure(ckpt: Path, root: Path) -> None:
    """Rank 0 decodes slowly, marking progress; a test kills or stops a worker meanwhile.

    TP_FAULT on rank 1: "bad_load" (its checkpoint path is wrong) or "stall" (its 6th
    command sleeps in a forward while its heartbeat thread runs on)."""
    ctx = init_from_env()
    fault = os.environ.get("TP_FAULT") if ctx.rank == 1 else None
    path = ckpt / "gqa" / ("missing" if fault == "bad_load" else "native")
    t0 = None
    try:
        model = load_parallel(path, ctx).model
        if not ctx.is_leader:
            if fault == "stall":
                _stall_on(model, 6)
            run_worker_loop(model)
            shutdown(ctx, model)
            return
        with torch.inference_mode():
            model.setup_caches(1)
            for step in range(DECODE_STEPS):  # until the test strikes (the cache wraps around)
                pos = step % model.args.max_seq_len
                model(torch.tensor([[pos % 50 + 1]]), input_pos=torch.tensor([pos]))
                if step == 3:
                    (root / "progress").write_text("3")
                    t0 = time.monotonic()
                time.sleep(0.1)
        (root / "result.txt").write_text("no failure")
    except RankFailure as exc:
        elapsed = time.monotonic() - t0 if t0 is not None else -1.0
        (root / "result.txt").write_text(f"{elapsed:.2f}|{exc}")
    except KeyboardInterrupt:
        (root / "result.txt").write_text("interrupted")
    finally:
        shutdown(ctx, None if ctx.rank else locals().get("model"))


def _stall_on(model: torch.nn.Module, n: int) -> None:
    execute, count = model.execute, [0]

    def stalling(cmd) -> None:
        count[0] += 1
        if count[0] == n:
            time.sleep(60)
        execute(cmd)

    model.execute = stalling


def _idle(ckpt: Path, root: Path) -> None:
    """Loaded, then idle (no collective running) until a test signals the ranks."""
    ctx = init_from_env()
    model = load_parallel(ckpt / "gqa" / "native", ctx).model
    try:
        if not ctx.is_leader:
            run_worker_loop(model)
            return
        (root / "progress").write_text("idle")
        time.sleep(60)
    finally:
        shutdown(ctx, model if ctx.is_leader else None)


SCENARIOS = {"suite": _suite, "decode": _decode_until_failure, "idle": _idle}


def _start(world: int, scenario: str, ckpt: Path, root: Path, **env: str) -> list:
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = [MP.Process(target=_child, args=(r, world, port, scenario, ckpt, root, env),
                        daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    return procs


# A bound on waits for ranks to exit, not an expected time: each wait ends as soon as they do.
EXIT_TIMEOUT_S = 120


def _join(procs: list, timeout: float, root: Path) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    if alive:
        logs = {f.name: f.read_text()[-1500:] for f in sorted(root.glob("rank*.err"))}
        pytest.fail(f"{len(alive)} rank(s) still running after {timeout} s; logs: {logs}")
    return [p.exitcode for p in procs]


def _logs(root: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(root.glob("*.err")))


# Runs and the reference ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(checkpoints: Path) -> dict:
    """The same files through llama.checkpoints.load in this process."""
    out = {}
    for kind in KINDS:
        model = load(checkpoints / kind / "native", device="cpu", dtype=torch.float32,
                     progress=False).model
        out[kind] = _exercise(model)
        out[kind]["bytes"] = _param_bytes(model)
    merged = load(checkpoints / "gqa" / "meta2", device="cpu", dtype=torch.float32,
                  progress=False).model  # llama.checkpoints merges the shards
    with torch.inference_mode():
        out["meta2"] = {"logits": merged(_tokens(merged.args))}
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def run(request: pytest.FixtureRequest, checkpoints: Path) -> tuple[int, list[dict]]:
    """One process group of N ranks running `_suite`; -> (N, each rank's results)."""
    world = request.param
    root = checkpoints / f"suite{world}"
    procs = _start(world, "suite", checkpoints, root)
    request.getfixturevalue("reference")  # computed here while the ranks work
    codes = _join(procs, 120, root)
    assert codes == [0] * world, f"exit codes {codes}\n{_logs(root)}"
    return world, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


# Must show ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_single_process(run: tuple, reference: dict, kind: str) -> None:
    _, ranks = run
    got, want = ranks[0][kind], reference[kind]
    assert _max_diff(got["logits"], want["logits"]) <= 1e-5
    assert _max_diff(got["step_logits"], want["step_logits"]) <= 1e-5


def test_bad_requests_fail_on_rank0_alone(run: tuple) -> None:
    _, ranks = run
    rejected = ranks[0]["rejected"]
    assert len(rejected) == 3, rejected
    assert "tokens: ids must lie in [0, 97)" in rejected[0]
    assert "batch_size" in rejected[1] and "setup_caches(1)" in rejected[2]
    # ...and the same run then matched the single process (the tests above), so the workers
    # never saw them.


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_token_identical(run: tuple, reference: dict, kind: str) -> None:
    _, ranks = run
    assert ranks[0][kind]["greedy"] == reference[kind]["greedy"]
    assert ranks[0][kind]["probe_greedy"] == reference[kind]["greedy"]
    assert len(reference[kind]["greedy"]) == len(PROMPT) + NEW_TOKENS


@pytest.mark.parametrize("kind", KINDS)
def test_each_rank_holds_one_nth_of_the_parameters(run: tuple, reference: dict,
                                                   kind: str) -> None:
    world, ranks = run
    a = TINY_CONFIGS[kind]
    whole = reference[kind]["bytes"]
    norms = (2 * a.n_layers + 1) * a.dim * 4  # replicated on every rank
    kv = 2 * a.n_layers * a.dim * a.kv_heads * a.head_dim * 4
    copies = ShardPlan(a, 0, world).kv_replicas  # KV heads replicated when N > n_kv_heads
    expected = (whole - norms - kv) / world + norms + kv * copies / world
    slack = 4 * (a.dim + 3 * a.dim)  # uneven split: one vocabulary row, one FFN unit
    per_rank = [r[kind]["bytes"] for r in ranks]
    assert all(abs(b - expected) <= slack for b in per_rank), (per_rank, expected)
    assert sum(per_rank) == whole + (world - 1) * norms + (copies - 1) * kv


@pytest.mark.parametrize("kind", KINDS)
def test_probes_on_rank0_equal_single_process(run: tuple, reference: dict, kind: str) -> None:
    world, ranks = run
    got, want = ranks[0][kind], reference[kind]
    assert len(got["captures"]) == len(want["captures"]) == NEW_TOKENS
    for g, w in zip(got["captures"], want["captures"], strict=True):
        for field in w:
            assert _max_diff(g[field], w[field]) <= 1e-5, field
    assert got["trace"].keys() == want["trace"].keys()
    for key, value in want["trace"].items():
        assert _max_diff(got["trace"][key], value) <= 1e-5, key
    kv, single = got["kv"], want["kv"]
    copies = ShardPlan(TINY_CONFIGS[kind], 0, world).kv_replicas
    assert kv.world_size == world and kv.total == kv.per_rank * world
    assert kv.total == single.total * copies


@pytest.mark.parametrize("kind", KINDS)
def test_lens_and_why_views_on_rank0_equal_single_process(run: tuple, reference: dict,
                                                          kind: str) -> None:
    """The lens uses the vocabulary-split output projection: gathered, it is the whole."""
    _, ranks = run
    got, want = ranks[0][kind]["why"], reference[kind]["why"]
    assert got["lens"].shape == (TINY_CONFIGS[kind].n_layers, 2, 4, TINY_CONFIGS[kind].vocab_size)
    assert torch.equal(got["greedy"], want["greedy"]) and torch.equal(got["top_ids"],
                                                                      want["top_ids"])
    for key in ("lens", "top_probs", "token_prob", "sinks", "attribution", "lens_last_only"):
        assert _max_diff(got[key], want[key]) <= 1e-5, key
    assert torch.equal(want["lens_last_only"], want["lens"][1])


@pytest.mark.parametrize("kind", KINDS)
def test_ablation_replay_and_gradient_x_input_equal_single_process(run: tuple, reference: dict,
                                                                  kind: str) -> None:
    """Each rank zeroes the ablated heads it holds (heads 1 and 3 lie on different ranks);
    gradient x input runs its backward through every rank's collectives."""
    _, ranks = run
    got, want = ranks[0][kind]["why"], reference[kind]["why"]
    assert torch.equal(got["ablated_greedy"], want["ablated_greedy"])
    assert not torch.equal(want["forced_ablated"], want["forced"])  # the ablation matters
    for key in ("forced", "forced_ablated", "grad_x_input"):
        assert _max_diff(got[key], want[key]) <= 1e-5, key
    assert want["grad_x_input"].shape == (len(PROMPT) + NEW_TOKENS - 1,)
    assert want["grad_x_input"].abs().max() > 0


def test_post_load_fusion_and_8bit_run_on_every_rank(run: tuple, reference: dict) -> None:
    _, ranks = run
    if "fused_logits" in ranks[0]["gqa"]:  # llama.model may offer fuse_projections()
        assert _max_diff(ranks[0]["gqa"]["fused_logits"], reference["gqa"]["logits"]) <= 1e-5
    fp32, single = reference["gqa"]["logits"], ranks[0]["int8"]["single_logits"]
    got = ranks[0]["int8"]["logits"]
    # Column-parallel slices keep their row scales; row-parallel ones (wo, w2) get per-slice
    # scales, so the error differs from one process's 8-bit but stays of its size.
    assert _max_diff(got, fp32) <= 2 * _max_diff(single, fp32) + 1e-3
    assert (got.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.75
    for r in ranks:
        assert "Linear8bitLt" in r["int8"]["modules"] and "Linear" not in r["int8"]["modules"]
        assert r["int8"]["bytes"] < 0.5 * r["gqa"]["bytes"]


def test_meta_shards_map_to_ranks_or_get_sliced(run: tuple, reference: dict) -> None:
    world, ranks = run
    for rank, result in enumerate(ranks):
        mapped = result["meta2"]["wq_file"]
        # 2 ranks: shard i is rank i's slice, bound as mapped (never merged nor copied).
        # 4 ranks: rank r's rows are a slice of shard r // 2 (the other shard is not read).
        assert mapped is not None and mapped.endswith(f"consolidated.{rank * 2 // world:02d}.pth")
    assert _max_diff(ranks[0]["meta2"]["logits"], reference["meta2"]["logits"]) <= 1e-5
    assert _max_diff(ranks[0]["hf"]["logits"], reference["gqa"]["logits"]) <= 1e-5


def test_meta_shards_merge_on_one_rank(checkpoints: Path, reference: dict) -> None:
    model = load_parallel(checkpoints / "gqa" / "meta2").model
    with torch.inference_mode():
        logits = model(_tokens(model.args))
    assert _max_diff(logits, reference["meta2"]["logits"]) <= 1e-5


def test_split_refused_with_a_clear_error() -> None:
    gqa = TINY_CONFIGS["gqa"]  # 4 query heads, 2 KV heads
    with pytest.raises(ShardingError, match=r"n_heads=4 is not a multiple of 3.*valid rank "
                                            r"counts: \[1, 2, 4\]"):
        ShardPlan(gqa, 0, 3)
    odd = ModelArgs(dim=96, n_layers=1, n_heads=12, n_kv_heads=4, vocab_size=10)
    with pytest.raises(ShardingError, match="n_kv_heads=4: 6 ranks must divide it"):
        ShardPlan(odd, 0, 6)
    mqa = ShardPlan(TINY_CONFIGS["mqa"], 3, 4)  # every rank holds the one KV head
    assert mqa.kv_heads == (0, 1) and mqa.kv_replicas == 4 and mqa.heads == (3, 4)
    seventy = ShardPlan(ModelArgs(dim=8192, n_layers=1, n_heads=64, n_kv_heads=8), 5, 8)
    assert seventy.heads == (40, 48) and seventy.kv_heads == (5, 6)  # q head h reads h // 8


def test_single_process_parallel_model_refuses_compiled_decode(checkpoints: Path) -> None:
    model = load_parallel(checkpoints / "mqa" / "native").model
    assert model.compiled_decode is None
    with pytest.raises(DistributedError, match="compile_decode is not supported"):
        model.compiled_decode = lambda tokens, pos: tokens
    model.setup_caches(1)
    kv = kv_cache_bytes(model, positions=5)  # one MQA KV head, fp32: 2 * layers * 1 * 16 * 5 * 4
    assert (kv.per_rank, kv.total, kv.world_size) == (2 * 2 * 16 * 5 * 4,) * 2 + (1,)


# Failures -----------------------------------------------------------------------------------
FAULTS = {  # scenario -> (ranks, environment)
    "kill": (4, {"LLAMA_TP_HEARTBEAT": "3"}),
    "hang": (2, {"LLAMA_TP_HEARTBEAT": "2", "LLAMA_TP_TIMEOUT": "60"}),
    "stall": (2, {"TP_FAULT": "stall", "LLAMA_TP_TIMEOUT": "3", "LLAMA_TP_HEARTBEAT": "20"}),
    "badload": (2, {"TP_FAULT": "bad_load"}),
    "interrupt": (2, {"LLAMA_TP_HEARTBEAT": "3"}),
    "term": (2, {}),
    "kill_then_term": (2, {}),
}


@pytest.fixture(scope="module")
def faults(checkpoints: Path) -> Iterator[dict[str, tuple[list, Path]]]:
    """Every failure scenario's process group, started at once: each test below acts on its
    own group while the others decode slowly, so their waits overlap instead of adding up."""
    groups = {}
    for name, (world, env) in FAULTS.items():
        scenario = "idle" if name.endswith("term") else "decode"
        groups[name] = (_start(world, scenario, checkpoints, checkpoints / name, **env),
                        checkpoints / name)
    yield groups
    for procs, _ in groups.values():
        for p in procs:
            if p.is_alive():
                p.kill()


def _wait_for(path: Path, timeout: float, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} never appeared\n{_logs(root)}")
        time.sleep(0.05)


def test_killed_rank_is_named_and_every_rank_exits(faults: dict) -> None:
    procs, root = faults["kill"]
    _wait_for(root / "progress", 60, root)
    procs[2].kill()  # SIGKILL mid-generation, as the OOM killer would
    codes = _join(procs, 20, root)
    elapsed, message = (root / "result.txt").read_text().split("|", 1)
    assert "rank 2 of 4 failed" in message and "exited" in message, message
    assert float(elapsed) < 20  # pid checks every 0.5 s; loose for a loaded machine
    assert codes[0] == 0 and codes[2] == -signal.SIGKILL
    assert codes[1] == codes[3] == 1  # told to stop by rank 0, no zombie left behind
    assert "stopping: tensor-parallel rank 2 of 4 failed" in (root / "rank1.err").read_text()


def test_hung_rank_is_named_within_the_heartbeat_timeout(faults: dict) -> None:
    procs, root = faults["hang"]
    _wait_for(root / "progress", 60, root)
    os.kill(procs[1].pid, signal.SIGSTOP)  # alive but frozen: sockets stay open
    t0 = time.monotonic()
    try:
        procs[0].join(40)  # ~5 s: 2 s of silence, then 3 s of grace if stuck in a collective
        waited = time.monotonic() - t0
    finally:
        procs[1].kill()
        codes = _join(procs, 10, root)
    log = (root / "rank0.err").read_text()
    assert "rank 1 of 2 failed: no heartbeat for 2 s" in log, _logs(root)
    # Far below the 60 s collective timeout; loose because this machine may be loaded.
    assert waited < 30 and codes[0] is not None, (waited, codes)


def test_rank_that_hangs_mid_step_is_named(faults: dict) -> None:
    """Its heartbeat goes on (the hang releases the GIL): the collective times out and the
    rank that never entered it is blamed."""
    procs, root = faults["stall"]
    codes = _join(procs, 60, root)
    _, message = (root / "result.txt").read_text().split("|", 1)
    assert "rank 1 of 2 failed: it hangs during forward" in message, _logs(root)
    assert codes == [0, 1], codes


def test_rank_that_fails_to_load_is_named(faults: dict) -> None:
    procs, root = faults["badload"]
    codes = _join(procs, 60, root)
    _, message = (root / "result.txt").read_text().split("|", 1)
    assert "rank 1 of 2 failed: CheckpointError" in message and "missing" in message, message
    assert codes == [0, 1], codes


def test_ctrl_c_on_rank0_stops_every_rank(faults: dict) -> None:
    """Waits on the ranks' exits, not on a fixed time: leaving takes a few heartbeats and a
    barrier, which took more than 15 s at load 15."""
    procs, root = faults["interrupt"]
    _wait_for(root / "progress", 60, root)
    os.kill(procs[0].pid, signal.SIGINT)
    _wait_for(root / "result.txt", EXIT_TIMEOUT_S, root)
    codes = _join(procs, EXIT_TIMEOUT_S, root)
    assert (root / "result.txt").read_text() == "interrupted"
    assert codes[0] == 0 and codes[1] in (0, 1), (codes, _logs(root))


def test_sigterm_to_every_rank_blames_none(faults: dict) -> None:
    """torchrun stopped from outside sends SIGTERM to every rank: the workers say so before
    they exit, so rank 0 does not mistake them for failed ranks."""
    procs, root = faults["term"]
    _wait_for(root / "progress", 60, root)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    codes = _join(procs, EXIT_TIMEOUT_S, root)
    log = (root / "rank0.err").read_text()
    assert "rank 0: stopping on SIGTERM" in log and "failed" not in log, _logs(root)
    assert codes == [128 + signal.SIGTERM] * 2, codes


def test_sigterm_after_a_rank_died_names_it(faults: dict) -> None:
    """torchrun sends SIGTERM to the others once a rank died: rank 0, idle, names the dead
    rank before it exits (status 1)."""
    procs, root = faults["kill_then_term"]
    _wait_for(root / "progress", 60, root)
    procs[1].kill()
    procs[1].join(EXIT_TIMEOUT_S)  # dead and reaped, as torchrun sees it before it signals
    os.kill(procs[0].pid, signal.SIGTERM)
    codes = _join(procs, EXIT_TIMEOUT_S, root)
    log = (root / "rank0.err").read_text()
    assert "rank 1 of 2 failed: its process" in log and "exited" in log, _logs(root)
    assert codes == [1, -signal.SIGKILL], codes
