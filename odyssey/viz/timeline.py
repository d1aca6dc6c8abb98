"""One patient's MEDS events over time (matplotlib).

Figures are plain `matplotlib.figure.Figure` objects, never registered with pyplot: nothing opens a
window or changes the global backend, they render with Agg when saved, plotting thousands of patients
leaks nothing, and a notebook shows one with `display(timeline.figure)`.

Rows of the figure, sharing the time axis:
- an optional attribution strip (one stem per scored event, red raises the output, blue lowers it,
  the strongest few labelled in words);
- the event row: diagnoses, procedures, medications, other labs and observations as markers, each
  type on its own line, sampled forecast futures as light hollow markers after the cut line (one lane
  per sample, or one marker per code sized by the share of samples holding it);
- value traces of the most frequent labs (one small panel each, labelled with description and unit);
- an optional risk-over-time panel.
Visits are shaded bands on every panel (colour by encounter class); a death is a black line.

Every drawn element carries a `gid` ("timeline:<what>") so tests and callers can find it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zlib import crc32

import matplotlib.dates as mdates
import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import infer_event_type
from odyssey.viz.events import describe, event_types_of

T = S.EventType
EventKey = tuple[datetime, str]  # (time, code) of a MEDS row
TimeCode = tuple[datetime, str]

# Event-row lines, top to bottom: (event type, label, marker, colour).
MARKER_ROWS: tuple[tuple[str, str, str, str], ...] = (
    (T.CONDITION.value, "Diagnoses", "D", "tab:red"),
    (T.PROCEDURE.value, "Procedures", "s", "tab:purple"),
    (T.MEDICATION.value, "Medications", "^", "tab:green"),
    ("other_lab", "Other labs", "|", "0.35"),
    (T.OBSERVATION.value, "Observations", "o", "tab:brown"),
)
ALWAYS_SHOWN = (T.CONDITION.value, T.PROCEDURE.value, T.MEDICATION.value)
LISTED_ROWS = ALWAYS_SHOWN  # types whose most frequent codes the legend names in words
LISTED_CHARS = 32  # description length that fits the legend column
NUMERIC_TYPES = (T.LAB.value, T.VITAL.value)
VISIT_COLOURS = {"IMP": "tab:blue", "EMER": "tab:orange", "AMB": "tab:green", "OBSENC": "tab:olive"}
OTHER_VISIT_COLOUR = "tab:gray"
MIN_BAND_FRACTION = 0.004  # a visit of a few hours in a decade-long history still shows as a band
JITTER = 0.28  # spread of distinct codes around their row, so simultaneous events stay apart
LABELLED_ATTRIBUTIONS = 3
FORECAST_COLOURS = ("tab:cyan", "tab:pink", "tab:olive", "tab:gray", "tab:blue")
FORECAST_ALPHA = 0.6  # futures are drawn lighter than what happened
FORECAST_STYLES = ("samples", "aggregate")
# Columns of `odyssey forecast`'s futures.parquet that the overlay reads.
FUTURE_SAMPLE, FUTURE_TIME, FUTURE_TOKEN, FUTURE_POSITION = "sample", "time", "token", "position"
FUTURE_KEYS = (S.SUBJECT_ID, "prediction_time")


@dataclass
class PatientTimeline:
    """The figure, its panels by name, and how many markers each event type got."""

    figure: Figure
    axes: dict[str, Axes]
    marker_counts: dict[str, int] = field(default_factory=dict)
    lab_codes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Visit:
    start: datetime
    end: datetime
    encounter_class: str


def _class_of(code: str) -> str:
    return code.split(S.CODE_SEPARATOR, 1)[1] if S.CODE_SEPARATOR in code else code


def visits_of(events: pl.DataFrame) -> list[Visit]:
    """Encounters as (start, end, class): per encounter_id from its start/end rows and its events' times;
    an encounter start without an id runs to the next end row of its class."""
    timed = events.filter(pl.col(S.TIME).is_not_null())
    visits: list[Visit] = []
    with_id = timed.filter(pl.col(S.ENCOUNTER_ID).is_not_null())
    if with_id.height:
        starts = with_id.filter(pl.col(S.EVENT_TYPE) == T.ENCOUNTER_START.value)
        classes = dict(zip(starts[S.ENCOUNTER_ID].to_list(), starts[S.CODE].map_elements(
            _class_of, return_dtype=pl.String).to_list(), strict=True))
        spans = with_id.group_by(S.ENCOUNTER_ID).agg(
            pl.col(S.TIME).min().alias("start"), pl.col(S.TIME).max().alias("end")
        ).sort("start")
        for encounter, start, end in spans.iter_rows():
            visits.append(Visit(start, end, classes.get(encounter, "other")))
    loose = timed.filter(pl.col(S.ENCOUNTER_ID).is_null())
    loose_starts = loose.filter(pl.col(S.EVENT_TYPE) == T.ENCOUNTER_START.value)
    loose_ends = loose.filter(pl.col(S.EVENT_TYPE) == T.ENCOUNTER_END.value)
    for start, code in loose_starts.select(S.TIME, S.CODE).iter_rows():
        later = loose_ends.filter((pl.col(S.TIME) >= start) & (pl.col(S.CODE).str.ends_with(_class_of(code))))
        end = later[S.TIME].min() if later.height else start
        visits.append(Visit(start, end, _class_of(code)))
    return sorted(visits, key=lambda v: v.start)


def _with_odyssey_columns(events: pl.DataFrame) -> pl.DataFrame:
    """Core-MEDS frames (subject_id, time, code, numeric_value) get Odyssey's optional columns as nulls
    and `event_type` from the code's vocabulary prefix."""
    missing = [name for name in (S.SUBJECT_ID, S.TIME, S.CODE) if name not in events.columns]
    if missing:
        raise ValueError(f"events lack the MEDS columns {missing}")
    extra = {S.NUMERIC_VALUE: pl.Float32, S.ENCOUNTER_ID: pl.Int64, S.UNIT: pl.String}
    events = events.with_columns(
        [pl.lit(None, dtype).alias(name) for name, dtype in extra.items() if name not in events.columns]
    )
    if S.EVENT_TYPE not in events.columns:
        events = events.with_columns(infer_event_type(pl.col(S.CODE)).alias(S.EVENT_TYPE))
    return events


