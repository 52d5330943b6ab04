"""The experiment scripts' command lines: bad values are argparse errors before any run, and
the small helpers behind their outputs (adapter folder, plot, checkpoint steps)."""

import functools
import importlib.util
import warnings

import pytest

from tests.helpers import ROOT, run_on_devices


@functools.cache
def script(name: str):
    """``experiments/<name>.py`` as a module (nothing runs: each has a ``main`` guard)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(capsys, parse_args, argv) -> str:
    """The argparse error ``parse_args(argv)`` exits with (status 2)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- train_vera_dvora.py -----------------------------------------------------------------------

TVD_REFUSED = [
    (["--steps", "0"], "--steps 0: the first step of the warm-up has learning rate 0"),
    (["--steps", "1"], "pass --steps >= 2"),
    (["--batch", "0"], "--batch 0: pass --batch >= 1"),
    (["--seq", "1"], "pass --seq >= 2"),
    (["--rank", "0", "--methods", "lora"], "--rank 0: pass --rank >= 1"),
    (["--rank", "1", "--methods", "dora_half"], "pass --rank >= 2"),
    (["--vera-rank", "-1"], "--vera-rank -1: pass --vera-rank >= 1"),
    (["--lr", "0"], "--lr 0.0: must be a positive number"),
    (["--lr", "nan"], "--lr nan: must be a positive number"),
    (["--alpha", "-1"], "--alpha -1.0: must be a positive number"),
    (["--vera-lr", "abc"], "--vera-lr 'abc': pass a learning rate or \"search\""),
    (["--vera-lr", "-0.1"], "--vera-lr -0.1: must be a positive number"),
    (["--vera-lr-grid", ""], "--vera-lr-grid '': an empty entry"),
    (["--vera-lr-grid", "1e-2,,1"], "an empty entry"),
    (["--vera-lr-grid", "1e-2,x"], "'x' is not a number"),
    (["--vera-lr-grid", "0,1"], "--vera-lr-grid 0.0: must be a positive number"),
    (["--search-steps", "0", "--vera-lr", "1e-2"], "--search-steps 0: pass --search-steps >= 1"),
    (["--eval-batch", "0"], "--eval-batch 0: pass --eval-batch >= 1"),
    (["--eval-examples", "-1"], "--eval-examples -1: pass --eval-examples >= 0 (0 scores all)"),
    (["--dev-examples", "-5"], "--dev-examples -5: pass --dev-examples >= 0"),
    (["--dev-examples", "0"], "pass --dev-examples >= 1 or a --vera-lr number"),
    (["--dropout", "1"], "--dropout 1.0: the probability of dropping, in [0, 1)"),
    (["--dropout", "-0.1"], "in [0, 1)"),
    (["--held-out-seed", "-1"], "--held-out-seed -1: seeds are integers >= 0"),
    (["--seeds", ""], "--seeds '': an empty entry"),
    (["--seeds", "0,a"], "'a' is not an integer"),
    (["--seeds", "-1"], "--seeds -1: seeds are integers >= 0"),
    (["--seeds", "0,1,0"], "--seeds names '0' twice; list each once"),
    (["--methods", "lora,lora"], "--methods names 'lora' twice"),
    (["--methods", "LoRA"], "unknown method 'LoRA' in --methods; choose from ('base',"),
    (["--tasks", "obqa,obqa"], "--tasks names 'obqa' twice"),
    (["--tasks", "foo"], "unknown task 'foo'"),
    (["--targets", "q,q"], "--targets names 'q' twice"),
    (["--targets", ""], "--targets '': an empty entry"),
]


@pytest.mark.parametrize("argv, message", TVD_REFUSED)
def test_train_vera_dvora_refuses(capsys, argv, message):
    assert message in refused(capsys, script("train_vera_dvora").parse_args, argv)


def test_train_vera_dvora_checks_the_values_presets_and_tiny_merge(capsys):
    parse_args = script("train_vera_dvora").parse_args
    for argv in ([], ["--tiny"], ["--preset", "long"], ["--preset", "paper"],
                 ["--preset", "paper_short"], ["--tiny", "--preset", "paper"]):  # fmt: skip
        args = parse_args(argv)
        assert args.steps >= 2 and args.search_steps >= 2
    args = parse_args(["--seeds", "0, 2", "--methods", "lora,vera", "--steps", "9"])
    assert args.seeds == [0, 2] and args.methods == ["lora", "vera"] and args.search_steps == 2
    # --tiny's values are checked like given ones: its 4 steps with 1 search step each.
    err = refused(capsys, parse_args, ["--tiny", "--search-steps", "1"])
    assert "--search-steps 1: the first step of the warm-up has learning rate 0" in err


