"""LoRA vs DoRA on one GPU, bf16: step time, memory and MFU, dora_jax and PEFT side by side.

Meant for a machine with one NVIDIA GPU (runs in about 5 minutes on an H100/H200); on a
CPU it runs too, slowly, with ``--quick``. Models: the bench Llama (``LlamaConfig.bench()``)
and the SmolLM2-135M architecture, both with random weights (step time and memory do not
depend on the values), bf16 weights and activations, adapters in float32 (dora_jax's
``wrap`` default; PEFT's ``autocast_adapter_dtype`` default), all 7 projections, AdamW.

    python benchmarks/gpu.py                      # writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu.py --quick --out /tmp/gpu
    python benchmarks/gpu.py --methods lora,vera,dvora --frameworks jax,torch

Methods: ``full``, ``lora``, ``dora``, ``vera``, ``dvora`` (rank ``--rank`` for all). PEFT's
side runs LoRA / DoRA with ``LoraConfig`` and VeRA with ``VeraConfig`` (``r`` as dora_jax's,
shared Kaiming-uniform ``A``/``B`` sized by the largest projection, ``d`` 0.1, ``b`` 0, float32
adapters, as dora_jax's ``wrap``); PEFT has no DVoRA, so that method has dora_jax rows only.

Each (framework, model, layout) runs in its own process, so one framework's allocator
never holds memory while the other measures. dora_jax's memory is XLA's accounting of
the compiled step (temporaries + arguments + outputs - aliased); PEFT's is
``torch.cuda.max_memory_allocated`` during its steps (both in MiB, 2**20 bytes, although the
JSON keys say ``mb``). MFU is ``6 N tokens / step time / peak`` with ``N`` all parameters of
the base model and the peak the GPU's dense bf16 rate from NVIDIA's data sheet (no sparsity;
benchmarks/_gpu_peaks.py, matched by exact device name: an L40S is not an L4, an H100 PCIe
not an H100 SXM): the conventional figure, although an adapter step does about two thirds
of full fine-tuning's matmul work (no weight gradients of the frozen base). Each row states
the peak it used (``peak_flops``, ``peak_flops_source``); a GPU not in that table gets no
MFU, and neither does a CPU. Without a GPU the script warns and measures the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _gpu_peaks
from _cli import at_least, names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# transformers' module names of the Llama projections (PEFT's target_modules); the jax side
# takes its targets from dora_jax.models.llama.projection_regex.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, WEIGHT_DECAY = 1e-4, 0.01
METHODS = ("full", "lora", "dora", "vera", "dvora")
FRAMEWORKS = ("jax", "torch")
LAYOUTS = ("unscanned", "scanned")
NO_PEFT = ("dvora",)  # methods PEFT lacks: dora_jax rows only
# Values of the size flags the user leaves unset: (default, with --quick).
SIZES = {"batch": (8, 2), "seq": (1024, 64), "steps": (20, 2), "warmup": (3, 1)}
MODELS = {
    "bench": dict(
        vocab=8000, hidden=512, ffn=1408, layers=4, heads=8, kv_heads=8, theta=1e4
    ),
    "smollm2": dict(
        vocab=49152, hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, theta=1e5
    ),
}  # fmt: skip


def peak_flops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s of the device, where it comes from); ``None`` when unknown."""
    if device_name.lower() == "cpu":
        return None, "CPU: no MFU"
    peak = _gpu_peaks.peak(device_name)
    if peak is None:
        return None, f"{device_name} is not in benchmarks/_gpu_peaks.py: no MFU"
    return peak.bf16, f"{peak.gpu} bf16, {_gpu_peaks.SOURCE}"


# --- dora_jax ------------------------------------------------------------------------------