def _num(times) -> np.ndarray:
    """datetimes (list, Series or array) -> matplotlib date numbers."""
    values = np.asarray(times.to_numpy() if isinstance(times, pl.Series) else times, dtype="datetime64[us]")
    return mdates.date2num(values)


def _jitter(code: str) -> float:
    # Stable per code (crc32, not hash(): Python salts str hashes per process).
    return ((crc32(code.encode()) % 1000) / 999 - 0.5) * JITTER


def _top_labs(events: pl.DataFrame, count: int) -> list[str]:
    numeric = events.filter(
        pl.col(S.EVENT_TYPE).is_in(NUMERIC_TYPES) & pl.col(S.NUMERIC_VALUE).is_not_null()
        & pl.col(S.TIME).is_not_null()
    )
    ranked = numeric.group_by(S.CODE).len().sort(["len", S.CODE], descending=[True, False])
    return ranked[S.CODE].head(count).to_list()


def _row_of(event_type: str, top_labs: Sequence[str], code: str) -> str | None:
    if event_type in NUMERIC_TYPES:
        return None if code in top_labs else "other_lab"
    if event_type in (T.CONDITION.value, T.PROCEDURE.value, T.MEDICATION.value, T.OBSERVATION.value):
        return event_type
    return None  # birth, death, demographics and encounter boundaries are drawn otherwise


def _pairs(series) -> list[tuple[datetime, float]]:
    if isinstance(series, Mapping):
        return sorted(series.items())
    if isinstance(series, pl.DataFrame):
        return sorted(series.select(series.columns[:2]).iter_rows())
    return sorted((t, float(v)) for t, v in series)