def test_train_vera_dvora_search_needs_two_steps_per_rate(capsys):
    parse_args = script("train_vera_dvora").parse_args
    # Derived from --steps // 4: say so, and how to get more.
    err = refused(capsys, parse_args, ["--steps", "7", "--methods", "vera"])
    assert "--search-steps defaults to --steps // 4 = 1" in err
    assert "pass --search-steps >= 2 or --steps >= 8" in err
    err = refused(capsys, parse_args, ["--search-steps", "1", "--methods", "lora,dvora"])
    assert "--search-steps 1:" in err and "compare untrained adapters" in err
    # No search (a fixed rate, or no VeRA/DVoRA method): one search step is not used.
    assert parse_args(["--steps", "4", "--methods", "lora,dvora", "--vera-lr", "1e-2"])
    assert parse_args(["--steps", "4", "--methods", "base,lora"]).search_steps == 1
    assert parse_args(["--steps", "7", "--search-steps", "2", "--methods", "vera"])


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for name in ("train_vera_dvora", "decomposition"):
        for out in (a_file, a_file / "below"):
            err = refused(capsys, script(name).parse_args, ["--out", str(out)])
            assert f"{a_file} is a file, not a folder; pass a folder path" in err
        assert script(name).parse_args(["--out", str(tmp_path / "new" / "folder")])


def test_seq_help_says_it_caps_the_scoring_context(capsys):
    with pytest.raises(SystemExit):
        script("train_vera_dvora").parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "training row length (tokens), and the most tokens a held-out prompt" in help_text


def test_rerun_replaces_the_adapters_folder(tmp_path, capsys):
    old = tmp_path / "adapters" / "dora-seed7" / "4"
    old.mkdir(parents=True)
    (tmp_path / "results.json").write_text("{}")
    script("train_vera_dvora").replace_adapters(tmp_path)
    assert not (tmp_path / "adapters").exists() and (tmp_path / "results.json").exists()
    assert "replacing" in capsys.readouterr().out
    script("train_vera_dvora").replace_adapters(tmp_path)  # none there: nothing to say
    assert capsys.readouterr().out == ""


def test_plot_without_claims_warns_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    rows = {"base": {"arc_e": 0.25, "mean": 0.25}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        script("train_vera_dvora").plot(rows, [], ["arc_e"], tmp_path / "r.png", "base only")
    assert (tmp_path / "r.png").stat().st_size > 0


# --- qdora_commonsense.py ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "dora,lora"], "unknown method 'lora' in --methods; choose from ('dora', "
                                     "'qdora_nf4', 'qdora_int8', 'qdora_q4_1')"),
        (["--methods", "dora,dora"], "--methods names 'dora' twice"),
        (["--steps", "1"], "--steps 1: the first step of the warm-up has learning rate 0"),
        (["--tasks", "foo"], "unknown task 'foo'"),
        (["--targets", "x"], "unknown target 'x'"),
        (["--eval-examples", "-1"], "pass --eval-examples >= 0 (0 scores all)"),
        (["--lr", "0"], "--lr 0.0: must be a positive number"),
        (["--seq", "1"], "--seq 1: pass --seq >= 2 (a prompt token and an answer token)"),
    ],
)  # fmt: skip
def test_qdora_commonsense_refuses(capsys, argv, message):
    assert message in refused(capsys, script("qdora_commonsense").parse_args, argv)


def test_qdora_commonsense_checks_json_before_the_run(capsys, tmp_path, monkeypatch):
    """--json is written after every method has trained and been scored: what would fail
    then is refused (or its folder made) before the model loads."""
    q = script("qdora_commonsense")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = refused(capsys, q.parse_args, ["--json", str(tmp_path)])
    assert f"--json {tmp_path}: a folder; pass a file path, e.g. {tmp_path / 'qdora.json'}" in err
    for path in (a_file / "r.json", a_file / "below" / "r.json"):
        err = refused(capsys, q.parse_args, ["--json", str(path)])
        assert f"{a_file} is a file, not a folder" in err
    assert q.parse_args(["--json", str(tmp_path / "new" / "r.json")]).json

    def no_model(**_):
        raise AssertionError("the model loaded before --json's folder was made")

    monkeypatch.setattr(q.smollm2, "load_smollm2", no_model)
    with pytest.raises(AssertionError, match="loaded before"):
        q.main(["--json", str(tmp_path / "new" / "r.json")])
    assert (tmp_path / "new").is_dir()

    def cannot(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(q.Path, "mkdir", cannot)
    with pytest.raises(SystemExit, match=r"--json .*r.json: cannot create its folder"):
        q.main(["--json", str(tmp_path / "other" / "r.json")])


def test_qdora_commonsense_defaults_and_adapt_refuses_unknown_method():
    q = script("qdora_commonsense")
    args = q.parse_args([])
    assert args.methods == ["dora", "qdora_nf4", "qdora_q4_1"] and args.steps >= 2
    with pytest.raises(ValueError, match="unknown method 'vera'"):
        q.adapt("vera", {}, args, {})


# --- decomposition.py --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "foo"], "unknown task 'foo' in --tasks"),
        (["--tasks", "obqa,obqa"], "--tasks names 'obqa' twice"),
        (["--methods", "vera"], "unknown method 'vera'"),
        (["--steps", "1", "--checkpoints", "1"], "--steps 1: the first step of the warm-up"),
        (["--tiny", "--steps", "1", "--checkpoints", "1"], "pass --steps >= 2"),
        (["--batch", "0"], "--batch 0: pass --batch >= 1"),
        (["--n-boot", "0"], "--n-boot 0: pass --n-boot >= 1"),
        (["--seed", "-1"], "--seed -1: pass --seed >= 0"),
        (["--steps", "3"], "--checkpoints must be between 1 and --steps"),
    ],
)
def test_decomposition_refuses(capsys, argv, message):
    assert message in refused(capsys, script("decomposition").parse_args, argv)


