"""The forecast overlay: futures.parquet frames, the cut line, light per-sample lanes, aggregated markers."""

import matplotlib.dates as mdates
import numpy as np
import polars as pl
import pytest
from test_timeline import artists, at, marker_count, patient_events

from odyssey.viz import plot_timeline
from odyssey.viz.timeline import FORECAST_ALPHA

CUT = at(110)


def futures_frame(samples: list[list[tuple[float, str]]], prediction_time=CUT) -> pl.DataFrame:
    """Rows as `odyssey forecast` writes them to futures.parquet (one prediction time)."""
    rows = [
        {"subject_id": 123456789, "prediction_time": prediction_time, "sample": s, "position": p, "token": token,
         "time": at(day), "token_type": "X", "visit": 1}
        for s, sample in enumerate(samples) for p, (day, token) in enumerate(sample)
    ]
    return pl.DataFrame(rows)


SAMPLES = [
    [(120, "[W_1]"), (120, "[VS]"), (120, "ICD10CM//I50.9"), (120, "NDC//00338004904"), (120, "[VE]")],
    [(150, "[M_1]"), (150, "[VS]"), (150, "ICD10CM//I50.9"), (150, "[VE]")],
    [(130, "[W_2]"), (130, "[VS]"), (130, "ICD10CM//I50.9"), (130, "ICD10PCS//0DTJ4ZZ")],
    [(140, "[W_3]"), (140, "[VS]"), (140, "ICD10CM//I50.9"), (141, "[VE]")],
]


def test_a_futures_frame_draws_like_the_list_of_samples():
    as_list = [[(at(day), token) for day, token in sample] for sample in SAMPLES]
    from_list = plot_timeline(patient_events(), forecasts=as_list)
    from_frame = plot_timeline(patient_events(), forecasts=futures_frame(SAMPLES).sample(fraction=1.0, shuffle=True,
                                                                                       seed=0))
    for index, expected in enumerate((2, 1, 2, 1)):
        assert marker_count(from_frame, f"timeline:forecast:{index}") == expected
        a = artists(from_list, f"timeline:forecast:{index}")[0].get_offsets()
        b = artists(from_frame, f"timeline:forecast:{index}")[0].get_offsets()
        assert np.allclose(a, b)
    assert from_frame.marker_counts["forecast"] == 6
    # Futures are lighter than what happened.
    assert artists(from_frame, "timeline:forecast:0")[0].get_alpha() == FORECAST_ALPHA < 1


def test_the_cut_line_sits_at_the_prediction_time_and_futures_after_it():
    timeline = plot_timeline(patient_events(), forecasts=futures_frame(SAMPLES), forecast_start=CUT)
    lines = artists(timeline, "timeline:forecast-start")
    assert lines and all(line.get_xdata()[0] == pytest.approx(mdates.date2num(CUT)) for line in lines)
    for index in range(len(SAMPLES)):
        assert artists(timeline, f"timeline:forecast:{index}")[0].get_offsets()[:, 0].min() > mdates.date2num(CUT)
    # Without a start the line is at the first future time, as before.
    default = plot_timeline(patient_events(), forecasts=futures_frame(SAMPLES))
    assert artists(default, "timeline:forecast-start")[0].get_xdata()[0] == pytest.approx(mdates.date2num(at(120)))


def test_aggregate_markers_are_sized_by_the_share_of_samples():
    timeline = plot_timeline(patient_events(), forecasts=futures_frame(SAMPLES), forecast_style="aggregate",
                             forecast_start=CUT)
    assert not artists(timeline, "timeline:forecast:0")
    (dots,) = artists(timeline, "timeline:forecast-aggregate")
    offsets, sizes = dots.get_offsets(), dots.get_sizes()
    assert len(offsets) == 3  # heart failure (4 of 4 samples), the medication (1 of 4), the procedure (1 of 4)
    ax = timeline.axes["events"]
    rows = dict(zip([t.get_text() for t in ax.get_yticklabels()], ax.get_yticks(), strict=True))
    diagnosis = int(np.argmin(np.abs(offsets[:, 1] - rows["Diagnoses"])))
    assert sizes[diagnosis] == pytest.approx(20 + 120 * 1.0)
    assert offsets[diagnosis, 0] == pytest.approx(np.median(mdates.date2num([at(d) for d in (120, 150, 130, 140)])))
    assert sorted(np.delete(sizes, diagnosis)) == pytest.approx([20 + 120 * 0.25] * 2)
    edge_alpha = dots.get_edgecolors()[:, 3]
    assert edge_alpha[diagnosis] == pytest.approx(1.0) and np.delete(edge_alpha, diagnosis).max() < 1


def test_forecast_overlay_errors():
    two_times = pl.concat([futures_frame(SAMPLES[:1]), futures_frame(SAMPLES[1:2], prediction_time=at(90))])
    with pytest.raises(ValueError, match="filter it to one prediction time"):
        plot_timeline(patient_events(), forecasts=two_times)
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_timeline(patient_events(), forecasts=futures_frame(SAMPLES).drop("token"))
    with pytest.raises(ValueError, match="forecast_style"):
        plot_timeline(patient_events(), forecasts=futures_frame(SAMPLES), forecast_style="cloud")


def test_deaths_in_futures_are_crosses_with_their_share():
    samples = [*SAMPLES[:2], [(125, "[W_2]"), (125, "[VS]"), (125, "MEDS_DEATH"), (125, "[VE]")],
               [(160, "[M_1]"), (160, "[VS]"), (160, "ICD10CM//I50.9"), (160, "MEDS_DEATH"), (170, "MEDS_DEATH")]]
    for style in ("samples", "aggregate"):
        timeline = plot_timeline(patient_events(), forecasts=futures_frame(samples), forecast_start=CUT,
                                 forecast_style=style)
        (crosses,) = artists(timeline, "timeline:forecast-death")
        assert sorted(crosses.get_offsets()[:, 0]) == pytest.approx(mdates.date2num([at(125), at(160)]))
        assert timeline.marker_counts["forecast_death"] == 2
        assert "death in 2/4 futures" in [t.get_text() for t in timeline.axes["events"].texts]
        assert timeline.marker_counts["forecast"] == 4  # deaths are not drawn on the observation line
