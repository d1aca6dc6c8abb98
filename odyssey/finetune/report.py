"""Evaluation report: `report.json` (everything) and `report.md` (one comparison table, then details)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from odyssey.io import write_json

JSON_FILE = "report.json"
MARKDOWN_FILE = "report.md"
DETAIL_METRICS = ("auroc", "auprc", "f1", "brier", "ece")


def _interval(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    if metric.get("low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def _auroc_table(models: list[str], rows: list[tuple], with_oracle: bool) -> list[str]:
    """Rows of (output, n, positives, {model: AUROC interval}, oracle interval or None) as a markdown table."""
    header = ["output", "n", "positives", *models, *(["oracle"] if with_oracle else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, n, positives, aurocs, oracle in rows:
        cells = [name, str(n), str(positives), *(_interval(aurocs.get(m)) for m in models)]
        if with_oracle:
            cells.append(_interval(oracle))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_table(report: dict[str, Any]) -> list[str]:
    """Held-out AUROC (95% CI) of every model per task output, with the oracle when known."""
    rows = [(name, e["n"], e["positives"], {m: v.get("auroc") for m, v in e["models"].items()},
             e.get("oracle", {}).get("auroc")) for name, e in report["outputs"].items()]
    return _auroc_table(report["models"], rows, any("oracle" in e for e in report["outputs"].values()))


def long_history_table(report: dict[str, Any], key: str = "long_history") -> list[str]:
    """Every model's AUROC on the examples with a long history before the prediction time."""
    entries = {name: e[key] for name, e in report["outputs"].items() if key in e}
    if not entries:
        return []
    first = next(iter(entries.values()))
    tokens, most = first["min_tokens"], first.get("max_tokens")
    band = (f"more than {tokens:,} tokens" if most is None
            else f"{tokens + 1:,} to {most:,} tokens, inside the model's context,")
    rows = [(name, e["n"], e["positives"], e["models"], e.get("oracle")) for name, e in entries.items()]
    return [f"## Long histories ({band} before the prediction time, AUROC)", "",
            *_auroc_table(report["models"], rows, any("oracle" in e for e in entries.values())), ""]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Model `{report['model']}`, split `{report['split']}`; thresholds chosen on `{report['threshold_split']}`; "
        f"{int(report['confidence'] * 100)}% intervals from {report['resamples']} bootstrap resamples of subjects.",
        "",
        "## AUROC by model",
        "",
        *comparison_table(report),
        "",
        *long_history_table(report),
        *long_history_table(report, "long_history_in_context"),
        f"## Details ({report['primary']})",
        "",
        "| output | " + " | ".join(DETAIL_METRICS) + " | threshold |",
        "|" + "---|" * (len(DETAIL_METRICS) + 2),
    ]
    for name, entry in report["outputs"].items():
        metrics = entry["models"][report["primary"]]
        cells = [_interval(metrics[m]) for m in DETAIL_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {metrics['threshold']:.3f} |")
    lines += ["", f"## Subgroups ({report['primary']}, AUROC)", "", "| output | group | n | positives | AUROC |",
              "|---|---|---|---|---|"]
    for name, entry in report["outputs"].items():
        for kind, groups in entry.get("subgroups", {}).items():
            for value, stats in groups.items():
                lines.append(f"| {name} | {kind}={value} | {stats['n']} | {stats['positives']} | "
                             f"{_interval(stats.get('auroc'))} |")
    lines += ["", "Reliability plots: " + ", ".join(f"[{n}]({e['plot']})" for n, e in report["outputs"].items()), ""]
    return "\n".join(lines)


def write_report(directory: Path, report: dict[str, Any]) -> None:
    write_json(Path(directory) / JSON_FILE, report)
    (Path(directory) / MARKDOWN_FILE).write_text(markdown(report))
