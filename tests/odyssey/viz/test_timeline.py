"""Patient timelines: markers per event type, lab traces, visit bands, overlays, PNG/SVG export."""

import xml.etree.ElementTree as ET
from datetime import datetime, timedelta

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import write_meds_dataset
from odyssey.tokenizer import EHRTokenizer, SpecialTokens, TokenType
from odyssey.viz import (
    load_code_descriptions,
    load_patient_events,
    plot_patient,
    plot_timeline,
    save_timeline,
    token_scores_to_events,
    visits_of,
)

SUBJECT = 123456789
OTHER_SUBJECT = 42
DAY0 = datetime(2150, 3, 1, 8, 0)
CREATININE, POTASSIUM, SODIUM = "LOINC//2160-0", "LOINC//2823-3", "LOINC//2951-2"


def at(days: float) -> datetime:
    return DAY0 + timedelta(days=days)


def row(time, code, event_type, value=None, encounter=None, unit=None, subject=SUBJECT):
    return {
        S.SUBJECT_ID: subject, S.TIME: time, S.CODE: code, S.NUMERIC_VALUE: value, S.ENCOUNTER_ID: encounter,
        S.UNIT: unit, S.EVENT_TYPE: event_type,
    }


def patient_rows() -> list[dict]:
    """Three encounters: an ambulatory visit, a 6-day admission, an emergency visit; a death afterwards."""
    rows = [
        row(None, "GENDER//female", "demographic"),
        row(datetime(2090, 1, 1), S.BIRTH_CODE, "birth"),
        # visit 1: ambulatory, encounter 1
        row(at(0), "ENCOUNTER_START//AMB", "encounter_start", encounter=1),
        row(at(0.01), "ICD10CM//I10", "condition", encounter=1),
        row(at(0.02), CREATININE, "lab", 1.1, encounter=1, unit="mg/dL"),
        row(at(0.02), POTASSIUM, "lab", 4.0, encounter=1, unit="mEq/L"),
        row(at(0.03), "RXNORM//197361", "medication", encounter=1),
        row(at(0.05), "ENCOUNTER_END//AMB", "encounter_end", encounter=1),
        # visit 2: inpatient, encounter 2, six days
        row(at(40), "ENCOUNTER_START//IMP", "encounter_start", encounter=2),
        row(at(40.1), CREATININE, "lab", 2.4, encounter=2, unit="mg/dL"),
        row(at(41), CREATININE, "lab", 1.9, encounter=2, unit="mg/dL"),
        row(at(42), CREATININE, "lab", 1.5, encounter=2, unit="mg/dL"),
        row(at(41), POTASSIUM, "lab", 5.2, encounter=2, unit="mEq/L"),
        row(at(41), SODIUM, "lab", 131.0, encounter=2, unit="mEq/L"),
        row(at(40.5), "ICD10PCS//0DTJ4ZZ", "procedure", encounter=2),
        row(at(40.6), "NDC//00338004904", "medication", encounter=2),
        row(at(41.2), "NDC//00338004904", "medication", encounter=2),
        row(at(46), "ICD10CM//I50.9", "condition", encounter=2),
        row(at(46), "ICD10CM//N18.3", "condition", encounter=2),
        row(at(46), "ENCOUNTER_END//IMP", "encounter_end", encounter=2),
        # visit 3: emergency, encounter 3
        row(at(100), "ENCOUNTER_START//EMER", "encounter_start", encounter=3),
        row(at(100.1), CREATININE, "lab", 1.7, encounter=3, unit="mg/dL"),
        row(at(100.2), "SNOMED//271737000", "observation", encounter=3),
        row(at(100.3), "ENCOUNTER_END//EMER", "encounter_end", encounter=3),
        row(at(130), S.DEATH_CODE, "death"),
    ]
    return rows


def patient_events() -> pl.DataFrame:
    return pl.DataFrame(patient_rows(), schema={
        S.SUBJECT_ID: pl.Int64, S.TIME: pl.Datetime("us"), S.CODE: pl.String, S.NUMERIC_VALUE: pl.Float32,
        S.ENCOUNTER_ID: pl.Int64, S.UNIT: pl.String, S.EVENT_TYPE: pl.String,
    })