def plot_timeline(
    events: pl.DataFrame,
    *,
    descriptions: Mapping[str, str] | None = None,
    attributions: Mapping[EventKey, float] | None = None,
    risk: Mapping[datetime, float] | Sequence[tuple[datetime, float]] | pl.DataFrame | None = None,
    risk_label: str = "risk",
    forecasts: Sequence[Sequence[TimeCode]] | pl.DataFrame | None = None,
    forecast_start: datetime | None = None,
    forecast_style: str = "samples",
    top_labs: int = 3,
    title: str | None = None,
    window: tuple[datetime, datetime] | None = None,
    listed_codes: int = 4,
    width: float = 13.0,
) -> PatientTimeline:
    """Plot one subject's MEDS rows (`load_patient_events`); see the module docstring for the layout.

    `attributions`: score per event, keyed by (time, code) or (issued, code)
    (`token_scores_to_events` makes them from per-token scores). `risk`: (time, value) pairs or a mapping
    or a two-column frame. `forecasts`: sampled futures, each a list of (time, code), or the rows of
    `odyssey forecast`'s futures.parquet for one prediction time (`sample`, `time`, `token`); bracketed
    special tokens ([VS], [W_1], ...) are skipped. `forecast_start`: the cut line (the prediction time;
    default: the first future time). `forecast_style`: "samples" (one lane of one colour per sample) or
    "aggregate" (one marker per code at its median time, sized by the share of samples holding it);
    a death in a future is a black cross above the lines, annotated with how many futures die.
    `window` (start, end) draws only the events inside it.
    The legend lists the `listed_codes` most frequent diagnoses, procedures and medications in words.
    """
    if events.height == 0:
        raise ValueError("no events to plot")
    if forecast_style not in FORECAST_STYLES:
        raise ValueError(f"forecast_style must be one of {FORECAST_STYLES}, got {forecast_style!r}")
    forecasts = _forecast_samples(forecasts)
    events = _with_odyssey_columns(events)
    subjects = events[S.SUBJECT_ID].unique()
    if subjects.len() != 1:
        raise ValueError(f"plot_timeline draws one subject; got {subjects.len()} subjects")
    timed = events.filter(pl.col(S.TIME).is_not_null())
    if window is not None:
        if not window[0] < window[1]:
            raise ValueError(f"window must run forwards, got {window[0]} .. {window[1]}")
        timed = timed.filter(pl.col(S.TIME).is_between(window[0], window[1]))
    elif timed.height == 0:
        raise ValueError("no timed events to plot (only static rows)")
    lab_codes = _top_labs(timed, top_labs)
    panels = (["attribution"] if attributions else []) + ["events"] + [f"lab:{c}" for c in lab_codes]
    panels += ["risk"] if risk is not None else []
    heights = [1.3 if p == "attribution" else 2.4 if p == "events" else 1.0 for p in panels]
    fig = Figure(figsize=(width, 1.2 + sum(heights)))
    axes_list = fig.subplots(
        len(panels), 1, sharex=True, gridspec_kw={"height_ratios": heights, "hspace": 0.08}, squeeze=False
    )
    axes = dict(zip(panels, axes_list[:, 0], strict=True))
    counts: dict[str, int] = {}

    # Time range: first to last event (birth excluded: it would squeeze decades of care into a sliver).
    future_times = [t for sample in (forecasts or []) for t, _ in sample]
    future_times += [forecast_start] if forecast_start is not None and future_times else []
    if window is None:
        care = timed.filter(pl.col(S.EVENT_TYPE) != T.BIRTH.value)
        care = care if care.height else timed
        low, high = care[S.TIME].min(), max([care[S.TIME].max(), *future_times])
    else:
        low, high = window
    last = max([high, *future_times])
    span = max(_num([high])[0] - _num([low])[0], 1 / 24)
    pad = 0.02 * span

    # Visit bands on every panel.
    seen_classes: dict[str, str] = {}
    visits = visits_of(events)
    for visit in visits:
        begin, end = _num([visit.start, visit.end])
        colour = VISIT_COLOURS.get(visit.encounter_class, OTHER_VISIT_COLOUR)
        seen_classes[visit.encounter_class] = colour
        width_days = max(end - begin, MIN_BAND_FRACTION * span)
        for name, ax in axes.items():
            band = ax.axvspan(begin, begin + width_days, color=colour, alpha=0.15, lw=0)
            band.set_gid("timeline:visit" if name == "events" else "timeline:visit-shade")
    counts["visit"] = len(visits)

    events_ax = axes["events"]
    rows_used = {row for row, *_ in MARKER_ROWS if row in ALWAYS_SHOWN}
    row_types = [
        _row_of(t, lab_codes, c) for t, c in zip(timed[S.EVENT_TYPE].to_list(), timed[S.CODE].to_list(), strict=True)
    ]
    timed = timed.with_columns(pl.Series("_row", row_types, dtype=pl.String))
    rows_used |= set(timed["_row"].drop_nulls().to_list())
    forecast_rows: list[list[tuple[datetime, str, str]]] = []
    future_deaths: list[datetime] = []  # the first death of each future that has one
    for sample in forecasts or []:
        kept = [(t, c) for t, c in sample if not (c.startswith("[") and c.endswith("]"))]
        types = event_types_of([c for _, c in kept])
        deaths = [t for (t, _), k in zip(kept, types, strict=True) if k == T.DEATH.value]
        future_deaths += deaths[:1]
        placed = [(t, c, _row_of(k, (), c) or T.OBSERVATION.value) for (t, c), k in zip(kept, types, strict=True)
                  if k != T.DEATH.value]
        rows_used |= {row for _, _, row in placed}
        forecast_rows.append(placed)
    shown_rows = [r for r in MARKER_ROWS if r[0] in rows_used]
    level = {row: len(shown_rows) - 1 - i for i, (row, *_) in enumerate(shown_rows)}
    sizes = None
    strongest = max((abs(v) for v in attributions.values()), default=0.0) if attributions else 0.0
    for row, label, marker, colour in shown_rows:
        chosen = timed.filter(pl.col("_row") == row)
        counts[row] = chosen.height
        codes = chosen[S.CODE].to_list()
        y = [level[row] + _jitter(c) for c in codes]
        if attributions:
            issued = chosen[S.ISSUED].to_list() if S.ISSUED in chosen.columns else [None] * chosen.height
            sizes = [
                28 + 160 * abs(attributions.get((t, c), attributions.get((i, c), 0.0))) / (strongest or 1.0)
                for t, i, c in zip(chosen[S.TIME].to_list(), issued, codes, strict=True)
            ]
        dots = events_ax.scatter(_num(chosen[S.TIME]), y, marker=marker, color=colour, s=sizes or 28,
                                 label=f"{label} ({chosen.height})", zorder=3,
                                 linewidths=1.2 if marker == "|" else 0.5)
        dots.set_gid(f"timeline:{row}")
    events_ax.set_yticks(list(level.values()), [label for _, label, *_ in shown_rows])
    events_ax.set_ylim(-0.7, len(shown_rows) - 0.3)

    counts["forecast"] = sum(len(placed) for placed in forecast_rows)
    counts["forecast_death"] = len(future_deaths)
    if future_deaths:
        # Deaths sit above the top line: crosses, one per future that dies, and how many of all futures do.
        top = len(shown_rows) - 0.45
        crosses = events_ax.scatter(_num(future_deaths), [top] * len(future_deaths), marker="x", color="black",
                                    s=36, zorder=5, alpha=FORECAST_ALPHA, label="death in a forecast")
        crosses.set_gid("timeline:forecast-death")
        events_ax.annotate(f"death in {len(future_deaths)}/{len(forecast_rows)} futures",
                           (float(np.median(_num(future_deaths))), top), fontsize=7, xytext=(4, 3),
                           textcoords="offset points")
    if forecast_style == "aggregate":
        _draw_forecast_aggregate(events_ax, forecast_rows, level)
        forecast_rows = []
    for index, placed in enumerate(forecast_rows):
        if not placed:
            continue
        colour = FORECAST_COLOURS[index % len(FORECAST_COLOURS)]
        offset = (index / max(1, len(forecast_rows)) - 0.5) * JITTER
        ys = [level[row] + offset for _, _, row in placed]
        dots = events_ax.scatter(_num([t for t, _, _ in placed]), ys, facecolors="none", edgecolors=colour,
                                 marker="o", s=30, zorder=4, alpha=FORECAST_ALPHA,
                                 label=f"forecast {index + 1}" if index < 3 else None)
        dots.set_gid(f"timeline:forecast:{index}")
    if future_times:
        start = forecast_start if forecast_start is not None else min(future_times)
        for ax in axes.values():
            ax.axvspan(_num([start])[0], _num([last])[0] + pad, color="0.85", alpha=0.35, lw=0, zorder=0)
            ax.axvline(_num([start])[0], color="0.3", ls="--", lw=0.8).set_gid("timeline:forecast-start")

    deaths = timed.filter(pl.col(S.EVENT_TYPE) == T.DEATH.value)
    counts["death"] = deaths.height
    for moment in _num(deaths[S.TIME]):
        for ax in axes.values():
            ax.axvline(moment, color="black", lw=1.5).set_gid("timeline:death")
        events_ax.annotate("death", (moment, len(shown_rows) - 0.45), fontsize=8, ha="right",
                           xytext=(-3, 0), textcoords="offset points")

    for code in lab_codes:
        ax = axes[f"lab:{code}"]
        rows = timed.filter((pl.col(S.CODE) == code) & pl.col(S.NUMERIC_VALUE).is_not_null())
        counts[f"lab:{code}"] = rows.height
        (line,) = ax.plot(_num(rows[S.TIME]), rows[S.NUMERIC_VALUE].to_numpy(), marker=".", ms=5, lw=1,
                          color="tab:blue")
        line.set_gid(f"timeline:lab:{code}")
        units = [u for u in rows[S.UNIT].unique().to_list() if u]
        label = describe(code, descriptions) + (f" ({units[0]})" if len(units) == 1 else "")
        ax.text(0.005, 0.92, label, transform=ax.transAxes, fontsize=8, va="top",
                bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
        ax.tick_params(axis="y", labelsize=7)

    if attributions:
        _draw_attributions(axes["attribution"], attributions, descriptions)
        counts["attribution"] = len(attributions)
    if risk is not None:
        pairs = _pairs(risk)
        counts["risk"] = len(pairs)
        ax = axes["risk"]
        (line,) = ax.step(_num([t for t, _ in pairs]), [v for _, v in pairs], where="post", color="tab:red",
                          marker=".", ms=4)
        line.set_gid("timeline:risk")
        ax.set_ylim(0, 1)
        ax.set_ylabel(risk_label, fontsize=8)

    bottom = axes_list[-1, 0]
    bottom.set_xlim(_num([low])[0] - pad, _num([high])[0] + pad)
    locator = mdates.AutoDateLocator()
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    handles, labels = events_ax.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.3) for c in seen_classes.values()]
    labels += [f"visit {k}" for k in seen_classes]
    for row, heading, marker, colour in MARKER_ROWS:
        if row not in LISTED_ROWS or listed_codes <= 0:
            continue
        frequent = (
            timed.filter(pl.col("_row") == row).group_by(S.CODE).len()
            .sort(["len", S.CODE], descending=[True, False]).head(listed_codes)
        )
        if frequent.height:
            handles.append(Line2D([], [], ls="none"))
            labels.append(f"Most frequent {heading.lower()}:")
        for code, times in frequent.iter_rows():
            handles.append(Line2D([], [], ls="none", marker=marker, color=colour, ms=5))
            labels.append(f"{describe(code, descriptions, max_chars=LISTED_CHARS)} ×{times}")
    events_ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    fig.suptitle(title or _default_title(events, counts), fontsize=11)
    fig.subplots_adjust(left=0.1, right=0.78, top=1 - 0.5 / fig.get_figheight(), bottom=0.4 / fig.get_figheight())
    return PatientTimeline(figure=fig, axes=axes, marker_counts=counts, lab_codes=lab_codes)


