"""The benchmark scripts' command lines: a wrong name or count is an argparse error listing
what is allowed, never a run of something else. Parsers only: no model runs."""

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@functools.cache
def script(name: str):
    """benchmarks/<name>.py as a module (its folder on sys.path, as when run as a script)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def parse(name: str, argv: list[str]):
    module = script(name)
    return (
        module.parse_args(argv)
        if hasattr(module, "parse_args")
        else module.parser().parse_args(argv)
    )


def rejected(name: str, argv: list[str], capsys) -> str:
    """argparse's message for ``argv`` (which must be rejected with exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        parse(name, argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "name, argv, listed",
    [
        ("step_time", ["--methods", "dorra"], "full,lora,dora,dora_merge,dora_exact,vera"),
        ("step_time", ["--layouts", "unscaned"], "unscanned,scanned"),
        ("step_time_layouts", ["--methods", "vera"], "lora,dora,dora_merge"),
        ("step_time_layouts", ["--models", "gemma,convnet"], "gemma,conv"),
        ("gpu", ["--frameworks", "pytorch"], "jax,torch"),
        ("gpu", ["--layouts", "scaned"], "unscanned,scanned"),
        ("gpu", ["--methods", "lora,qlora"], "full,lora,dora,vera,dvora"),
        ("gpu", ["--models", "llama"], "bench,smollm2"),
        ("peft_compare", ["--frameworks", "pytorch"], "jax,torch"),
        ("qdora_memory", ["--methods", "qdora_nf5"], "dora,qdora_nf4,qdora_int8,qdora_q4_1"),
        ("qdora_memory", ["--targets", "q,x"], "q,k,v,o,gate,up,down"),
        ("qdora_layers", ["--formats", "nf5"], "float32,nf4,int8"),
        ("commonsense_throughput", ["--tasks", "winogrande,obqa2"], "winogrande"),
    ],
)  # fmt: skip
def test_unknown_names_are_rejected_with_the_valid_ones_listed(name, argv, listed, capsys):
    err = rejected(name, argv, capsys)
    assert "choose from" in err and listed in err


@pytest.mark.parametrize(
    "name, argv",
    [
        ("step_time", ["--rounds", "0"]),
        ("step_time", ["--rounds", "-1"]),
        ("step_time", ["--steps", "0"]),
        ("step_time", ["--dropout", "1"]),
        ("step_time_layouts", ["--rounds", "0"]),
        ("step_time_layouts", ["--steps", "0"]),
        ("peft_compare", ["--rounds", "0"]),
        ("peft_compare", ["--steps", "0"]),
        ("peft_compare", ["--ranks", "0"]),
        ("peft_compare", ["--ranks", "8,x"]),
        ("peft_compare", ["--dropouts", "0,1.5"]),
        ("peft_compare", ["--full", "--quick"]),
        ("commonsense_throughput", ["--rounds", "0"]),
        ("commonsense_throughput", ["--steps", "0"]),
        ("gpu", ["--warmup", "-1"]),
        ("gpu", ["--steps", "0"]),
        ("fingerprint", ["--layers", "0"]),
        ("fingerprint", ["--layers", "-1"]),
        ("layout_overhead", ["--tokens", "4"]),
        ("layout_overhead", ["--tokens", "12"]),
        ("layout_overhead", ["--rounds", "0"]),
        ("sharding_memory", ["--rank", "0"]),
        ("qdora_memory", ["--steps", "0"]),
        ("qdora_layers", ["--layers", "2,0"]),
        ("qdora_layers", ["--layers", "two"]),
    ],
)
def test_counts_out_of_range_are_rejected(name, argv, capsys):
    assert "error:" in rejected(name, argv, capsys)


def test_valid_command_lines_parse_to_lists():
    args = parse("step_time", ["--methods", "lora,dora", "--layouts", "scanned,unscanned"])
    assert args.methods == ["lora", "dora"] and args.layouts == ["scanned", "unscanned"]
    assert parse("layout_overhead", ["--tokens", "64", "--rounds", "1"]).tokens == 64
    assert parse("gpu", ["--warmup", "0"]).warmup == 0
    assert parse("qdora_layers", ["--layers", "1,3"]).layers == [1, 3]


def test_gpu_quick_fills_only_the_sizes_not_given():
    args = parse("gpu", [])
    assert (args.batch, args.seq, args.steps, args.warmup) == (8, 1024, 20, 3)
    args = parse("gpu", ["--quick", "--batch", "4", "--steps", "5"])
    assert (args.batch, args.seq, args.steps, args.warmup) == (4, 64, 5, 1)


def test_peft_compare_full_and_quick_fill_only_the_grid_flags_not_given():
    args = parse("peft_compare", [])
    assert (args.ranks, args.dropouts) == ([8], [0.0])
    args = parse("peft_compare", ["--full", "--ranks", "16"])
    assert (args.ranks, args.dropouts) == ([16], [0.0, 0.05])
    args = parse("peft_compare", ["--quick", "--dropouts", "0.1"])
    assert (args.ranks, args.dropouts) == ([8], [0.1])


@pytest.mark.parametrize(
    "device, bf16",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", None),  # not in the table: no MFU rather than the SXM peak
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_gpu_peaks_match_whole_names(device, bf16):
    peak, source = script("gpu").peak_flops(device)
    assert peak == bf16
    assert ("no MFU" in source) == (bf16 is None)
    tf32 = script("_gpu_peaks").peak("cuda:" + device)
    assert (tf32 is None) == (bf16 is None)


def test_gpu_table_states_device_and_peak_per_row():
    gpu = script("gpu")
    args = parse("gpu", ["--quick", "--methods", "lora,dvora"])
    row = dict(framework="dora_jax", model="bench", layout="scanned", method="lora",
               step_s=0.01, n_params=1000, xla_step_mb=5.0)  # fmt: skip
    rows = [dict(row, device="NVIDIA L40S"), dict(row, device="cpu", layout="unscanned")]
    table = gpu.summarise(rows, args)
    assert rows[0]["peak_flops"] == 362e12 and "L40S bf16" in rows[0]["peak_flops_source"]
    assert rows[0]["mfu"] == pytest.approx(6 * 1000 * 2 * 64 / 0.01 / 362e12)
    assert rows[1]["peak_flops"] is None and rows[1]["mfu"] is None
    assert "ran on NVIDIA L40S; MFU peak: 362 TFLOP/s" in table
    assert "No GPU: these are CPU figures" in table
    assert "PEFT has no dvora" in table
    assert "memory MiB" in table


def test_step_time_child_failure_shows_its_stderr():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom in child'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited 3(.|\n)*boom in child"):
        script("step_time").run_child(cmd)