DESCRIPTIONS = {CREATININE: "Creatinine [Mass/volume] in Serum", "ICD10CM//I50.9": "Heart failure, unspecified"}


def artists(timeline, gid):
    found = []
    for ax in timeline.figure.axes:
        found += [a for a in (*ax.collections, *ax.lines, *ax.patches) if a.get_gid() == gid]
    return found


def marker_count(timeline, gid) -> int:
    return sum(len(a.get_offsets()) for a in artists(timeline, gid))


def test_markers_traces_and_bands_per_event_type():
    timeline = plot_timeline(patient_events(), descriptions=DESCRIPTIONS, top_labs=2)
    assert marker_count(timeline, "timeline:condition") == 3
    assert marker_count(timeline, "timeline:procedure") == 1
    assert marker_count(timeline, "timeline:medication") == 3
    assert marker_count(timeline, "timeline:observation") == 1
    # Top two labs by count (creatinine 5, potassium 2) are traces; sodium goes to the "other labs" row.
    assert timeline.lab_codes == [CREATININE, POTASSIUM]
    assert marker_count(timeline, "timeline:other_lab") == 1
    (creatinine,) = artists(timeline, f"timeline:lab:{CREATININE}")
    assert list(creatinine.get_ydata()) == pytest.approx([1.1, 2.4, 1.9, 1.5, 1.7])
    assert len(artists(timeline, f"timeline:lab:{POTASSIUM}")[0].get_xdata()) == 2
    assert not artists(timeline, f"timeline:lab:{SODIUM}")
    # Readable description and unit label the creatinine panel.
    texts = [t.get_text() for t in timeline.axes[f"lab:{CREATININE}"].texts]
    assert texts == ["Creatinine [Mass/volume] in Serum (mg/dL)"]
    # One band per visit on the event panel; the admission band spans its six days.
    bands = artists(timeline, "timeline:visit")
    assert len(bands) == 3
    widths = sorted(band.get_width() for band in bands)
    assert widths[-1] == pytest.approx(6.0, rel=1e-6)
    assert len(artists(timeline, "timeline:death")) == len(timeline.figure.axes)
    assert timeline.marker_counts["visit"] == 3 and timeline.marker_counts["death"] == 1
    # The title describes the patient without identifiers.
    title = timeline.figure._suptitle.get_text()
    assert str(SUBJECT) not in title and "female" in title and "3 visits" in title and "60 y" in title


def test_legend_names_the_most_frequent_codes_in_words():
    timeline = plot_timeline(patient_events(), descriptions=DESCRIPTIONS, listed_codes=2)
    texts = [t.get_text() for t in timeline.axes["events"].get_legend().get_texts()]
    start = texts.index("Most frequent diagnoses:")
    assert texts[start + 1 : start + 3] == ["ICD10CM//I10 ×1", "Heart failure, unspecified ×1"]
    start = texts.index("Most frequent medications:")
    assert texts[start + 1 : start + 3] == ["NDC//00338004904 ×2", "RXNORM//197361 ×1"]
    quiet = plot_timeline(patient_events(), listed_codes=0)
    assert not [t for t in quiet.axes["events"].get_legend().get_texts() if "frequent" in t.get_text()]


def test_markers_sit_at_their_event_times():
    timeline = plot_timeline(patient_events())
    (conditions,) = artists(timeline, "timeline:condition")
    times = sorted(mdates.num2date(x).replace(tzinfo=None) for x in conditions.get_offsets()[:, 0])
    assert times == [at(0.01), at(46), at(46)]


