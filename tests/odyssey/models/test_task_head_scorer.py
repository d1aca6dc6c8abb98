"""EHRMambaScorer: incremental risk from carried recurrent state equals re-running the whole sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odyssey.models import EHRMambaConfig, EHRMambaForTaskClassification, EHRMambaScorer

VOCAB, TASK_TYPE = 60, 8
PROMPTS = {"mortality": [24], "conditions": [27, 28, 29]}


@pytest.fixture(scope="module")
def model() -> EHRMambaForTaskClassification:
    torch.manual_seed(0)
    config = EHRMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8,
                            time_embedding_size=8, scan_backend="torch", task_names=list(PROMPTS),
                            task_outputs=[len(p) for p in PROMPTS.values()], task_prompt_ids=list(PROMPTS.values()),
                            task_token_type=TASK_TYPE)
    return EHRMambaForTaskClassification(config).eval()


def _history(length: int, prompt: list[int], seed: int) -> dict[str, np.ndarray]:
    """A prompted history: the task prompt in place of [CLS], then events with rising times and ages."""
    rng = np.random.default_rng(seed)
    times = np.concatenate([np.zeros(len(prompt)), np.cumsum(rng.exponential(3.0, length))]).astype(np.float32)
    return {
        "input_ids": np.concatenate([prompt, rng.integers(33, VOCAB, length)]),
        "token_type_ids": np.concatenate([[TASK_TYPE] * len(prompt), rng.integers(1, 8, length)]),
        "ages": (50 + times / 365.25).astype(np.float32),
        "times": times,
        "visit_orders": np.concatenate([np.zeros(len(prompt)), 1 + np.arange(length) // 7]).astype(np.int64),
        "visit_segments": np.concatenate([np.zeros(len(prompt)), 1 + (np.arange(length) // 7) % 2]).astype(np.int64),
    }


def _full_run(model, history: dict[str, np.ndarray], end: int, task_index: int, prompt: list[int]) -> np.ndarray:
    """Probabilities from the parallel model over history[:end] plus the trailing prompt."""
    columns = {k: v[:end] for k, v in history.items()}
    last = {k: columns[k][-1] for k in ("ages", "times", "visit_orders")}
    n = len(prompt)
    full = {
        "input_ids": np.concatenate([columns["input_ids"], prompt]),
        "token_type_ids": np.concatenate([columns["token_type_ids"], [TASK_TYPE] * n]),
        "ages": np.concatenate([columns["ages"], [last["ages"]] * n]),
        "times": np.concatenate([columns["times"], [last["times"]] * n]),
        "visit_orders": np.concatenate([columns["visit_orders"], [last["visit_orders"]] * n]),
        "visit_segments": np.concatenate([columns["visit_segments"], [0] * n]),
    }
    batch = {k: torch.as_tensor(v)[None].to(torch.float32 if k in ("ages", "times") else torch.long)
             for k, v in full.items()}
    with torch.no_grad():
        logits = model(**batch, task_index=torch.tensor([task_index])).logits[0, :n]
    return torch.sigmoid(logits).numpy()


@pytest.mark.parametrize("task", list(PROMPTS))
def test_incremental_updates_equal_full_reruns(model, task):
    prompt = PROMPTS[task]
    history = _history(200, prompt, seed=len(task))
    scorer = EHRMambaScorer(model, task)
    boundaries = [len(prompt) + 120, len(prompt) + 121, len(prompt) + 122, len(prompt) + 150, len(history["times"])]
    start = 0
    for end in boundaries:
        incremental = scorer.update("patient-a", {k: v[start:end] for k, v in history.items()})
        expected = _full_run(model, history, end, list(PROMPTS).index(task), prompt)
        np.testing.assert_allclose(incremental, expected, rtol=1e-5, atol=1e-7)
        start = end
    # Scoring leaves the patient's state untouched: scoring twice gives the same risk.
    np.testing.assert_array_equal(scorer.score("patient-a"), incremental)


def test_patients_are_kept_apart(model):
    scorer = EHRMambaScorer(model, "mortality")
    first, second = _history(40, [24], seed=1), _history(40, [24], seed=2)
    alone = scorer.update("a", first)
    scorer.update("b", second)
    np.testing.assert_array_equal(scorer.score("a"), alone)
    scorer.forget("a")
    assert "a" not in scorer and "b" in scorer and len(scorer) == 1
    # A forgotten patient's row is reused; the others keep theirs.
    scorer.update("c", first)
    np.testing.assert_array_equal(scorer.score("c"), alone)
    # A copied state is a branch: the copy moves on, the source stays.
    scorer.copy_patient("b", "b-what-if")
    extra = {k: v[-1:] for k, v in first.items()}
    branched = scorer.update("b-what-if", extra)
    assert not np.array_equal(branched, scorer.score("b"))
    assert scorer.seen_tokens["b-what-if"] == scorer.seen_tokens["b"] + 1


def test_the_pool_grows_and_keeps_every_patient(model):
    scorer = EHRMambaScorer(model, "mortality")
    histories = [_history(12, [24], seed=seed) for seed in range(20)]  # more patients than the first pool
    alone = [scorer.update(i, h) for i, h in enumerate(histories)]
    for i in range(20):
        np.testing.assert_allclose(scorer.score(i), alone[i], rtol=1e-6)
        np.testing.assert_allclose(alone[i], _full_run(model, histories[i], 13, 0, [24]), rtol=1e-5, atol=1e-7)


def test_a_new_patient_must_start_with_the_prompt(model):
    scorer = EHRMambaScorer(model, "mortality")
    history = _history(10, [24], seed=3)
    history["input_ids"][0] = 2  # [CLS] instead of the prompt
    with pytest.raises(ValueError, match="must start with the task prompt"):
        scorer.update("a", history)
    with pytest.raises(ValueError, match="unknown task"):
        EHRMambaScorer(model, "sepsis")


def test_many_patients_advance_together_as_each_would_alone(model):
    histories = {name: _history(60, [27, 28, 29], seed=seed) for seed, name in enumerate("abcd")}
    together, alone = EHRMambaScorer(model, "conditions"), EHRMambaScorer(model, "conditions")
    first = {name: {k: v[:30] for k, v in h.items()} for name, h in histories.items()}
    together.update_many(first)
    for name, events in first.items():
        alone.update(name, events)
    # Unequal numbers of new events: the shorter rows are padded and must not move.
    ends = {"a": 31, "b": 35, "c": 60, "d": 30}
    risks = together.update_many({name: {k: v[30: ends[name]] for k, v in histories[name].items()}
                                  for name in histories})
    for name, history in histories.items():
        expected = alone.update(name, {k: v[30: ends[name]] for k, v in history.items()})
        np.testing.assert_allclose(risks[name], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(risks[name], _full_run(model, history, ends[name], 1, [27, 28, 29]),
                                   rtol=1e-5, atol=1e-7)
        assert together.seen_tokens[name] == ends[name]


def test_trajectory_reads_the_risk_after_each_moment(model):
    history = _history(50, [24], seed=7)
    # Tokens come in groups that share a moment (a visit's events are known together).
    moments = np.repeat(np.arange(26), 2)[: len(history["input_ids"])]
    points = EHRMambaScorer(model, "mortality").trajectory(history, moments)
    ends = np.flatnonzero(np.diff(np.append(moments, -1))) + 1
    ends = ends[ends > 1]
    assert [t for t, _ in points] == [moments[e - 1] for e in ends]
    for (_, risk), end in zip(points, ends, strict=True):
        np.testing.assert_allclose(risk, _full_run(model, history, end, 0, [24]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="event times decrease"):
        EHRMambaScorer(model, "mortality").trajectory(history, moments[::-1])


def test_padded_shapes_give_the_same_risks_and_states(model):
    """The CUDA-graph path rounds rows and event counts up to powers of two with inactive padding."""
    histories = {name: _history(40, [27, 28, 29], seed=10 + seed) for seed, name in enumerate("abc")}
    exact, padded = EHRMambaScorer(model, "conditions"), EHRMambaScorer(model, "conditions")
    padded._pad_to_buckets = True
    for scorer in (exact, padded):
        scorer.update_many({name: {k: v[:20] for k, v in h.items()} for name, h in histories.items()})
    ends = {"a": 23, "b": 21, "c": 20}  # 3 rows -> 4, widest 3 events -> 4; "c" has none
    chunk = {name: {k: v[20: ends[name]] for k, v in h.items()} for name, h in histories.items()}
    want, got = exact.update_many(chunk), padded.update_many(chunk)
    for name, history in histories.items():
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(got[name], _full_run(model, history, ends[name], 1, [27, 28, 29]),
                                   rtol=1e-5, atol=1e-7)
        for mine, theirs in zip(padded.state(name).layers, exact.state(name).layers, strict=True):
            torch.testing.assert_close(mine.ssm_state, theirs.ssm_state, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(mine.conv_state, theirs.conv_state, rtol=1e-6, atol=1e-7)


def test_carried_state_equals_the_parallel_prefill(model):
    """After streamed updates the pooled state is what one parallel pass over the whole history leaves."""
    history = _history(90, [24], seed=5)
    scorer = EHRMambaScorer(model, "mortality")
    for start, end in ((0, 30), (30, 31), (31, 60), (60, 91)):
        scorer.update("a", {k: v[start:end] for k, v in history.items()})
    batch = {k: torch.as_tensor(v)[None].to(torch.float32 if k in ("ages", "times") else torch.long)
             for k, v in history.items()}
    with torch.no_grad():
        reference = model.backbone(**batch, use_cache=True).cache
    carried = scorer.state("a")
    assert carried.seen_tokens == 91 and float(carried.last_times[0]) == float(history["times"][-1])
    for mine, theirs in zip(carried.layers, reference.layers, strict=True):
        torch.testing.assert_close(mine.ssm_state, theirs.ssm_state, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.conv_state, theirs.conv_state, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_need_a_cuda_model(model):
    with pytest.raises(ValueError, match="CUDA device"):
        EHRMambaScorer(model, "mortality", cuda_graphs=True)
    assert not EHRMambaScorer(model, "mortality").cuda_graphs  # CPU: eager by default


@pytest.mark.parametrize("padded", [False, True])
def test_a_ward_packs_like_single_patients(model, padded):
    """More patients than the row-by-row packing takes: the vectorised packing gives the same risks."""
    histories = [_history(30, [24], seed=20 + seed) for seed in range(12)]
    ward, alone = EHRMambaScorer(model, "mortality"), EHRMambaScorer(model, "mortality")
    ward._pad_to_buckets = padded
    ward.update_many({p: {k: v[:20] for k, v in h.items()} for p, h in enumerate(histories)})
    for p, h in enumerate(histories):
        alone.update(p, {k: v[:20] for k, v in h.items()})
    counts = np.random.default_rng(0).integers(0, 4, len(histories))
    risks = ward.update_many({p: {k: v[20: 20 + counts[p]] for k, v in h.items()} for p, h in enumerate(histories)})
    for p, h in enumerate(histories):
        expected = alone.update(p, {k: v[20: 20 + counts[p]] for k, v in h.items()})
        np.testing.assert_allclose(risks[p], expected, rtol=1e-5, atol=1e-7)
        assert ward.seen_tokens[p] == 20 + counts[p]
    scores = ward.score_many(list(range(12)))
    for p in range(12):
        np.testing.assert_allclose(scores[p], risks[p], rtol=1e-6)


def test_packed_embedding_equals_the_embedding_layer(model):
    """The scorer's pass embeds from host-computed time deltas and clamped visit orders: same numbers."""
    from odyssey.models.scorer import _time_deltas

    rng = np.random.default_rng(4)
    rows, tokens = 3, 5
    times = np.cumsum(rng.exponential(2.0, (rows, tokens)), axis=1).astype(np.float32)
    active = np.array([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    previous = np.array([0.5, np.nan, 1.25], dtype=np.float32)
    orders = rng.integers(0, 3 * model.config.max_visit_order, (rows, tokens))
    columns = {"input_ids": rng.integers(0, VOCAB, (rows, tokens)), "token_type_ids": rng.integers(0, 8, (rows, tokens)),
               "ages": (50 + times / 365.25).astype(np.float32), "visit_segments": rng.integers(0, 3, (rows, tokens))}
    tensors = {k: torch.as_tensor(v) for k, v in columns.items()}
    with torch.no_grad():
        expected = model.backbone.embeddings(**tensors, times=torch.as_tensor(times),
                                             visit_orders=torch.as_tensor(orders), attention_mask=torch.as_tensor(active),
                                             previous_times=torch.as_tensor(previous))
        packed = model.backbone.embeddings.combine(
            tensors["input_ids"], tensors["token_type_ids"], tensors["ages"],
            torch.as_tensor(_time_deltas(times, active, previous)),
            torch.as_tensor(np.clip(orders, 0, model.config.max_visit_order - 1)), tensors["visit_segments"])
    assert torch.equal(packed, expected)
