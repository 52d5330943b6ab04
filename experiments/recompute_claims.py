"""Recompute the claims of saved ``train_vera_dvora.py`` results with the current statistics.

    python experiments/recompute_claims.py experiments/results/long_cpu.json
    python experiments/recompute_claims.py experiments/results/*_cpu.json --print-only
    python experiments/recompute_claims.py experiments/results/long_cpu.json --print-only \\
        --level 0.991667   # Bonferroni over six claims: 1 - 0.05 / 6

Rewrites each file's ``claims`` and note, the claims table and note of the ``.md`` beside
it and its ``.png``; prints every claim before -> after.

- A ``results.json`` with each run's per-example lists (``correct``, ``gold_loglik``), as
  ``train_vera_dvora.py`` writes it, gives the claims exactly (``claims_of``).
- The copies shipped under ``experiments/results/`` keep only per-task means per run and
  seed. From them the estimate and the per-seed estimates ``d_s`` are exact, and so is the
  seed part of the variance, ``s^2 / n``. The example part is not stored; it is bounded by
  the interval the file shipped with (kept as ``bootstrap_ci``): that bootstrap resampled
  seeds and examples, so its variance, read as ``(width / 3.92)^2``, is at least the
  seed-resampling variance ``var(d_s) / n`` (ddof 0) plus the example variance. The new
  interval is the widest ``stats.t_interval`` over every example variance from 0 to that
  bound. The ``/ 3.92`` reading assumes a near-normal bootstrap distribution, which holds
  where examples dominate; where seeds dominate, the exact seed part decides.
- With one seed the shipped interval already covered examples only, which is what the
  current method gives for one seed (up to percentile vs t): it is kept (``--level`` does
  not apply), and the verdict becomes conditional on the seed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import train_vera_dvora as tvd
from scipy import stats as scipy_stats

from dora_jax.experiments import stats

SHIPPED_LEVEL = 0.95  # the level of every interval the shipped files hold
# Each claim's metric: the per-task mean every run keeps.
MEAN_FIELD = {"accuracy": "accuracy", "answer log-likelihood": "loglik"}


def per_seed_differences(claim, runs, tasks, seeds) -> np.ndarray:
    """``d_s``: the mean over tasks of A's per-task mean minus B's, for each seed."""
    by = {(r["method"], r["seed"]): r for r in runs}
    field = MEAN_FIELD[claim["metric"]]
    return np.array([
        np.mean([by[claim["a"], s][field][t] - by[claim["b"], s][field][t] for t in tasks])
        for s in seeds
    ])  # fmt: skip


def from_means(claim, runs, tasks, seeds, *, level: float) -> dict:
    """A claim recomputed from per-task means, its example variance bounded by the shipped
    bootstrap interval (module docstring)."""
    boot_low, boot_high = claim.get("bootstrap_ci", (claim["ci_low"], claim["ci_high"]))
    d = per_seed_differences(claim, runs, tasks, seeds)
    estimate, n = float(d.mean()), len(d)
    if n == 1:  # the shipped interval is over examples only: keep it (and its level)
        low, high, t, se_examples, se_seeds = boot_low, boot_high, None, None, None
        level = SHIPPED_LEVEL
        example_variance = "percentile bootstrap over examples, as shipped"
    else:
        z = scipy_stats.norm.ppf((1 + SHIPPED_LEVEL) / 2)
        v_boot = ((boot_high - boot_low) / (2 * z)) ** 2
        v_max = max(0.0, v_boot - float(np.var(d)) / n)
        v_seeds = float(np.var(d, ddof=1)) / n
        df_examples = claim["n_examples"] - len(tasks)
        low, high, t = max(
            (stats.t_interval(estimate, [v, v_seeds], [df_examples, n - 1], level=level)
             for v in np.linspace(0.0, v_max, 201)),
            key=lambda ci: ci[1] - ci[0],
        )  # fmt: skip
        se_examples, se_seeds = float(np.sqrt(v_max)), float(np.sqrt(v_seeds))
        example_variance = (
            "per-example scores not stored: se_examples is an upper bound read from "
            "bootstrap_ci, the interval is the widest over 0 to that bound"
        )
    return {
        "claim": claim["claim"],
        "metric": claim["metric"],
        "estimate": estimate,
        "ci_low": low,
        "ci_high": high,
        "verdict": stats.verdict(low, high, n_seeds=n),
        "n_examples": claim["n_examples"],
        "n_seeds": n,
        "seed_variance": stats.seed_variance(n),
        "per_seed": d.tolist(),
        "se_examples": se_examples,
        "se_seeds": se_seeds,
        "t": t if t is not None and np.isfinite(t) else None,
        "level": level,
        "example_variance": example_variance,
        "bootstrap_ci": [boot_low, boot_high],
        "a": claim["a"],
        "b": claim["b"],
    }


def recompute(results: dict, *, level: float) -> list[dict]:
    """The claims of one ``results.json``, exact from per-example lists when the runs hold
    them, else from per-task means (module docstring)."""
    runs, tasks, seeds = results["runs"], results["settings"]["tasks"], results["settings"]["seeds"]
    if all("correct" in r and "gold_loglik" in r for r in runs):
        return tvd.claims_of(runs, tasks, seeds, level=level)
    return [from_means(c, runs, tasks, seeds, level=level) for c in results["claims"]]


def note_for(old_note: str, claims: list[dict], exact: bool) -> str:
    n_seeds = claims[0]["n_seeds"] if claims else 1
    phrase = tvd.claims_note(n_seeds)
    if not exact:
        phrase += (
            " (recomputed by experiments/recompute_claims.py from per-task means"
            + (", example variance bounded by the shipped bootstrap interval)" if n_seeds > 1
               else ", shipped intervals kept)")
        )  # fmt: skip
    return re.sub(r"claims: paired differences, [^;]*", lambda _: phrase, old_note, count=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="results JSON files")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (0.95)")
    p.add_argument("--print-only", action="store_true", help="print, write nothing")
    args = p.parse_args(argv)
    if args.level != 0.95 and not args.print_only:
        p.error("the tables say 95%: pass --print-only with another --level")
    for path in args.results:
        results = json.loads(path.read_text())
        exact = all("correct" in r for r in results["runs"])
        old = results["claims"]
        claims = recompute(results, level=args.level)
        print(f"{path} ({'per-example lists' if exact else 'per-task means'}), "
              f"{100 * args.level:g}% intervals:")  # fmt: skip
        for before, after in zip(old, claims, strict=True):
            print(
                f"  {before['claim'].split(' (')[0]:<42} {before['metric']:<22} "
                f"{after['estimate']:+.4f} [{before['ci_low']:+.4f}, {before['ci_high']:+.4f}] "
                f"{before['verdict']} -> [{after['ci_low']:+.4f}, {after['ci_high']:+.4f}] "
                f"{after['verdict']}"
            )
        if args.print_only:
            continue
        results["claims"] = claims
        results["note"] = note_for(results["note"], claims, exact)
        path.write_text(json.dumps(results, indent=1, default=str))
        md = path.with_suffix(".md")
        if md.exists():  # method table, claims (and their line), note
            blocks = md.read_text().rstrip("\n").split("\n\n")
            md.write_text(
                "\n\n".join([blocks[0], tvd.claims_table(claims), results["note"]]) + "\n"
            )
        tasks = results["settings"]["tasks"]
        tvd.plot(results["summary"], claims, tasks, path.with_suffix(".png"), results["note"])
        print(f"  wrote {path}, {md.name}, {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