def _forecast_samples(forecasts) -> list[list[TimeCode]] | None:
    """Futures as lists of (time, code): as given, or from futures.parquet rows of one prediction time."""
    if forecasts is None or not isinstance(forecasts, pl.DataFrame):
        return None if forecasts is None else [list(sample) for sample in forecasts]
    missing = [c for c in (FUTURE_SAMPLE, FUTURE_TIME, FUTURE_TOKEN) if c not in forecasts.columns]
    if missing:
        raise ValueError(f"forecasts frame lacks the columns {missing} (futures.parquet of `odyssey forecast`)")
    keys = [c for c in FUTURE_KEYS if c in forecasts.columns]
    if keys and forecasts.select(keys).unique().height > 1:
        raise ValueError(f"forecasts frame holds several {', '.join(keys)}; filter it to one prediction time")
    order = [FUTURE_SAMPLE] + ([FUTURE_POSITION] if FUTURE_POSITION in forecasts.columns else [FUTURE_TIME])
    ordered = forecasts.sort(order, maintain_order=True)
    return [
        list(zip(group[FUTURE_TIME].to_list(), group[FUTURE_TOKEN].to_list(), strict=True))
        for _, group in ordered.group_by(FUTURE_SAMPLE, maintain_order=True)
    ]


def _draw_forecast_aggregate(ax: Axes, forecast_rows: list[list[tuple[datetime, str, str]]],
                             level: Mapping[str, int]) -> None:
    """One hollow marker per future code on its type's line, at the median time of its first occurrence
    per sample, sized and shaded by the share of samples that hold it."""
    first_seen: dict[tuple[str, str], list[datetime]] = {}
    for placed in forecast_rows:
        mine: dict[tuple[str, str], datetime] = {}
        for time, code, row in placed:
            mine.setdefault((row, code), time)
        for key, time in mine.items():
            first_seen.setdefault(key, []).append(time)
    if not first_seen:
        return
    keys = sorted(first_seen)
    shares = np.array([len(first_seen[k]) / len(forecast_rows) for k in keys])
    times = [np.median(_num(first_seen[k])) for k in keys]
    ys = [level[row] + _jitter(code) for row, code in keys]
    colours = [(0.0, 0.6, 0.7, 0.25 + 0.75 * share) for share in shares]
    dots = ax.scatter(times, ys, facecolors="none", edgecolors=colours, marker="o", s=20 + 120 * shares,
                      zorder=4, label=f"forecast ({len(forecast_rows)} samples)")
    dots.set_gid("timeline:forecast-aggregate")