def test_decomposition_tiny_fills_only_what_is_not_given():
    parse_args = script("decomposition").parse_args
    args = parse_args(["--tiny", "--steps", "2", "--batch", "1", "--checkpoints", "1"])
    assert (args.steps, args.batch, args.seq, args.n_boot) == (2, 1, 64, 200)
    args = parse_args([])
    assert (args.steps, args.batch, args.seq, args.n_boot) == (48, 8, 128, 2000)
    assert parse_args(["--seq", "32"]).seq == 32


# --- train_sharded.py --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--save-every", "0"], "--save-every 0: checkpoint every N >= 1 steps"),
        (["--method", "foo"], "invalid choice: 'foo'"),
        (["--steps", "-3"], "--steps -3: pass --steps >= 1"),
        (["--steps", "0"], "--steps 0: pass --steps >= 1"),
        (["--batch", "0"], "--batch 0: pass --batch >= 1"),
        (["--rank", "0"], "--rank 0: pass --rank >= 1"),
        (["--seq", "1"], "--seq 1: pass --seq >= 2 (a token and the next one to predict)"),
        (["--lr", "-1"], "--lr -1.0: must be a positive number"),
        (["--lr", "0"], "--lr 0.0: must be a positive number"),
        (["--lr", "nan"], "--lr nan: must be a positive number"),
        (["--step-sleep", "-1"], "--step-sleep -1.0: pass seconds >= 0"),
        (["--num-processes", "0"], "--num-processes 0: pass --num-processes >= 1"),
        (["--process-id", "-1"], "--process-id -1: pass --process-id >= 0"),
        (["--num-processes", "2", "--process-id", "2"],
         "--process-id 2: processes are numbered 0 to --num-processes - 1 = 1"),
    ],
)  # fmt: skip
def test_train_sharded_refuses(capsys, argv, message):
    assert message in refused(capsys, script("train_sharded").parse_args, argv)


def test_train_sharded_checks_out_mesh_and_batch_before_training(capsys, tmp_path):
    ts = script("train_sharded")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = refused(capsys, ts.parse_args, ["--out", str(a_file / "run")])
    assert f"{a_file} is a file, not a folder" in err
    args = ts.parse_args(["--out", str(tmp_path / "new" / "run"), "--steps", "1"])
    assert (args.steps, args.lr, args.rank) == (1, 1e-2, 4)
    with pytest.raises(SystemExit, match=r"--mesh 'foo=2': bad mesh 'foo=2'"):
        ts.main(["--mesh", "foo=2"])
    # The batch is split over data x fsdp: one that does not divide is refused up front.
    code = (
        "from tests.helpers import train_sharded\n"
        "train_sharded().main(['--mesh', 'fsdp=2', '--batch', '3', '--steps', '1'])"
    )
    run = run_on_devices(code, 2, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "--batch 3 must divide by the mesh's data x fsdp = 2; pass a multiple of 2." in (
        run.stderr
    )


def test_train_sharded_saves_the_last_step():
    save_step = script("train_sharded").save_step
    assert [i + 1 for i in range(7) if save_step(i, 7, 5)] == [5, 7]
    assert [i + 1 for i in range(8) if save_step(i, 8, 2)] == [2, 4, 6, 8]
    assert [i + 1 for i in range(3) if save_step(i, 3, 1)] == [1, 2, 3]


def test_train_sharded_run_ends_with_its_final_state_saved(tmp_path, capsys):
    from dora_jax import checkpoint

    argv = ["--steps", "3", "--save-every", "2", "--batch", "2", "--seq", "8"]
    script("train_sharded").main([*argv, "--ckpt", str(tmp_path)])
    steps = checkpoint.manager(tmp_path, read_only=True).all_steps()
    assert sorted(steps) == [2, 3]
    assert "step 3 loss" in capsys.readouterr().out