def test_overlays_attribution_risk_and_forecasts():
    events = patient_events()
    attributions = {(at(46), "ICD10CM//I50.9"): 0.8, (at(40.1), CREATININE): -0.3, (at(0.03), "RXNORM//197361"): 0.1,
                    (at(41.2), "NDC//00338004904"): 0.05}
    risk = [(at(0.05), 0.1), (at(46), 0.35), (at(100.3), 0.6)]
    futures = [
        [(at(135), "[VS]"), (at(136), "ICD10CM//I50.9"), (at(137), "NDC//00338004904"), (at(138), "[VE]")],
        [(at(150), "[W_2]"), (at(151), "LOINC//2160-0_3"), (at(152), "ICD10PCS//0DTJ4ZZ")],
    ]
    timeline = plot_timeline(events, descriptions=DESCRIPTIONS, attributions=attributions, risk=risk,
                             forecasts=futures, top_labs=1)
    assert list(timeline.axes)[0] == "attribution" and list(timeline.axes)[-1] == "risk"
    (stems,) = artists(timeline, "timeline:attribution")
    heights = sorted(segment[1, 1] for segment in stems.get_segments())
    assert heights == pytest.approx(sorted(attributions.values()))
    labels = [t.get_text() for t in timeline.axes["attribution"].texts]
    assert len(labels) == 3 and "Heart failure, unspecified" in labels
    (risk_line,) = artists(timeline, "timeline:risk")
    assert list(risk_line.get_ydata()) == pytest.approx([0.1, 0.35, 0.6])
    # Special tokens are skipped; each future's codes land on their type's row, after the history.
    assert marker_count(timeline, "timeline:forecast:0") == 2
    assert marker_count(timeline, "timeline:forecast:1") == 2
    ax = timeline.axes["events"]
    rows = dict(zip([t.get_text() for t in ax.get_yticklabels()], ax.get_yticks(), strict=True))
    second = artists(timeline, "timeline:forecast:1")[0].get_offsets()
    assert np.abs(second[:, 1] - [rows["Other labs"], rows["Procedures"]]).max() < 0.5
    assert second[:, 0].min() > mdates.date2num(at(130))
    # Attributed events get bigger markers than the rest.
    (conditions,) = artists(timeline, "timeline:condition")
    assert conditions.get_sizes().max() > conditions.get_sizes().min()


def test_window_draws_only_the_events_inside_it():
    timeline = plot_timeline(patient_events(), window=(at(39), at(47)), top_labs=1)
    assert marker_count(timeline, "timeline:condition") == 2
    assert marker_count(timeline, "timeline:medication") == 2
    assert marker_count(timeline, "timeline:other_lab") == 2  # potassium and sodium of the admission
    assert len(artists(timeline, f"timeline:lab:{CREATININE}")[0].get_xdata()) == 3
    assert not artists(timeline, "timeline:death")
    assert timeline.axes["events"].get_xlim()[0] < mdates.date2num(at(39)) < mdates.date2num(at(40))
    with pytest.raises(ValueError, match="forwards"):
        plot_timeline(patient_events(), window=(at(47), at(39)))


def test_png_and_svg_are_written(tmp_path):
    open_figures = plt.get_fignums()
    timeline = plot_timeline(patient_events(), risk={at(1): 0.2, at(50): 0.4})
    assert plt.get_fignums() == open_figures  # pyplot never holds our figures (no leak over many patients)
    paths = save_timeline(timeline, tmp_path / "figs" / "patient")
    assert [p.name for p in paths] == ["patient.png", "patient.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 10_000
    svg = ET.parse(paths[1]).getroot()
    assert svg.tag.endswith("svg")
    # The SVG keeps the gids, so each medication marker is an element a reader can find.
    assert 'id="timeline:medication"' in paths[1].read_text()
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["patient.png", "patient.svg"]


def test_reads_a_meds_dataset(tmp_path):
    other = [row(at(3), "ICD10CM//E11.9", "condition", subject=OTHER_SUBJECT)]
    events = pl.concat([patient_events(), pl.DataFrame(other, schema=patient_events().schema)])
    write_meds_dataset(tmp_path, events, shards=2)
    (tmp_path / S.CODES_FILE).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"code": list(DESCRIPTIONS) + ["GENDER//female"],
                             "description": list(DESCRIPTIONS.values()) + [None]}), tmp_path / S.CODES_FILE)
    assert load_code_descriptions(tmp_path) == DESCRIPTIONS
    loaded = load_patient_events(tmp_path, SUBJECT)
    assert loaded.height == len(patient_rows()) and loaded[S.TIME][0] is None
    timeline = plot_patient(tmp_path, SUBJECT, top_labs=1)
    assert marker_count(timeline, "timeline:condition") == 3
    assert timeline.axes[f"lab:{CREATININE}"].texts[0].get_text().startswith("Creatinine [Mass/volume]")
    with pytest.raises(KeyError, match="subject 7 has no rows"):
        load_patient_events(tmp_path, 7)
    with pytest.raises(ValueError, match="one subject"):
        plot_timeline(events)
    with pytest.raises(ValueError, match="no events"):
        plot_timeline(events.head(0))


