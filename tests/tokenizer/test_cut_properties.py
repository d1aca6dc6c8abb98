"""Properties of cut_at / truncate / prepare_input on random histories (hypothesis)."""

from datetime import timedelta

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meds_events import admission, at, event, write_dataset

from odyssey.pipelines import schema as S
from odyssey.tokenizer import (
    EHRTokenizer,
    SpecialTokens,
    TokenizeConfig,
    cut_at,
    load_sequences,
    tokenize,
    truncate,
)

CODES = ["ICD10CM//I10", "NDC//1", "LOINC//1", "LOINC//2", "CPT//9"]


@st.composite
def histories(draw):
    rows, clock = [event(1, at(-20000), "MEDS_BIRTH"), event(1, None, "GENDER//female")], 0.0
    for encounter in range(draw(st.integers(1, 5))):
        clock += draw(st.floats(0.0, 400.0))
        length = draw(st.floats(0.01, 12.0))
        inpatient = encounter == 0 or draw(st.booleans())  # at least one visit
        if inpatient:
            rows += admission(1, encounter, at(clock), at(clock + length))
        for _ in range(draw(st.integers(0, 6))):
            offset = draw(st.floats(0.0, length))
            code = draw(st.sampled_from(CODES))
            late = draw(st.floats(0.0, 3.0)) if code.startswith("LOINC") else None
            rows.append(
                event(
                    1,
                    at(clock + offset),
                    code,
                    draw(st.floats(0, 10)) if code.startswith("LOINC") else None,
                    encounter if inpatient and draw(st.booleans()) else None,
                    issued=None if late is None else at(clock + offset + late),
                )
            )
        clock += length
    if draw(st.booleans()):
        rows.append(event(1, at(clock + 1), "MEDS_DEATH"))
    return rows, clock


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), cut_fractions=st.lists(st.floats(-0.05, 1.05), min_size=1, max_size=4))
def test_cut_and_truncate_invariants(tmp_path_factory, history, cut_fractions):
    rows, span = history
    root = tmp_path_factory.mktemp("prop")
    data = write_dataset(root / "meds", rows, {1: "train"})
    tokenize(data, root / "seq", TokenizeConfig(min_code_count=1, n_bins=2), progress=False)
    tokenizer = EHRTokenizer.from_pretrained(root / "seq" / "tokenizer")
    row = load_sequences(root / "seq").row(0, named=True)
    events = pl.read_parquet(data / "data").filter(
        pl.col(S.TIME).is_not_null() & pl.col(S.CODE).is_in(CODES + ["ENCOUNTER_START//IMP"])
    )
    events = events.with_columns(pl.max_horizontal(S.ISSUED, S.TIME).alias("known"))
    for fraction in cut_fractions:
        cutoff = at(0) + timedelta(days=fraction * (span + 3))
        cut = cut_at(row, cutoff)
        known = events.filter(pl.col("known") <= cutoff)
        if cut is None:
            assert known.height == 0
            continue
        ids = cut["input_ids"].tolist()
        assert (cut["event_times"] <= np.datetime64(cutoff, "us")).all()
        assert ids[0] == SpecialTokens.CLS and ids[-2:] == [SpecialTokens.VE, SpecialTokens.REG]
        assert ids.count(SpecialTokens.VS) == ids.count(SpecialTokens.VE) == ids.count(SpecialTokens.REG)
        words = [w.split("_")[0] if w.startswith("LOINC") else w for w in tokenizer.decode(ids)]
        assert sorted(w for w in words if not w.startswith(("[", "GENDER"))) == sorted(known[S.CODE].to_list())
        assert (np.diff(cut["times"]) >= -1e-4).all()  # a kept fact happened no later than it became known
        for max_length in (4, 7, 12, 64):
            short = truncate(cut, max_length)
            assert len(short["input_ids"]) <= max_length
            assert short["input_ids"][:2].tolist() == ids[:2]  # [CLS] and the static token stay
            assert short["input_ids"][2] == SpecialTokens.VS
            assert short["input_ids"][-1] == ids[-1]
            lengths = {len(short[k]) for k in short if k not in ("subject_id", "split")}
            assert len(lengths) == 1
