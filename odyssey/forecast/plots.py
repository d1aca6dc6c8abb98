"""Timelines of a few forecast patients: what happened, with the sampled futures after the cut line."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

HISTORY_SHOWN_DAYS = 365  # the year before the prediction time
MARGIN_DAYS = 30  # after the last future token


def plot_forecast(meds_root: str | os.PathLike, futures: pl.DataFrame, subject_id: int, prediction_time: datetime,
                  stem: str | os.PathLike, style: str = "aggregate") -> list[Path]:
    """Write `stem.png` and `stem.svg`: the subject's events around `prediction_time` and its futures.

    Real events after the prediction time stay on the plot, so the futures can be compared with them.
    """
    from odyssey.viz import plot_patient, save_timeline

    mine = futures.filter((pl.col("subject_id") == subject_id) & (pl.col("prediction_time") == prediction_time))
    if mine.height == 0:
        raise ValueError("no futures for this prediction time")
    samples = mine["sample"].n_unique()
    end = max(mine["time"].max(), prediction_time) + timedelta(days=MARGIN_DAYS)
    window = (prediction_time - timedelta(days=HISTORY_SHOWN_DAYS), end)
    timeline = plot_patient(meds_root, subject_id, forecasts=mine, forecast_start=prediction_time,
                            forecast_style=style, window=window,
                            title=f"{samples} sampled futures after the prediction time (dashed line)")
    return save_timeline(timeline, stem)