def test_core_meds_columns_are_enough():
    core = patient_events().select(S.SUBJECT_ID, S.TIME, S.CODE, S.NUMERIC_VALUE)
    timeline = plot_timeline(core, top_labs=1)
    # event types come from the vocabulary prefixes; the SNOMED row is an observation
    assert marker_count(timeline, "timeline:condition") == 3
    assert marker_count(timeline, "timeline:procedure") == 1
    assert marker_count(timeline, "timeline:medication") == 3
    assert marker_count(timeline, "timeline:observation") == 1
    assert timeline.lab_codes == [CREATININE]
    assert len(artists(timeline, "timeline:visit")) == 3  # start rows pair with their end rows
    with pytest.raises(ValueError, match="lack the MEDS columns"):
        plot_timeline(core.drop(S.CODE))


def test_visits_without_encounter_ids_pair_start_and_end():
    events = patient_events().with_columns(pl.lit(None, pl.Int64).alias(S.ENCOUNTER_ID))
    visits = visits_of(events)
    assert [(v.encounter_class, v.start, v.end) for v in visits] == [
        ("AMB", at(0), at(0.05)), ("IMP", at(40), at(46)), ("EMER", at(100), at(100.3)),
    ]


def test_token_scores_become_event_attributions():
    words = ["GENDER//female", "ICD10CM//I50.9", f"{CREATININE}_0", f"{CREATININE}_1", f"{CREATININE}_2"]
    types = [TokenType.DEMOGRAPHIC, TokenType.CONDITION, TokenType.LAB, TokenType.LAB, TokenType.LAB]
    tokenizer = EHRTokenizer(words, [int(t) for t in types], bins={CREATININE: [1.5, 2.0]})
    word = tokenizer.token_to_id
    drawn, reported = at(40.1), at(40.2)  # the creatinine of the admission, drawn then reported
    tokens = [  # (id, type, event time, score)
        (SpecialTokens.CLS, TokenType.SPECIAL, at(0), 9.0),
        (word("GENDER//female"), TokenType.DEMOGRAPHIC, at(0), 0.5),
        (SpecialTokens.W_0, TokenType.TIME_GAP, at(40), 9.0),
        (SpecialTokens.VS, TokenType.SPECIAL, at(40), 9.0),
        (word(f"{CREATININE}_2"), TokenType.LAB, reported, -0.25),
        (word("ICD10CM//I50.9"), TokenType.CONDITION, at(46), 0.5),
        (word("ICD10CM//I50.9"), TokenType.CONDITION, at(46), 0.25),  # the same event twice sums
        (SpecialTokens.UNK, TokenType.MEDICATION, at(41), 0.125),
        (SpecialTokens.MOR_1M, TokenType.TASK, at(46), 9.0),
    ]
    ids, kinds, times, scores = zip(*tokens, strict=True)
    row = {"input_ids": np.array(ids, np.int32), "token_type_ids": np.array(kinds, np.int8),
           "event_times": np.array(times, "datetime64[us]")}
    events = token_scores_to_events(row, scores, tokenizer)
    assert events == {
        (at(0), "GENDER//female"): 0.5,
        (reported, CREATININE): -0.25,
        (at(46), "ICD10CM//I50.9"): 0.75,
        (at(41), "[UNK]"): 0.125,
    }
    with pytest.raises(ValueError, match="3 scores for a row of 9 tokens"):
        token_scores_to_events(row, scores[:3], tokenizer)
    # The lab is matched by its issued time: its marker grows; unscored labs keep the base size.
    frame = patient_events().with_columns(
        pl.when((pl.col(S.CODE) == CREATININE) & (pl.col(S.TIME) == drawn)).then(pl.lit(reported))
        .otherwise(None).cast(pl.Datetime("us")).alias(S.ISSUED)
    )
    timeline = plot_timeline(frame, attributions=events, top_labs=0)
    (labs,) = artists(timeline, "timeline:other_lab")
    sizes = dict(zip(mdates.num2date(labs.get_offsets()[:, 0]), labs.get_sizes(), strict=True))
    big = [t.replace(tzinfo=None) for t, size in sizes.items() if size > sizes[min(sizes)]]
    assert big == [drawn]
