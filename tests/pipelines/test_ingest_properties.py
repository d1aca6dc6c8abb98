"""Property: no corruption of the input crashes ingestion, and the counts always reconcile."""

from __future__ import annotations

import tempfile
from pathlib import Path

import orjson
import polars as pl
from fhir_builders import small_cohort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odyssey.pipelines.ingest import ingest_fhir

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()):
    """Every key path inside a parsed resource."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


@st.composite
def corruption(draw, line: bytes):
    kind = draw(st.sampled_from(["truncate", "flip", "replace", "delete"]))
    if not line:
        return b"{"
    try:
        resource = orjson.loads(line)
    except orjson.JSONDecodeError:
        kind = "flip"  # already corrupted: keep damaging the bytes
    if kind == "truncate":
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if kind == "flip":
        i = draw(st.integers(0, len(line) - 1))
        return line[:i] + bytes([draw(st.integers(0, 255))]) + line[i + 1 :]
    paths = list(_paths(resource))
    if not paths:
        return b"[]"
    path = draw(st.sampled_from(paths))
    holder = resource
    for key in path[:-1]:
        holder = holder[key]
    if kind == "delete":
        del holder[path[-1]]
    else:
        holder[path[-1]] = draw(JSON_VALUES)
    return orjson.dumps(resource)


def corrupted_small_cohort(data, root: Path) -> Path:
    """The small cohort under `root` with 1-4 random lines corrupted (drawn from `data`)."""
    folder = small_cohort(root)
    files = sorted(folder.glob("*.ndjson"))
    for _ in range(data.draw(st.integers(1, 4))):
        target = data.draw(st.sampled_from(files))
        lines = target.read_bytes().splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = data.draw(corruption(lines[i]))
        target.write_bytes(b"\n".join(lines) + b"\n")
    return folder


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_never_crashes_and_counts_reconcile(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = corrupted_small_cohort(data, Path(tmp) / "in")
        out = Path(tmp) / "out"
        report = ingest_fhir([folder], out, workers=1)
        for name, c in report.resource_types.items():
            assert c.read == c.written + c.rejected + c.skipped, (name, c)
        rejected_lines = (out / "rejects" / "rejects.ndjson").read_bytes().splitlines()
        assert len(rejected_lines) == report.resources_rejected
        if report.events:
            frame = pl.read_parquet(out / "data" / "*.parquet")
            assert frame["code"].null_count() == 0 and frame["subject_id"].null_count() == 0
