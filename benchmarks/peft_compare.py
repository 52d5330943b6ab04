"""dora_jax against Hugging Face PEFT on the same random Llama: step time, memory, inference.

Both sides run one model configuration, ``dora_jax.models.llama.LlamaConfig.bench()``
(hidden 512, FFN 1408, 4 layers, 8 heads, 8 KV heads, vocab 8000, tied embeddings, RoPE
base 1e4): dora_jax's Flax Llama, and ``transformers.LlamaForCausalLM`` built from a
``LlamaConfig`` (no download) loaded with the very same random weights (the script checks
that both give the same logits). fp32, batch 4x256, all 7 projections adapted, alpha = 2r,
AdamW (lr 1e-4, weight decay 0.01), forward + backward + update per step.

One process times every configuration of both frameworks in interleaved rounds (machine
noise hits all alike) and reports medians; peak memory comes from a fresh process per
configuration that imports only its own framework (as benchmarks/step_time.py does:
``malloc_trim`` after compiling, then ``/proc/self/clear_refs`` and ``VmHWM`` over three
steps; on a GPU the device's own peak as well). Not a test: the numbers are for reading.

    pip install torch==2.13.0 && pip install -e ".[bench]"   # torch first: keeps its build
    python benchmarks/peft_compare.py                 # r=8, dropout 0 (default, ~10 min)
    python benchmarks/peft_compare.py --full          # r=8,32 x dropout 0,0.05 (~40 min)
    python benchmarks/peft_compare.py --full --pin --threads 1   # on a shared, busy CPU

Writes ``<out>.json``, ``<out>.md`` (the tables) and ``<out>.png`` (a plot). The same
script runs on a GPU (jax's default device; torch uses cuda when available), where it also
reports MFU; both frameworks then compute IEEE fp32 matmuls unless ``--tf32``.

PEFT has no DVoRA: its rows are dora_jax only. VeRA and DVoRA use ``--vera-rank``
(default 256, PEFT's ``VeraConfig`` default) in both frameworks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import _gpu_peaks
from _cli import at_least, int_list, names, probability_list

# On a GPU, jax would otherwise take 75% of its memory up front and starve torch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# transformers' module names of the Llama projections (PEFT's target_modules); the jax side
# takes its targets from dora_jax.models.llama.PROJECTIONS (importing it here would import
# jax into the torch-only memory process).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, WEIGHT_DECAY = 1e-4, 0.01
# MFU divides by the GPU's dense peak (benchmarks/_gpu_peaks.py, matched by exact name): fp32
# without tensor cores, or tf32 tensor cores with --tf32. An unknown GPU gets no MFU.
FRAMEWORKS = {"jax": "dora_jax", "torch": "PEFT"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One thing to time: a training step or an inference forward of one framework."""

    framework: str  # "jax" (dora_jax) or "torch" (PEFT)
    method: str  # full | lora | dora | vera | dvora | base | merged
    rank: int = 0
    dropout: float = 0.0
    inference: bool = False

    @property
    def key(self) -> str:
        kind = "infer" if self.inference else "train"
        return f"{self.framework}/{kind}/{self.method}/r{self.rank}/p{self.dropout:g}"

    @property
    def label(self) -> str:
        if self.inference:
            return {
                "base": "base",
                "lora": f"LoRA r{self.rank} unmerged",
                "dora": f"DoRA r{self.rank} unmerged",
                "merged": f"DoRA r{self.rank} merged",
            }[self.method]
        if self.method == "full":
            return "full fine-tuning"
        name = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA"}[self.method]
        return f"{name} r{self.rank}" + (f", dropout {self.dropout:g}" if self.dropout else "")

    @classmethod
    def from_key(cls, key: str) -> Case:
        framework, kind, method, rank, dropout = key.split("/")
        return cls(framework, method, int(rank[1:]), float(dropout[1:]), kind == "infer")


def cases_for(args) -> list[Case]:
    """The grid: training configs per framework, then inference forwards."""
    cases = []
    for fw in args.frameworks:
        cases.append(Case(fw, "full"))
        for p in args.dropouts:
            for r in args.ranks:
                cases += [Case(fw, "lora", r, p), Case(fw, "dora", r, p)]
            if args.vera_rank:
                cases.append(Case(fw, "vera", args.vera_rank, p))
                if fw == "jax":  # PEFT has no DVoRA
                    cases.append(Case(fw, "dvora", args.vera_rank, p))
    for fw in args.frameworks:
        r = args.ranks[0]
        cases += [Case(fw, m, r if m != "base" else 0, 0.0, True) for m in ("base",)]
        cases += [Case(fw, m, r, 0.0, True) for m in ("lora", "dora", "merged")]
    return cases


