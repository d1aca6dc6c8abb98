"""Heat maps of hidden attention over a patient's visits.

Plain `matplotlib.figure.Figure`s outside pyplot (no window, no global backend change; Agg renders them
when saved); in a notebook, `display(fig)`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

HEADER_VISIT = 0  # visit order of [CLS] and static tokens


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def visit_spans(visit_orders: Sequence[int] | np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal visit order as (visit, first position, one past the last position)."""
    orders = _as_numpy(visit_orders).astype(np.int64)
    if orders.ndim != 1:
        raise ValueError(f"visit_orders must be one sequence, got shape {orders.shape}")
    if not orders.size:
        return []
    breaks = np.flatnonzero(np.diff(orders)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [orders.size]])
    return [(int(orders[a]), int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


VISIT_AGGREGATES = ("sum", "mean")


def attention_by_visit(alpha, visit_orders, how: str = "sum") -> tuple[np.ndarray, list[int]]:
    """alpha (L, L) summed (or averaged over token pairs, `how="mean"`) per (target visit, source visit).

    Returns the (visits, visits) matrix and the visit orders of its rows and columns. The mean counts
    only causal pairs (s <= t), so a visit's own block is not diluted by its zero upper half.
    """
    if how not in VISIT_AGGREGATES:
        raise ValueError(f"how must be one of {VISIT_AGGREGATES}, got {how!r}")
    matrix = _as_numpy(alpha)
    orders = _as_numpy(visit_orders).astype(np.int64)
    if matrix.ndim != 2 or matrix.shape != (orders.size, orders.size):
        raise ValueError(f"alpha must be (L, L) with L = {orders.size} visit orders, got {matrix.shape}")
    visits = sorted(set(orders.tolist()))
    index = np.searchsorted(visits, orders)
    out = np.zeros((len(visits), len(visits)), dtype=np.float64)
    np.add.at(out, (index[:, None], index[None, :]), matrix)
    if how == "mean":
        pairs = np.zeros_like(out)
        causal = np.tril(np.ones_like(matrix))
        np.add.at(pairs, (index[:, None], index[None, :]), causal)
        out = np.divide(out, pairs, out=np.zeros_like(out), where=pairs > 0)
    return out, visits


def plot_hidden_attention(
    alpha,
    visit_orders,
    *,
    by_visit: bool = False,
    visit_aggregate: str = "sum",
    title: str | None = None,
    tokens: Sequence[str] | None = None,
) -> Figure:
    """One patient's hidden attention (L, L) as a heat map, with visit boundaries and visit numbers.

    `by_visit` sums it per (target visit, source visit) (`visit_aggregate="mean"`: mean per token pair). `tokens` (L words) label the axes of short
    sequences. Signed values use a diverging map centred at zero.
    """
    matrix = _as_numpy(alpha).astype(np.float64)
    orders = _as_numpy(visit_orders)
    if by_visit:
        matrix, visits = attention_by_visit(matrix, orders, how=visit_aggregate)
    elif matrix.ndim != 2 or matrix.shape != (orders.size, orders.size):
        raise ValueError(f"alpha must be (L, L) with L = {orders.size} visit orders, got {matrix.shape}")
    size = min(12.0, 4.0 + 0.02 * matrix.shape[0])
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    lower = np.tril(np.ones_like(matrix, dtype=bool))
    shown = np.ma.masked_where(~lower, matrix)
    low, high = float(np.min(matrix[lower], initial=0.0)), float(np.max(matrix[lower], initial=0.0))
    if low < 0 < high:
        image = ax.imshow(shown, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, low, high), interpolation="nearest")
    else:
        image = ax.imshow(shown, cmap="viridis", interpolation="nearest")
    image.set_gid("hidden-attention")
    fig.colorbar(image, ax=ax, shrink=0.8, label="hidden attention α(t, s)")
    if by_visit:
        labels = ["header" if v == HEADER_VISIT else f"visit {v}" for v in visits]
        ticks = np.arange(len(visits))
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        ax.set_xlabel("source visit s")
        ax.set_ylabel("target visit t")
    else:
        spans = visit_spans(orders)
        for _, start, _ in spans[1:]:
            ax.axhline(start - 0.5, color="0.5", lw=0.4)
            ax.axvline(start - 0.5, color="0.5", lw=0.4)
        if tokens is not None and len(tokens) == matrix.shape[0] and matrix.shape[0] <= 80:
            ticks = np.arange(matrix.shape[0])
            ax.set_xticks(ticks, tokens, rotation=90, fontsize=5)
            ax.set_yticks(ticks, tokens, fontsize=5)
        else:
            middles = [(a + b - 1) / 2 for _, a, b in spans]
            labels = ["hdr" if v == HEADER_VISIT else str(v) for v, _, _ in spans]
            step = max(1, len(spans) // 30)  # keep at most ~30 visit labels readable
            ax.set_xticks(middles[::step], labels[::step], fontsize=7)
            ax.set_yticks(middles[::step], labels[::step], fontsize=7)
        ax.set_xlabel("source token s (by visit)")
        ax.set_ylabel("target token t (by visit)")
    ax.set_title(title or "Mamba hidden attention")
    fig.tight_layout()
    return fig


def save_heatmap(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the figure (format from the suffix: .png, .svg, .pdf) through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format=path.suffix.lstrip(".") or "png", dpi=150)
    os.replace(partial, path)
    return path