def jax_worker(model_name: str, scanned: bool, args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    import dora_jax
    from dora_jax.experiments import training
    from dora_jax.models.llama import Llama, LlamaConfig, projection_regex

    m = MODELS[model_name]
    cfg = LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["ffn"],
        num_layers=m["layers"], num_heads=m["heads"], num_kv_heads=m["kv_heads"],
        rope_theta=m["theta"], tie_embeddings=True, max_seq_len=max(args.seq, 1024),
        scan_layers=scanned,
    )  # fmt: skip
    bf16 = jnp.bfloat16
    model = Llama(cfg, dtype=bf16, param_dtype=bf16)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    device = jax.devices()[0]
    rows = []
    for method in args.methods:
        tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
        if method == "full":
            trainable, frozen = jax.tree.map(jnp.copy, params), None
        else:
            # A scanned stack's kernels are (layers, in, out): one stack axis.
            axes = {"layers/": dora_jax.Axes(1, 1)} if scanned else None
            adapted = dora_jax.wrap(
                params, args.rank, method=method, targets=projection_regex(), axes=axes
            )
            frozen, trainable = dora_jax.partition(adapted)
        inner_step = training.make_train_step(model.apply, tx, adapted=method != "full",
                                              jit=False)  # fmt: skip

        def step(state, frozen, tokens, inner_step=inner_step):
            t, opt, loss = inner_step(*state, frozen, {"tokens": tokens}, None)
            return (t, opt), loss

        state = (trainable, tx.init(trainable))
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, tokens).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        xla_mb = (
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        ) / 2**20  # fmt: skip
        for _ in range(args.warmup):
            state, loss = compiled(state, frozen, tokens)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, loss = compiled(state, frozen, tokens)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        rows.append(
            dict(
                framework="dora_jax",
                model=model_name,
                layout="scanned" if scanned else "unscanned",
                method=method,
                step_s=statistics.median(times),
                xla_step_mb=xla_mb,
                xla_temp_mb=mem.temp_size_in_bytes / 2**20,
                compile_s=compile_s,
                loss=float(loss),
                n_params=n_params,
                device=device.device_kind,
                jax_version=jax.__version__,
            )  # fmt: skip
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del state, compiled
    return rows


# --- PEFT ----------------------------------------------------------------------------------


def torch_worker(model_name: str, args) -> list[dict]:
    import copy

    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = MODELS[model_name]
    config = transformers.LlamaConfig(
        vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["ffn"],
        num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], rope_theta=m["theta"], tie_word_embeddings=True,
        max_position_embeddings=max(args.seq, 1024), use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(torch.bfloat16).to(dev)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for method in args.methods:
        if method in NO_PEFT:
            continue
        if method == "full":
            model = copy.deepcopy(base)
        elif method == "vera":
            # As dora_jax's VeRA: r, shared A/B (Kaiming-uniform, largest shape), d 0.1, b 0.
            vera = peft.VeraConfig(
                r=args.rank, target_modules=list(PROJECTIONS), d_initial=0.1,
                projection_prng_key=0,
            )  # fmt: skip
            model = peft.get_peft_model(copy.deepcopy(base), vera)
        else:
            lora = peft.LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=list(PROJECTIONS),
                use_dora=method == "dora",
            )  # fmt: skip
            model = peft.get_peft_model(copy.deepcopy(base), lora)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        def run(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            loss.backward()
            opt.step()
            return loss

        for _ in range(args.warmup):
            loss = run()
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = run()
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        rows.append(
            dict(
                framework="PEFT",
                model=model_name,
                layout="unscanned",
                method=method,
                step_s=statistics.median(times),
                torch_peak_mb=peak,
                loss=float(loss),
                n_params=n_params,
                device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                torch_version=torch.__version__,
                peft_version=peft.__version__,
            )  # fmt: skip
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


# --- orchestration -------------------------------------------------------------------------


def jobs(args) -> list[tuple[str, str, str]]:
    out = []
    for model_name in args.models:
        for layout in args.layouts:
            if "jax" in args.frameworks:
                out.append(("jax", model_name, layout))
        if "torch" in args.frameworks:
            out.append(("torch", model_name, "unscanned"))
    return out


def summarise(rows: list[dict], args) -> str:
    """Adds throughput, MFU and ratios to each row; returns the Markdown."""
    for r in rows:
        peak, source = peak_flops(r["device"])
        tokens = args.batch * args.seq
        r["tokens_per_s"] = tokens / r["step_s"]
        r["peak_flops"], r["peak_flops_source"] = peak, source
        r["mfu"] = None if peak is None else 6 * r["n_params"] * tokens / r["step_s"] / peak
        ref = next(
            (
                q for q in rows
                if (q["framework"], q["model"], q["layout"], q["method"])
                == (r["framework"], r["model"], r["layout"], "lora")
            ),
            None,
        )  # fmt: skip
        if ref is not None:
            r["time_vs_lora"] = r["step_s"] / ref["step_s"]
            key = "xla_step_mb" if r["framework"] == "dora_jax" else "torch_peak_mb"
            if r.get(key) and ref.get(key):
                r["memory_vs_lora"] = r[key] / ref[key]
        twin = next(
            (
                q for q in rows
                if q["framework"] != r["framework"] and q["framework"] == "PEFT"
                and (q["model"], q["method"]) == (r["model"], r["method"])
            ),
            None,
        )  # fmt: skip
        if twin is not None:
            r["time_vs_peft"] = r["step_s"] / twin["step_s"]
    f = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    lines = []
    for framework, device in dict.fromkeys((r["framework"], r["device"]) for r in rows):
        peak, source = peak_flops(device)
        used = "–" if peak is None else f"{peak / 1e12:g} TFLOP/s"
        lines.append(f"{framework} ran on {device}; MFU peak: {used} ({source}).  ")
    if any(r["device"].lower() == "cpu" for r in rows):
        lines.append("**No GPU: these are CPU figures.**  ")
    if any(m in NO_PEFT for m in args.methods) and "torch" in args.frameworks:
        lines.append(f"PEFT has no {', '.join(NO_PEFT)}: no PEFT rows for it.  ")
    lines += [
        "",
        "| framework | model | layout | method | step ms | x LoRA | tokens/s | MFU | "
        "memory MiB | x LoRA | vs PEFT |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = r.get("xla_step_mb") or r.get("torch_peak_mb")
        lines.append(
            f"| {r['framework']} | {r['model']} | {r['layout']} | {r['method']} | "
            f"{r['step_s'] * 1e3:.1f} | {f(r.get('time_vs_lora'), '.2f')} | "
            f"{r['tokens_per_s']:,.0f} | {f(r['mfu'], '.1%')} | {f(mem, '.0f')} | "
            f"{f(r.get('memory_vs_lora'), '.2f')} | {f(r.get('time_vs_peft'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", type=names(MODELS), default="bench,smollm2",
        help=f"comma-separated, of {','.join(MODELS)}",
    )  # fmt: skip
    p.add_argument(
        "--layouts", type=names(LAYOUTS), default="unscanned,scanned",
        help=f"dora_jax layouts, comma-separated, of {','.join(LAYOUTS)} (PEFT: unscanned)",
    )  # fmt: skip
    p.add_argument(
        "--frameworks", type=names(FRAMEWORKS), default="jax,torch",
        help="comma-separated, of jax (dora_jax), torch (PEFT)",
    )  # fmt: skip
    p.add_argument(
        "--methods", type=names(METHODS), default="full,lora,dora",
        help=f"comma-separated, of {','.join(METHODS)} (PEFT has no dvora)",
    )  # fmt: skip
    p.add_argument("--rank", type=at_least(1), default=16)
    for name, (default, quick) in SIZES.items():
        p.add_argument(
            f"--{name}", type=at_least(0 if name == "warmup" else 1), default=None,
            help=f"default {default}; {quick} with --quick",
        )  # fmt: skip
    p.add_argument(
        "--quick", action="store_true",
        help="tiny batch, few steps (CPU check): fills the size flags not given",
    )  # fmt: skip
    p.add_argument("--budget-s", type=float, default=420.0, help="skip jobs after this")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, the size flags left unset filled (from --quick's values if given)."""
    args = parser().parse_args(argv)
    for name, (default, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    if args._job:
        fw, model_name, layout = args._job.split(":")
        if fw == "jax":
            rows = jax_worker(model_name, layout == "scanned", args)
        else:
            rows = torch_worker(model_name, args)
        print(json.dumps(rows))
        return

    if "torch" in args.frameworks:
        for method in NO_PEFT:
            if method in args.methods:
                print(f"note: PEFT has no {method}: its rows are dora_jax only", flush=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows, errors, failed, t_start = [], [], [], time.perf_counter()
    for job in jobs(args):
        if time.perf_counter() - t_start > args.budget_s:
            errors.append(f"{':'.join(job)}: skipped (over --budget-s)")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_job", ":".join(job)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"{':'.join(job)}: {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            errors.append(f"{':'.join(job)}: exit {proc.returncode}: {proc.stderr[-1500:]}")
            failed.append(errors[-1])
            print(errors[-1], flush=True)
            continue
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    table = summarise(rows, args)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), command="python benchmarks/gpu.py " + " ".join(argv),
        batch=args.batch, seq=args.seq, rank=args.rank, steps=args.steps, warmup=args.warmup,
        devices=sorted({r["device"] for r in rows}), peak_source=_gpu_peaks.SOURCE,
        no_peft=[m for m in args.methods if m in NO_PEFT and "torch" in args.frameworks],
        wall_s=time.perf_counter() - t_start, errors=errors,
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(table)
    print(table)
    cpu = sorted({r["framework"] for r in rows if r["device"].lower() == "cpu"})
    if cpu:
        print(
            f"WARNING: no GPU found: {' and '.join(cpu)} ran on the CPU. These are CPU figures, "
            "not GPU ones, and no MFU is computed.",
            file=sys.stderr,
        )
    for e in errors:
        print("ERROR", e)
    if failed or not rows:
        sys.exit(f"{len(failed)} job(s) failed" if failed else "no rows measured")


if __name__ == "__main__":
    main()