# --- FLOPs (analytic) -------------------------------------------------------------------


def _shapes(cfg) -> list[tuple[int, int]]:
    h, f = cfg["hidden"], cfg["ffn"]
    return [(h, h)] * 4 + [(h, f), (h, f), (f, h)]


def step_flops(case: Case, cfg: dict, batch: int, seq: int) -> float:
    """Matmul FLOPs of one step: forward, input gradients, weight gradients of trained
    weights only (frozen kernels get none), attention at full (non-causal) cost."""
    tokens = batch * seq
    layers, h, vocab = cfg["layers"], cfg["hidden"], cfg["vocab"]
    proj = sum(2 * tokens * i * o for i, o in _shapes(cfg)) * layers
    head = 2 * tokens * h * vocab
    attention = 4 * tokens * seq * h * layers  # q k^T and p v
    forward = proj + head + attention
    r = case.rank
    branch = sum(2 * tokens * r * (i + o) for i, o in _shapes(cfg)) * layers
    norm = sum(2 * i * o * (r + 1) + 2 * r * r * (i + o) for i, o in _shapes(cfg)) * layers
    if case.method in ("lora", "dora", "vera", "dvora"):
        forward += branch
    if case.method in ("dora", "dvora", "merged"):
        forward += norm
    if case.inference:
        return float(forward)
    backward = proj + head + 2 * attention  # input gradients
    if case.method == "full":
        backward += proj + head
    elif case.method in ("lora", "dora"):
        backward += 2 * branch  # input and weight gradients of A and B
    else:  # VeRA/DVoRA: input gradients through the frozen shared matrices only
        backward += branch
    return float(forward + backward)


# --- memory helpers ----------------------------------------------------------------------