def _draw_attributions(ax: Axes, attributions: Mapping[EventKey, float], descriptions) -> None:
    keys = sorted(attributions)
    times = _num([t for t, _ in keys])
    scores = np.array([attributions[k] for k in keys], dtype=float)
    colours = np.where(scores >= 0, "tab:red", "tab:blue")
    stems = ax.vlines(times, 0, scores, colors=colours, lw=1.5)
    stems.set_gid("timeline:attribution")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_ylabel("attribution", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    strongest = np.argsort(-np.abs(scores))[:LABELLED_ATTRIBUTIONS]
    for index in strongest:
        ax.annotate(describe(keys[index][1], descriptions, max_chars=32), (times[index], scores[index]),
                    fontsize=7, xytext=(3, 0), textcoords="offset points",
                    va="bottom" if scores[index] >= 0 else "top")
    bound = float(np.abs(scores).max(initial=0.0)) or 1.0
    ax.set_ylim(-1.25 * bound, 1.25 * bound)


def _default_title(events: pl.DataFrame, counts: Mapping[str, int]) -> str:
    """Sex, age at the first visit and amounts; never the subject id or other identifiers."""
    parts = []
    sex = events.filter(pl.col(S.CODE).str.starts_with(S.GENDER_PREFIX + S.CODE_SEPARATOR))[S.CODE].to_list()
    if sex:
        parts.append(_class_of(sex[0]))
    births = events.filter(pl.col(S.EVENT_TYPE) == T.BIRTH.value)[S.TIME].drop_nulls()
    care = events.filter(pl.col(S.TIME).is_not_null() & (pl.col(S.EVENT_TYPE) != T.BIRTH.value))[S.TIME]
    if births.len() and care.len():
        parts.append(f"{(care.min() - births.min()).days / 365.25:.0f} y at first visit")
    parts.append(f"{counts.get('visit', 0)} visits")
    if counts.get("death"):
        parts.append("died")
    return "Patient timeline: " + ", ".join(parts)


def save_timeline(
    figure: Figure | PatientTimeline, stem: str | os.PathLike, formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
) -> list[Path]:
    """Write `stem.<format>` for each format (through a temporary file each); returns the paths."""
    fig = figure.figure if isinstance(figure, PatientTimeline) else figure
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        partial = path.with_name(f".{path.name}.partial")
        fig.savefig(partial, format=fmt, dpi=dpi)
        os.replace(partial, path)
        written.append(path)
    return written
