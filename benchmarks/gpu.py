"""LoRA vs DoRA on one GPU, bf16: step time, memory and MFU, dora_jax and PEFT side by side.

Meant for a machine with one NVIDIA GPU (runs in about 5 minutes on an H100/H200); on a
CPU it runs too, slowly, with ``--quick``. Models: the bench Llama (``LlamaConfig.bench()``)
and the SmolLM2-135M architecture, both with random weights (step time and memory do not
depend on the values), bf16 weights and activations, adapters in float32 (dora_jax's
``wrap`` default; PEFT's ``autocast_adapter_dtype`` default), all 7 projections, AdamW.

    python benchmarks/gpu.py                      # writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu.py --quick --out /tmp/gpu

Each (framework, model, layout) runs in its own process, so one framework's allocator
never holds memory while the other measures. dora_jax's memory is XLA's accounting of
the compiled step (temporaries + arguments + outputs - aliased); PEFT's is
``torch.cuda.max_memory_allocated`` during its steps. MFU is ``6 N tokens / step time /
peak`` with ``N`` all parameters of the base model and the peak of ``PEAK_BF16`` (dense
bf16, no sparsity): the conventional figure, although an adapter step does about two
thirds of full fine-tuning's matmul work (no weight gradients of the frozen base).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# transformers' module names of the Llama projections (PEFT's target_modules); the jax side
# takes its targets from dora_jax.models.llama.projection_regex.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR, WEIGHT_DECAY = 1e-4, 0.01
# Dense bf16 peak FLOP/s (NVIDIA data sheets, SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
MODELS = {
    "bench": dict(
        vocab=8000, hidden=512, ffn=1408, layers=4, heads=8, kv_heads=8, theta=1e4
    ),
    "smollm2": dict(
        vocab=49152, hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, theta=1e5
    ),
}  # fmt: skip


def peak_flops(device_name: str) -> float | None:
    return next((p for name, p in PEAK_BF16.items() if name in device_name), None)


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
        loss.block_until_ready()
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
        if method == "full":
            model = copy.deepcopy(base)
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
    for r in rows:
        peak = peak_flops(r["device"])
        tokens = args.batch * args.seq
        r["tokens_per_s"] = tokens / r["step_s"]
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
    lines = [
        "| framework | model | layout | method | step ms | x LoRA | tokens/s | MFU | "
        "memory MB | x LoRA | vs PEFT |",
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bench,smollm2")
    p.add_argument("--layouts", default="unscanned,scanned", help="dora_jax layouts")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--methods", default="full,lora,dora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny batch, few steps (CPU check)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip jobs after this")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
    args.models, args.layouts = args.models.split(","), args.layouts.split(",")
    args.frameworks, args.methods = args.frameworks.split(","), args.methods.split(",")

    if args._job:
        fw, model_name, layout = args._job.split(":")
        if fw == "jax":
            rows = jax_worker(model_name, layout == "scanned", args)
        else:
            rows = torch_worker(model_name, args)
        print(json.dumps(rows))
        return

    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    rows, errors, t_start = [], [], time.perf_counter()
    for job in jobs(args):
        if time.perf_counter() - t_start > args.budget_s:
            errors.append(f"{':'.join(job)}: skipped (over --budget-s)")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_job", ":".join(job)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"{':'.join(job)}: {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            errors.append(f"{':'.join(job)}: exit {proc.returncode}: {proc.stderr[-1500:]}")
            print(errors[-1], flush=True)
            continue
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    table = summarise(rows, args)
    meta = dict(
        date=time.strftime("%Y-%m-%d"), command="python benchmarks/gpu.py " + " ".join(
            sys.argv[1:]), batch=args.batch, seq=args.seq, rank=args.rank,
        peak_bf16=PEAK_BF16, wall_s=time.perf_counter() - t_start, errors=errors,
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(table)
    print(table)
    for e in errors:
        print("ERROR", e)


if __name__ == "__main__":
    main()