def _memory_module():
    """``dora_jax/memory.py`` loaded on its own: importing the ``dora_jax`` package would
    import jax into the torch-only memory process. The module needs only the stdlib."""
    import importlib.util

    package = importlib.util.find_spec("dora_jax")  # finds, does not execute, the package
    path = os.path.join(next(iter(package.submodule_search_locations)), "memory.py")
    spec = importlib.util.spec_from_file_location("_dora_jax_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- dora_jax side -----------------------------------------------------------------------


class JaxSide:
    """The project's Llama with random weights, and dora_jax steps over it."""

    def __init__(self, args, tokens=None):
        import jax

        from dora_jax.models.llama import Llama, LlamaConfig

        if jax.default_backend() != "cpu" and not args.tf32:
            jax.config.update("jax_default_matmul_precision", "highest")
        self.jax = jax
        self.cfg = LlamaConfig.bench()
        self.model = Llama(self.cfg)
        if tokens is None:
            tokens = jax.random.randint(
                jax.random.key(1), (args.batch, args.seq), 0, self.cfg.vocab_size
            )
        self.tokens = jax.numpy.asarray(tokens)
        self.params = jax.jit(self.model.init)(jax.random.key(0), self.tokens[:, :8])["params"]
        self.device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"

    def make(self, case: Case) -> tuple[Callable[[int], None], int]:
        """Returns (run one step i and block, trainable parameter count)."""
        jax = self.jax
        import optax

        import dora_jax
        from dora_jax.experiments import training
        from dora_jax.models.llama import projection_regex

        jax_targets = projection_regex()
        model, params, tokens = self.model, self.params, self.tokens
        if case.inference:
            plain = jax.jit(lambda p, t: model.apply({"params": p}, t))
            if case.method == "base":
                fn, p = plain, params
            else:
                kind = "dora" if case.method == "merged" else case.method
                adapted = dora_jax.wrap(params, case.rank, method=kind, targets=jax_targets)
                if case.method == "merged":
                    fn, p = plain, jax.jit(dora_jax.merge)(adapted)
                else:
                    fn = jax.jit(lambda p, t: dora_jax.apply(model.apply)({"params": p}, t))
                    p = adapted

            def run(i):  # noqa: ARG001
                fn(p, tokens).block_until_ready()

            return run, 0

        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        if case.method == "full":
            trainable, frozen = jax.tree.map(jax.numpy.copy, params), None
        else:
            adapted = dora_jax.wrap(
                params,
                case.rank,
                method=case.method,
                targets=jax_targets,
                dropout=case.dropout,
            )
            frozen, trainable = dora_jax.partition(adapted)
        # The frozen half is an argument: closed-over arrays would become constants.
        inner_step = training.make_train_step(
            model.apply, tx, adapted=case.method != "full", dropout=bool(case.dropout), jit=False
        )

        def step(state, frozen, tokens, key):
            t, opt, loss = inner_step(*state, frozen, {"tokens": tokens}, key)
            return (t, opt), loss

        step = jax.jit(step, donate_argnums=0)
        holder = {"state": (trainable, tx.init(trainable))}
        n = sum(x.size for x in jax.tree.leaves(trainable))
        key = jax.random.key(2)

        def run(i):
            holder["state"], loss = step(
                holder["state"], frozen, tokens, jax.random.fold_in(key, i)
            )
            loss.block_until_ready()

        def xla_memory():
            analysis = step.lower(holder["state"], frozen, tokens, key).compile()
            analysis = analysis.memory_analysis()
            return {
                "xla_temp_mb": analysis.temp_size_in_bytes / 2**20,
                "xla_args_mb": analysis.argument_size_in_bytes / 2**20,
            }

        run.xla_memory = xla_memory
        return run, n

    def device_peak_mb(self) -> float | None:
        stats = self.jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20


# --- PEFT side ---------------------------------------------------------------------------


class TorchSide:
    """``transformers.LlamaForCausalLM`` of the same configuration, and PEFT on it."""

    def __init__(self, args, tokens=None, jax_params=None):
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        transformers.logging.set_verbosity_error()
        self.torch = torch
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=8000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=True,  # as LlamaConfig.bench()
            rope_theta=1e4,
            rms_norm_eps=1e-5,
            max_position_embeddings=1024,
            use_cache=False,
        )
        self.config = config
        base = transformers.LlamaForCausalLM(config).to(torch.float32)
        if jax_params is not None:
            base.load_state_dict(_torch_state_from_flax(jax_params, 4, torch), strict=False)
        self.base = base.to(self.dev)
        if tokens is None:
            gen = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        self.tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.dev)
        self.device = (
            f"cuda:{torch.cuda.get_device_name()}"
            if self.dev.type == "cuda"
            else f"cpu, threads={torch.get_num_threads()}"
        )

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def _peft(self, method, rank, dropout):
        from peft import LoraConfig, VeraConfig, get_peft_model

        model = copy.deepcopy(self.base)
        if method in ("lora", "dora"):
            config = LoraConfig(
                r=rank,
                lora_alpha=2 * rank,
                lora_dropout=dropout,
                target_modules=list(PROJECTIONS),
                use_dora=method == "dora",
            )
        elif method == "vera":
            config = VeraConfig(r=rank, target_modules=list(PROJECTIONS), vera_dropout=dropout)
        else:
            raise ValueError(f"PEFT has no {method}")
        return get_peft_model(model, config)

    def make(self, case: Case) -> tuple[Callable[[int], None], int]:
        torch, tokens = self.torch, self.tokens
        if case.inference:
            if case.method == "base":
                model = self.base
            elif case.method == "merged":
                model = self._peft("dora", case.rank, 0.0).merge_and_unload()
            else:
                model = self._peft(case.method, case.rank, 0.0)
            model.eval()

            def run(i):  # noqa: ARG001
                with torch.inference_mode():
                    model(input_ids=tokens, use_cache=False)
                self.sync()

            return run, 0

        if case.method == "full":
            model = copy.deepcopy(self.base)
        else:
            model = self._peft(case.method, case.rank, case.dropout)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)

        def run(i):  # noqa: ARG001
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            opt.step()
            loss.item()  # waits for the device

        return run, sum(p.numel() for p in trainable)

    def logits(self, model=None):
        with self.torch.inference_mode():
            out = (model or self.base)(input_ids=self.tokens, use_cache=False).logits
        return out.float().cpu().numpy()

    def device_peak_mb(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


def _torch_state_from_flax(params, num_layers: int, torch) -> dict:
    """HF Llama state dict from dora_jax Llama params: kernels ``(in, out)`` -> ``(out, in)``."""
    import numpy as np

    t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))  # noqa: E731
    state = {
        "model.embed_tokens.weight": t(params["embed_tokens"]["embedding"]),
        "model.norm.weight": t(params["norm"]["scale"]),
    }
    for i in range(num_layers):
        layer, prefix = params[f"layers_{i}"], f"model.layers.{i}."
        for group, modules in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])):
            for name in modules:
                kernel = np.asarray(layer[group][name]["kernel"]).T
                state[f"{prefix}{group}.{name}.weight"] = t(kernel)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{prefix}{norm}.weight"] = t(layer[norm]["scale"])
    return state


# --- measuring ---------------------------------------------------------------------------


