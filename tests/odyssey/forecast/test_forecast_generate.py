"""Generation: the recurrent state gives the same futures as re-reading the prefix, side inputs follow the
tokenizer's rules, masking keeps futures inside the grammar, nucleus sampling keeps the right tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from odyssey.forecast import History, Phase, SequenceRules, gap_days_table, generate, sample_top_p
from odyssey.forecast.generate import INPUT_COLUMNS
from odyssey.forecast.rules import DAYS_PER_YEAR, outcome_token_ids
from odyssey.tokenizer import SpecialTokens, TokenType, gap_token
from odyssey.tokenizer.vocab import TASK_TOKENS, TIME_GAP_TOKENS

S = SpecialTokens


def shorter(row: dict, length: int) -> dict:
    """The first `length` tokens of a row (a history that ends with the first visit's [REG])."""
    return {k: (v[:length] if isinstance(v, np.ndarray) else v) for k, v in row.items()}


def inputs(columns: dict, device="cpu") -> dict[str, torch.Tensor]:
    return {c: torch.as_tensor(np.asarray(columns[c]))[None].to(
        torch.float32 if c in ("ages", "times") else torch.long) for c in INPUT_COLUMNS}


def test_gap_days_are_the_middle_of_each_gap_tokens_range():
    table = gap_days_table()
    assert table[S.W_0] == 3.5 and table[S.W_1] == 10.5 and table[S.W_3] == 24.5
    assert table[S.M_1] == 44.0  # 28..59 whole days
    assert table[S.M_2] == 75.0 and table[S.M_12] == 363.0  # 60..89, 360..365
    assert table[S.LT] == 366.0  # open-ended: its first day
    for token, days in table.items():  # every value falls back into its own token's range
        assert gap_token(int(days)) == token
    assert set(table) == {int(t) for t in TIME_GAP_TOKENS}


def test_state_path_equals_rereading_the_prefix(tokenizer, tiny_model, row):
    """Greedy futures from one prefill + recurrent steps == re-running the whole sequence at every step."""
    rules = SequenceRules(tokenizer)
    histories = [History(row), History(shorter(row, 8))]  # two lengths share one batch of steps
    step_logits: list[torch.Tensor] = []
    futures = generate(tiny_model, histories, rules, samples=2, max_visits=2, max_tokens=24, temperature=0.0,
                       step_logits=step_logits)
    assert len(futures.tokens) == 4
    checked = 0
    for r in range(4):
        history = histories[futures.history[r]].row
        generated = futures.columns[r]
        assert len(generated["input_ids"]) >= 5
        for step in range(len(generated["input_ids"])):
            prefix = {c: np.concatenate([history[c], generated[c][:step].astype(history[c].dtype)])
                      for c in INPUT_COLUMNS}
            with torch.no_grad():
                reread = tiny_model(**inputs(prefix)).logits[0, -1]
            assert torch.allclose(step_logits[step][r], reread, atol=1e-5, rtol=0), (r, step)
            phase = rules.initial_state(*(torch.as_tensor(prefix[c][-1:]) for c in (
                "input_ids", "token_type_ids", "times", "ages", "visit_orders")), torch.tensor([True])).phase
            assert int(rules.mask(reread[None], phase).argmax()) == int(generated["input_ids"][step])
            checked += 1
    assert checked >= 20
    # The K samples of one history are K rows of one state: greedy rows agree.
    assert np.array_equal(futures.tokens[0], futures.tokens[1])


def test_side_inputs_follow_the_tokenizer_rules(tokenizer, row):
    rules = SequenceRules(tokenizer)
    state = rules.initial_state(*(torch.as_tensor(row[c][-1:]) for c in (
        "input_ids", "token_type_ids", "times", "ages", "visit_orders")), torch.tensor([True]))
    assert int(state.phase) == Phase.AFTER_REG
    start_time, start_age = float(row["times"][-1]), float(row["ages"][-1])
    ids = tokenizer.encode(["[M_2]", "[VS]", "ENCOUNTER_START//IMP", "ICD10CM//I509", "LOINC//2160-0_1", "[VE]",
                            "[REG]", "[W_0]", "[VS]", "NDC//1", "[VE]", "[REG]"])
    steps = [rules.advance(state, torch.tensor([i])) for i in ids]
    column = {c: [float(s[c][0]) for s in steps] for c in steps[0]}
    assert column["token_type_ids"] == [TokenType.TIME_GAP, TokenType.SPECIAL, TokenType.ENCOUNTER, TokenType.CONDITION,
                                        TokenType.LAB, TokenType.SPECIAL, TokenType.SPECIAL, TokenType.TIME_GAP,
                                        TokenType.SPECIAL, TokenType.MEDICATION, TokenType.SPECIAL, TokenType.SPECIAL]
    # The gap opens the next visit (3); segments alternate by visit for events, 0 for specials and gaps.
    assert column["visit_orders"] == [3] * 7 + [4] * 5
    assert column["visit_segments"] == [0, 0, 1, 1, 1, 0, 0, 0, 0, 2, 0, 0]
    m2, w0 = gap_days_table()[S.M_2], gap_days_table()[S.W_0]
    expected_days = [start_time + m2] * 7 + [start_time + m2 + w0] * 5
    assert np.allclose(column["times"], expected_days, atol=1e-4)
    assert np.allclose(column["ages"], [start_age + (d - start_time) / DAYS_PER_YEAR for d in expected_days], atol=1e-5)
    assert int(state.visits_done) == 2 and int(state.tokens_done) == 12 and int(state.phase) == Phase.AFTER_REG


def test_ages_stay_zero_without_a_birth_row(tokenizer, tiny_model, row):
    no_birth = dict(row, ages=np.zeros_like(row["ages"]))
    futures = generate(tiny_model, [History(no_birth)], SequenceRules(tokenizer), samples=3, max_visits=2,
                       max_tokens=30, generator=torch.Generator().manual_seed(1))
    assert all(np.all(c["ages"] == 0) for c in futures.columns)


def test_derived_side_inputs_match_tokenized_sequences(cohort):
    """Run the rules over real `odyssey tokenize` output: types, visit orders and segments come out the same."""
    from odyssey.tokenizer import EHRTokenizer, as_row, load_sequences

    tokenizer = EHRTokenizer.from_pretrained(cohort.seq / "tokenizer")
    rules = SequenceRules(tokenizer, allow_unknown=True)
    compared = 0
    for record in load_sequences(cohort.seq, "train").head(10).iter_rows(named=True):
        full = as_row(record)
        first_reg = int(np.flatnonzero(full["input_ids"] == S.REG)[0])
        state = rules.initial_state(*(torch.as_tensor(full[c][first_reg: first_reg + 1]) for c in (
            "input_ids", "token_type_ids", "times", "ages", "visit_orders")), torch.tensor([True]))
        for position in range(first_reg + 1, len(full["input_ids"])):
            token = int(full["input_ids"][position])
            assert bool(rules.allowed[state.phase[0], token]), (tokenizer.id_to_token(token), Phase(int(state.phase)))
            derived = rules.advance(state, torch.tensor([token]))
            if token != S.UNK:  # [UNK] keeps its event's type in the data; the vocabulary has one type for it
                assert int(derived["token_type_ids"]) == int(full["token_type_ids"][position])
            assert int(derived["visit_orders"]) == int(full["visit_orders"][position])
            assert int(derived["visit_segments"]) == int(full["visit_segments"][position])
            compared += 1
    assert compared > 500


def test_masking_never_emits_structurally_invalid_tokens(tokenizer):
    rules = SequenceRules(tokenizer)
    forbidden = [S.PAD, S.CLS, S.MASK, S.UNK, *TASK_TOKENS, tokenizer.token_to_id("GENDER//female")]
    generator = torch.Generator().manual_seed(0)
    for phase in Phase:
        logits = torch.zeros(500, tokenizer.vocab_size)
        logits[:, forbidden] = 50.0  # the model would love them
        drawn = sample_top_p(rules.mask(logits, torch.full((500,), int(phase))), 1.0, 1.0, generator)
        assert not set(drawn.tolist()) & {int(t) for t in forbidden}
        assert rules.allowed[int(phase), drawn].all()


def test_sampled_futures_follow_the_grammar(tokenizer, tiny_model, row):
    """Hot sampling from a random model: every future is (gap [VS] event+ [VE] [REG])* with no invalid token."""
    futures = generate(tiny_model, [History(row)], SequenceRules(tokenizer), samples=16, max_visits=3,
                       max_tokens=40, temperature=3.0, top_p=1.0, generator=torch.Generator().manual_seed(2))
    gaps = {int(t) for t in TIME_GAP_TOKENS}
    events = {tokenizer.token_to_id(w) for w in ("ENCOUNTER_START//AMB", "ENCOUNTER_START//IMP", "ICD10CM//I509",
                                                 "LOINC//2160-0_0", "LOINC//2160-0_1", "MEDS_DEATH", "NDC//1")}
    symbol = {**{g: "g" for g in gaps}, **{e: "e" for e in events}, S.VS: "(", S.VE: ")", S.REG: "r"}
    import re

    seen_visits = 0
    for tokens in futures.tokens:
        text = "".join(symbol[int(t)] for t in tokens)  # KeyError: a token outside the grammar
        assert re.fullmatch(r"(g\(e+\)r)*(g(\(e*(\)r?)?)?)?", text), text
        assert text.count("r") == 3 or len(tokens) == 40  # stops after V visits or the token budget
        seen_visits += text.count("r")
    assert seen_visits > 0


def test_nucleus_keeps_only_the_top_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_top_p(logits, 0.7, 1.0, generator)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 already reach 0.7
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    assert set(sample_top_p(logits, 0.5, 1.0, generator).tolist()) == {0}
    assert set(sample_top_p(logits, 1.0, 1.0, generator).tolist()) == {0, 1, 2, 3}
    assert sample_top_p(torch.tensor([[0.0, 2.0, 1.0]]), 0.9, 0.0, None).item() == 1  # greedy


def test_outcome_tokens_are_looked_up_by_code(tokenizer):
    ids = outcome_token_ids(tokenizer, "IMP")
    assert ids == {"death": tokenizer.token_to_id("MEDS_DEATH"), "admission": tokenizer.token_to_id("ENCOUNTER_START//IMP")}
    assert outcome_token_ids(tokenizer, "ICU")["admission"] is None


def test_bad_arguments(tokenizer, tiny_model, row):
    with pytest.raises(ValueError, match="at least 1"):
        generate(tiny_model, [History(row)], SequenceRules(tokenizer), samples=0, max_visits=1, max_tokens=5)
    with pytest.raises(ValueError, match="at least one visit"):
        generate(tiny_model, [History(shorter(row, 2))], SequenceRules(tokenizer), samples=1, max_visits=1, max_tokens=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_path_equals_rereading_on_cuda(tokenizer, tiny_model, row):
    """On the GPU the prefill takes the Triton scan and the steps the recurrent path: same greedy futures."""
    from odyssey.models import EHRMambaForPretraining

    config = tiny_model.config.__class__.from_dict({**tiny_model.config.to_dict(), "scan_backend": "auto"})
    model = EHRMambaForPretraining(config)
    model.load_state_dict(tiny_model.state_dict())
    model = model.cuda().eval()
    rules = SequenceRules(tokenizer, device="cuda")
    step_logits: list[torch.Tensor] = []
    futures = generate(model, [History(row)], rules, samples=2, max_visits=2, max_tokens=16, temperature=0.0,
                       step_logits=step_logits)
    generated = futures.columns[0]
    worst = 0.0
    for step in range(len(generated["input_ids"])):
        prefix = {c: np.concatenate([row[c], generated[c][:step].astype(row[c].dtype)]) for c in INPUT_COLUMNS}
        with torch.no_grad():
            reread = model(**{k: v.cuda() for k, v in inputs(prefix).items()}).logits[0, -1]
        worst = max(worst, float((step_logits[step][0] - reread).abs().max()))
    assert worst < 1e-4, worst