def memory_of(case: Case, args) -> dict:
    """Runs in a fresh process with one framework imported: peak RSS over three steps."""
    side = JaxSide(args) if case.framework == "jax" else TorchSide(args)
    run, _ = side.make(case)
    run(0)  # compile / warm up
    out = {}
    if hasattr(run, "xla_memory"):
        out.update(run.xla_memory())
    if case.framework == "torch" and side.dev.type == "cuda":
        side.torch.cuda.reset_peak_memory_stats()
    with _memory_module().PeakRSS() as peak:
        for i in range(1, 4):
            run(i)
    out["rss_before_steps_mb"] = peak.before_mb
    out["peak_rss_mb"] = peak.mb
    out["device_peak_mb"] = side.device_peak_mb()
    return out


class OtherLoad:
    """CPU time that other processes took while this one ran a block (Linux).

    On a small shared CPU a concurrent job slows torch's OpenMP threads several-fold (a
    descheduled thread stalls every barrier) and XLA's much less, so a step timed under load
    measures the machine's load, not the framework. ``/proc/stat`` counts every process's
    busy time; this process's own (``os.times``) is subtracted.

    Example::

        with OtherLoad() as load:
            step()
        load.cores  # other processes' busy cores, averaged over the block
    """

    available = os.path.exists("/proc/stat")

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OtherLoad:
        self.cores = 0.0
        if self.available:
            t = os.times()
            self._start = (time.perf_counter(), self._busy_s(), t.user + t.system)
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            wall0, busy0, own0 = self._start
            t = os.times()
            wall = max(time.perf_counter() - wall0, 1e-3)
            own = t.user + t.system - own0
            self.cores = max(0.0, (self._busy_s() - busy0 - own) / wall)


def wait_for_quiet(args) -> float:
    """Sleeps (at most ``--quiet-wait`` s) until other processes leave the CPU nearly idle;
    returns the seconds waited."""
    t0 = time.perf_counter()
    while OtherLoad.available and time.perf_counter() - t0 < args.quiet_wait:
        with OtherLoad() as load:
            time.sleep(0.5)
        if load.cores <= args.quiet_threshold:
            break
    return time.perf_counter() - t0


def time_all(cases: list[Case], args) -> dict:
    """Builds every case in this process, then times them in interleaved rounds.

    A batch of ``--steps`` steps counts as clean when other processes used at most
    ``--quiet-threshold`` cores meanwhile; rounds go on (up to ``--max-rounds``) for the
    cases with fewer than ``--rounds`` clean batches. Medians are over clean steps when a
    case has any, else over all of its steps (and it is marked noisy).
    """
    from tqdm import tqdm

    sides, meta = {}, {}
    if "jax" in args.frameworks:
        sides["jax"] = JaxSide(args)
        meta["jax_device"] = sides["jax"].device
    if "torch" in args.frameworks:
        import numpy as np

        jax_side = sides.get("jax")
        sides["torch"] = TorchSide(
            args,
            tokens=None if jax_side is None else np.array(jax_side.tokens),
            jax_params=None if jax_side is None else jax_side.params,
        )
        meta["torch_device"] = sides["torch"].device
        if jax_side is not None:  # same weights, same tokens: the same function
            ref = np.asarray(jax_side.model.apply({"params": jax_side.params}, jax_side.tokens))
            diff = float(np.max(np.abs(ref - sides["torch"].logits())))
            meta["max_abs_logit_diff_jax_vs_torch"] = diff
            tqdm.write(f"same model check: max |logits(jax) - logits(torch)| = {diff:.2e}")

    runs = {}
    for case in tqdm(cases, desc="build + compile + warm-up", unit="case"):
        try:
            run, n = sides[case.framework].make(case)
        except Exception as e:  # a method a framework lacks: report, keep going
            tqdm.write(f"{case.key}: not available ({type(e).__name__}: {e})")
            runs[case.key] = {"error": f"{type(e).__name__}: {e}"}
            continue
        t0 = time.perf_counter()
        run(0)
        first = time.perf_counter() - t0
        run(1)
        runs[case.key] = {
            "run": run,
            "trainable_params": n,
            "first_step_s": first,
            "clean": [],
            "noisy": [],
            "other_cores": [],
        }

    live = [c for c in cases if "run" in runs[c.key]]
    waited, step_index = 0.0, 2
    with tqdm(total=args.rounds * len(live), desc="timed rounds (clean batches)") as bar:
        for _ in range(max(args.max_rounds, args.rounds)):
            todo = [c for c in live if len(runs[c.key]["clean"]) < args.rounds * args.steps]
            if not todo:
                break
            for case in todo:
                entry = runs[case.key]
                waited += wait_for_quiet(args)
                times = []
                with OtherLoad() as load:
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        entry["run"](step_index)
                        times.append(time.perf_counter() - t0)
                        step_index += 1
                entry["other_cores"].append(load.cores)
                clean = load.cores <= args.quiet_threshold
                entry["clean" if clean else "noisy"].extend(times)
                if clean:
                    bar.update()
    meta["waited_for_quiet_s"] = waited
    results = {}
    for case in cases:
        entry = runs[case.key]
        if "error" in entry:
            results[case.key] = {"error": entry["error"]}
            continue
        times = entry["clean"] or entry["noisy"]
        results[case.key] = {
            "step_s": statistics.median(times),
            "min_step_s": min(times),
            "clean_steps": len(entry["clean"]),
            "noisy_steps": len(entry["noisy"]),
            "noisy": not entry["clean"],
            "other_cores_max": max(entry["other_cores"]),
            "trainable_params": entry["trainable_params"],
            "first_step_s": entry["first_step_s"],
        }
    return results, meta


def measure_memory(cases: list[Case], args, results: dict) -> None:
    from tqdm import tqdm

    todo = [c for c in cases if not c.inference and "error" not in results[c.key]]
    for case in tqdm(todo, desc="peak memory (one process each)", unit="case"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory", case.key]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--threads", str(args.threads)] + (["--tf32"] if args.tf32 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tqdm.write(f"{case.key}: memory run failed:\n{proc.stderr[-2000:]}")
            continue
        results[case.key].update(json.loads(proc.stdout.strip().splitlines()[-1]))


# --- reporting ---------------------------------------------------------------------------


def _reference(case: Case, cases: list[Case]) -> Case:
    """What a ratio divides by: LoRA of the same framework, rank (else the first) and dropout;
    the base forward for inference."""
    if case.inference:
        return Case(case.framework, "base", 0, 0.0, True)
    ranks = [c.rank for c in cases if c.method == "lora"]
    rank = case.rank if case.rank in ranks else min(ranks, default=0)
    return Case(case.framework, "lora", rank, case.dropout)


def _fmt(x, spec: str, missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summarise(cases, results, args, meta) -> dict:
    """Adds ratios, FLOP rates and MFU to each result."""
    cfg = {"hidden": 512, "ffn": 1408, "layers": 4, "vocab": 8000}
    for case in cases:
        res = results[case.key]
        if "error" in res:
            continue
        ref = results.get(_reference(case, cases).key, {})
        if "step_s" in ref:
            res["step_vs_ref"] = res["step_s"] / ref["step_s"]
        if "peak_rss_mb" in res and "peak_rss_mb" in ref:
            res["rss_vs_ref"] = res["peak_rss_mb"] / ref["peak_rss_mb"]
        other = "torch" if case.framework == "jax" else "jax"
        twin = results.get(dataclasses.replace(case, framework=other).key, {})
        if case.framework == "jax" and "step_s" in twin:
            res["jax_vs_peft"] = res["step_s"] / twin["step_s"]
        flops = step_flops(case, cfg, args.batch, args.seq)
        res["flops"] = flops
        res["tflops_per_s"] = flops / res["step_s"] / 1e12
        device = meta.get(f"{case.framework}_device", "")
        if device.startswith("cpu"):
            continue
        peak = _gpu_peaks.peak(device.split(":", 1)[-1])
        precision = "tf32" if args.tf32 else "fp32"
        if peak is None:
            res["peak_flops"] = None
            res["peak_flops_source"] = f"unknown GPU {device!r}: no MFU"
        else:
            res["peak_flops"] = getattr(peak, precision)
            res["peak_flops_source"] = f"{peak.gpu} {precision}, {_gpu_peaks.SOURCE}"
            res["mfu"] = res["tflops_per_s"] * 1e12 / res["peak_flops"]
    return results


def markdown(cases, results, args, meta) -> str:
    fws = [fw for fw in ("jax", "torch") if fw in args.frameworks]
    name = FRAMEWORKS
    r = lambda c: results.get(c.key, {})  # noqa: E731
    gpu = any("mfu" in v for v in results.values())
    if args.quiet_threshold < 1:
        gate = (
            f" taken while other processes used at most {args.quiet_threshold:g} cores "
            f"(waited {meta.get('waited_for_quiet_s', 0) / 60:.0f} min for that)"
        )
    else:
        gate = " under the machine's background load"
    if getattr(args, "pin", False):
        gate += f", both frameworks pinned to the same {args.threads} CPU(s)"
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; jax {meta.get('jax_version', '–')} "
        f"({meta.get('jax_device', '–')}), torch {meta.get('torch_version', '–')} "
        f"({meta.get('torch_device', '–')}), transformers "
        f"{meta.get('transformers_version', '–')}, peft {meta.get('peft_version', '–')}.",
        f"Command: `{meta['command']}`",
        "",
        f"Random Llama (hidden 512, FFN 1408, 4 layers, 8 heads / 8 KV heads, vocab 8000, tied "
        f"embeddings), batch {args.batch}x{args.seq}, fp32, all 7 projections, alpha = 2r, "
        f"AdamW lr 1e-4. Median over {args.rounds} interleaved rounds x {args.steps} steps"
        f"{gate}; "
        f"peak RSS of a separate process per configuration (framework runtime included). "
        f"x LoRA: ratio to LoRA of the same framework, rank and dropout (VeRA/DVoRA and full "
        f"fine-tuning: to LoRA r{min(args.ranks)}). jax/PEFT: dora_jax step time over PEFT's.",
        "",
        "### Training step",
        "",
    ]
    head = "| configuration |"
    rule = "|---|"
    for fw in fws:
        head += f" {name[fw]} trainable | {name[fw]} s/step | x LoRA |"
        rule += "---:|---:|---:|"
    if len(fws) == 2:
        head += " jax/PEFT |"
        rule += "---:|"
    for fw in fws:
        head += f" {name[fw]} peak RSS MiB | x LoRA |"
        rule += "---:|---:|"
    if gpu:
        head += "".join(f" {name[fw]} MFU |" for fw in fws)
        rule += "---:|" * len(fws)
    lines += [head, rule]
    seen = []
    for case in cases:
        if case.inference or (case.method, case.rank, case.dropout) in seen:
            continue
        seen.append((case.method, case.rank, case.dropout))
        row = f"| {case.label} |"
        per_fw = {fw: r(dataclasses.replace(case, framework=fw)) for fw in fws}
        for fw in fws:
            res = per_fw[fw]
            if "step_s" not in res:
                why = "no DVoRA in PEFT" if fw == "torch" and case.method == "dvora" else "n/a"
                row += f" {why} | – | – |"
                continue
            star = "*" if res.get("noisy") else ""
            row += f" {res['trainable_params']:,} | {res['step_s']:.3f}{star} |"
            row += f" {_fmt(res.get('step_vs_ref'), '.2f')} |"
        if len(fws) == 2:
            row += f" {_fmt(per_fw['jax'].get('jax_vs_peft'), '.2f')} |"
        for fw in fws:
            res = per_fw[fw]
            row += (
                f" {_fmt(res.get('peak_rss_mb'), '.0f')} | {_fmt(res.get('rss_vs_ref'), '.3f')} |"
            )
        if gpu:
            row += "".join(f" {_fmt(per_fw[fw].get('mfu'), '.1%')} |" for fw in fws)
        lines.append(row)
    if any("peak_rss_mb" in v for v in results.values()):
        lines += [
            "",
            "### Memory in detail (MiB)",
            "",
            "Resident before the timed steps (runtime, weights, compiled program), growth "
            "during them (activations, gradients, optimiser temporaries), and for dora_jax "
            "XLA's own count of the step's temporary buffers. x LoRA as above.",
            "",
        ]
        head, rule = "| configuration |", "|---|"
        for fw in fws:
            head += f" {name[fw]} before | {name[fw]} growth | x LoRA |"
            rule += "---:|---:|---:|"
        if "jax" in fws:
            head += " dora_jax XLA temp | x LoRA |"
            rule += "---:|---:|"
        lines += [head, rule]
        for key in seen:
            case = Case(fws[0], *key)
            row = f"| {case.label} |"

            def growth(c):
                res = r(c)
                if "peak_rss_mb" not in res:
                    return None, None
                return res["rss_before_steps_mb"], res["peak_rss_mb"] - res["rss_before_steps_mb"]

            for fw in fws:
                c = dataclasses.replace(case, framework=fw)
                before, grown = growth(c)
                _, ref = growth(_reference(c, cases))
                ratio = grown / ref if grown is not None and ref else None
                row += f" {_fmt(before, '.0f')} | {_fmt(grown, '.0f')} | {_fmt(ratio, '.3f')} |"
            if "jax" in fws:
                c = dataclasses.replace(case, framework="jax")
                temp, ref = r(c).get("xla_temp_mb"), r(_reference(c, cases)).get("xla_temp_mb")
                ratio = temp / ref if temp is not None and ref else None
                row += f" {_fmt(temp, '.0f')} | {_fmt(ratio, '.3f')} |"
            lines.append(row)
    lines += ["", "### Inference (forward only, no gradient)", ""]
    head, rule = "| forward |", "|---|"
    for fw in fws:
        head += f" {name[fw]} s | x base |"
        rule += "---:|---:|"
    if len(fws) == 2:
        head += " jax/PEFT |"
        rule += "---:|"
    lines += [head, rule]
    for case in cases:
        if not case.inference or case.framework != fws[0]:
            continue
        row = f"| {case.label} |"
        per_fw = {fw: r(dataclasses.replace(case, framework=fw)) for fw in fws}
        for fw in fws:
            res = per_fw[fw]
            star = "*" if res.get("noisy") else ""
            row += f" {_fmt(res.get('step_s'), '.3f')}{star} |"
            row += f" {_fmt(res.get('step_vs_ref'), '.2f')} |"
        if len(fws) == 2:
            row += f" {_fmt(per_fw['jax'].get('jax_vs_peft'), '.2f')} |"
        lines.append(row)
    if any(v.get("noisy") for v in results.values()):
        lines += [
            "",
            "\\* every batch of this configuration ran while other processes used the CPU "
            "(more than --quiet-threshold cores): its time is inflated, torch's most.",
        ]
    if "max_abs_logit_diff_jax_vs_torch" in meta:
        lines += [
            "",
            f"Same model: both frameworks load the same random weights; max |logit difference| "
            f"= {meta['max_abs_logit_diff_jax_vs_torch']:.1e}.",
        ]
    peaks = {}
    for key, v in results.items():
        if "peak_flops_source" in v:
            peaks[Case.from_key(key).framework] = (v["peak_flops"], v["peak_flops_source"])
    for fw, (flops, source) in peaks.items():
        used = "none" if flops is None else f"{flops / 1e12:g} TFLOP/s"
        lines += ["", f"MFU of {name[fw]}: analytic FLOPs / step time / peak {used} ({source})."]
    return "\n".join(lines) + "\n"


def plot(cases, results, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fws = [fw for fw in ("jax", "torch") if fw in args.frameworks]
    colours = {"jax": "#1f77b4", "torch": "#ff7f0e"}
    train = []
    for c in cases:
        if not c.inference and c.framework == fws[0]:
            train.append(c)
    if "jax" not in fws:
        train = [c for c in train if c.method != "dvora"]
    infer = [c for c in cases if c.inference and c.framework == fws[0]]
    panels = [(train, "step_s", "training step, s (median)")]
    if any("peak_rss_mb" in v for v in results.values()):
        panels.append((train, "peak_rss_mb", "peak RSS during training, MiB"))
    panels.append((infer, "step_s", "inference forward, s (median)"))
    rows = [len(group) * len(fws) + 2 for group, _, _ in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, 1.2 + 0.19 * sum(rows)),
        gridspec_kw={"height_ratios": rows},
        layout="constrained",
    )
    panels = [(ax, *panel) for ax, panel in zip(axes, panels)]
    width = 0.8 / len(fws)
    for ax, group, field, title in panels:
        ys = range(len(group))
        for k, fw in enumerate(fws):
            vals = [results.get(dataclasses.replace(c, framework=fw).key, {}) for c in group]
            xs = [v.get(field, float("nan")) for v in vals]
            pos = [y - 0.4 + width * (k + 0.5) for y in ys]
            bars = ax.barh(pos, xs, height=width, color=colours[fw], label=FRAMEWORKS[fw])
            for bar, x, v in zip(bars, xs, vals):
                if math.isnan(x):
                    continue
                ratio = v.get("step_vs_ref" if field == "step_s" else "rss_vs_ref")
                text = f"{x:.3f}" if field == "step_s" else f"{x:.0f}"
                if ratio is not None:
                    text += f" ({ratio:.2f}x)"
                ax.text(x, bar.get_y() + bar.get_height() / 2, " " + text, va="center",
                        fontsize=7)  # fmt: skip
        ax.set_yticks(list(ys), [c.label for c in group], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.18)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="upper right")
    fig.suptitle(
        f"dora_jax vs PEFT: random Llama h512/FFN1408/4 layers, batch {args.batch}x{args.seq}, "
        f"fp32 (ratios: x LoRA, or x base for inference)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions(args) -> dict:
    out = {}
    for mod in ("jax", "torch", "transformers", "peft"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid = p.add_mutually_exclusive_group()
    grid.add_argument(
        "--full", action="store_true",
        help="the whole grid: --ranks and --dropouts not given default to 8,32 and 0,0.05",
    )  # fmt: skip
    grid.add_argument(
        "--quick", action="store_true",
        help="--ranks and --dropouts not given default to 8 and 0 (the default anyway)",
    )  # fmt: skip
    p.add_argument(
        "--ranks",
        type=int_list(1),
        default=None,
        help="LoRA/DoRA ranks, comma-separated (default 8; 8,32 with --full)",
    )
    p.add_argument(
        "--dropouts",
        type=probability_list,
        default=None,
        help="comma-separated, each in [0, 1) (default 0; 0,0.05 with --full)",
    )
    p.add_argument("--vera-rank", type=at_least(0), default=256, help="VeRA/DVoRA r; 0 skips")
    p.add_argument(
        "--frameworks",
        type=names(FRAMEWORKS),
        default="jax,torch",
        help="comma-separated, of jax (dora_jax), torch (PEFT)",
    )
    p.add_argument("--batch", type=at_least(1), default=4)
    p.add_argument("--seq", type=at_least(2), default=256)
    p.add_argument("--steps", type=at_least(1), default=3, help="timed steps per round")
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--threads", type=at_least(1), default=2, help="torch.set_num_threads")
    p.add_argument("--tf32", action="store_true", help="GPU: allow TF32 matmuls")
    p.add_argument(
        "--pin",
        action="store_true",
        help="run on --threads CPUs only (Linux affinity), jax and torch alike, and time "
        "every batch: a fair comparison when other jobs keep the machine busy (use with "
        "--threads 1; then XLA:CPU's Eigen thread pool is off too)",
    )
    p.add_argument(
        "--max-rounds", type=at_least(1), default=15, help="give up on clean batches after this"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each batch, wait up to this many s for other jobs to leave the CPU",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="a batch is clean when other processes used at most this many cores",
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=None, help="output path without suffix (.json, .md, .png)")
    p.add_argument(
        "--from-json", default=None, help="rewrite .md and .png from a saved .json; no runs"
    )
    p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --full / --quick filling the grid flags the user left unset."""
    args = parser().parse_args(argv)
    grid = ([8, 32], [0.0, 0.05]) if args.full else ([8], [0.0])
    args.ranks = args.ranks if args.ranks is not None else grid[0]
    args.dropouts = args.dropouts if args.dropouts is not None else grid[1]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        path = args.from_json
        with open(path) as f:
            saved = json.load(f)
        args = argparse.Namespace(**saved["args"])
        report(cases_for(args), saved["results"], args, saved["meta"], path[: -len(".json")])
        return
    if args.pin and hasattr(os, "sched_setaffinity"):
        # Before any framework starts its thread pools; memory processes inherit it.
        cpus = sorted(os.sched_getaffinity(0))[-args.threads :]
        os.sched_setaffinity(0, cpus)
        # Both frameworks then share the same CPUs' slowdown alike: no waiting for quiet.
        args.quiet_wait, args.quiet_threshold = 0.0, float("inf")
        if args.threads == 1:
            # XLA:CPU has no flag for its intra-op pool's size; this one turns off Eigen's
            # multi-threaded matmuls. Beyond that, the affinity above is what pins XLA.
            flags = "--xla_cpu_multi_thread_eigen=false"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()

    if args._memory:
        print(json.dumps(memory_of(Case.from_key(args._memory), args)))
        return

    out = args.out or os.path.join(
        ROOT, "benchmarks", "results", "peft_compare" if args.full else "peft_compare_quick"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    cases = cases_for(args)
    t_start = time.perf_counter()
    results, meta = time_all(cases, args)
    if not args.no_memory:
        measure_memory(cases, args, results)
    meta.update(versions(args))
    meta["date"] = time.strftime("%Y-%m-%d")
    meta["machine"] = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < os.cpu_count():
        meta["machine"] += f", run on {len(os.sched_getaffinity(0))} of its cores"
    if any(not meta.get(f"{fw}_device", "cpu").startswith("cpu") for fw in args.frameworks):
        meta["machine"] += ", GPU: " + ", ".join(
            meta.get(f"{fw}_device", "") for fw in args.frameworks
        )
    meta["command"] = "python " + " ".join(
        [os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]
    )
    meta["wall_s"] = time.perf_counter() - t_start
    report(cases, results, args, meta, out)
    print(f"wrote {out}.md, .json, .png in {meta['wall_s'] / 60:.1f} min")


def report(cases, results, args, meta, out: str) -> None:
    """Ratios, then ``out``.json, .md and .png; prints the tables."""
    summarise(cases, results, args, meta)
    table = markdown(cases, results, args, meta)
    with open(out + ".md", "w") as f:
        f.write(table)
    with open(out + ".json", "w") as f:
        json.dump({"args": vars(args), "meta": meta, "results": results}, f, indent=2)
    plot(cases, results, args, out + ".png")
    print(table)


if __name__ == "__main__":
    main()
