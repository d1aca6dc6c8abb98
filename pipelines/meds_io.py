"""Read a MEDS v0.4 dataset lazily with polars, and check that it really is one.

`check_meds_dataset(root)` validates every shard of `root/data/` against the `meds` package's
`DataSchema` (extra columns allowed), checks that no subject is split across shards and that each
shard keeps a subject's rows contiguous and sorted by time (static rows, time null, first). The first
problem stops it with a `MedsFormatError` naming the file and the first bad row (0-based).

`scan_events(root)` gives one lazy frame over all shards with Odyssey's columns: columns that a foreign
MEDS dataset lacks (`encounter_id`, `event_type`, `issued`, ...) are added, `event_type` inferred from
the code's vocabulary prefix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey.pipelines import schema as S


class MedsFormatError(ValueError):
    """A MEDS dataset breaks the format; the message names the file and the first bad row."""


@dataclass(frozen=True)
class MedsInfo:
    """What `check_meds_dataset` found."""

    root: str
    shards: int
    subjects: int
    rows: int
    has_splits: bool

    def to_dict(self) -> dict:
        return asdict(self)


# Event type by the code's vocabulary prefix, for datasets written without `event_type`.
_EVENT_TYPE_BY_PREFIX: dict[str, S.EventType] = {
    "ICD10CM": S.EventType.CONDITION,
    "ICD9CM": S.EventType.CONDITION,
    "ICD10PCS": S.EventType.PROCEDURE,
    "ICD9PROC": S.EventType.PROCEDURE,
    "CPT": S.EventType.PROCEDURE,
    "NDC": S.EventType.MEDICATION,
    "RXNORM": S.EventType.MEDICATION,
    "MIMIC_LAB": S.EventType.LAB,
    "LOINC": S.EventType.LAB,
    S.GENDER_PREFIX: S.EventType.DEMOGRAPHIC,
    S.ENCOUNTER_START_PREFIX: S.EventType.ENCOUNTER_START,
    S.ENCOUNTER_END_PREFIX: S.EventType.ENCOUNTER_END,
}
_EXTRA_COLUMNS: dict[str, pl.DataType] = {
    S.ENCOUNTER_ID: pl.Int64(),
    S.UNIT: pl.String(),
    S.COMPARATOR: pl.String(),
    S.ISSUED: pl.Datetime("us"),
}
_STRING_TYPES = (pa.string(), pa.large_string())


def data_files(root: str | os.PathLike) -> list[Path]:
    """The shards of a MEDS dataset, sorted by path."""
    root = Path(root)
    data_dir = root / S.DATA_DIR
    if not data_dir.is_dir():
        raise MedsFormatError(f"{root}: not a MEDS dataset (no {S.DATA_DIR}/ folder)")
    files = sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise MedsFormatError(f"{data_dir}: no parquet shards")
    return files


def _check_schema(path: Path, found: pa.Schema) -> None:
    for field in meds.DataSchema.schema():
        required = field.name in (S.SUBJECT_ID, S.TIME, S.CODE)
        if field.name not in found.names:
            if required or field.name == S.NUMERIC_VALUE:
                raise MedsFormatError(f"{path}: missing MEDS column {field.name!r} ({field.type})")
            continue
        got = found.field(field.name).type
        ok = got in _STRING_TYPES if field.type in _STRING_TYPES else got == field.type
        if not ok:
            raise MedsFormatError(f"{path}: column {field.name!r} has type {got}, MEDS requires {field.type}")
    for name, dtype in ((S.ENCOUNTER_ID, pa.int64()), (S.ISSUED, pa.timestamp("us"))):
        if name in found.names and found.field(name).type != dtype:
            raise MedsFormatError(
                f"{path}: column {name!r} has type {found.field(name).type}, expected {dtype}"
            )


def _first_bad_row(path: Path) -> tuple[int, str] | None:
    """The first row breaking contiguity, time order or non-null keys, with the reason."""
    frame = (
        pl.scan_parquet(path)
        .select(S.SUBJECT_ID, S.TIME, pl.col(S.CODE).is_null().alias("_no_code"))
        .with_row_index("_row")
        .with_columns(
            pl.col(S.SUBJECT_ID).shift(1).alias("_prev_subject"),
            pl.col(S.TIME).shift(1).alias("_prev_time"),
        )
        .with_columns(
            pl.col(S.SUBJECT_ID).is_null().alias("_no_subject"),
            (pl.col(S.SUBJECT_ID) != pl.col("_prev_subject")).fill_null(False).alias("_new_run"),
        )
        .with_columns(
            (
                (pl.col(S.SUBJECT_ID) == pl.col("_prev_subject"))
                & pl.col("_prev_time").is_not_null()
                & (pl.col(S.TIME).is_null() | (pl.col(S.TIME) < pl.col("_prev_time")))
            ).alias("_unsorted"),
        )
    )
    runs = (
        frame.filter(pl.col("_new_run") | (pl.col("_row") == 0))
        # A subject whose rows form two or more runs is not contiguous; its second run is the bad row.
        .with_columns(
            pl.len().over(S.SUBJECT_ID).alias("_runs"),
            pl.int_range(pl.len()).over(S.SUBJECT_ID).alias("_run_no"),
        )
        .filter((pl.col("_runs") > 1) & (pl.col("_run_no") > 0))
        .select(pl.col("_row").min())
    )
    problems = frame.select(
        pl.col("_row").filter(pl.col("_no_subject")).min().alias("null subject_id"),
        pl.col("_row").filter(pl.col("_no_code")).min().alias("null code"),
        pl.col("_row")
        .filter(pl.col("_unsorted"))
        .min()
        .alias("rows of a subject not sorted by time (static rows first)"),
    )
    found = pl.concat(
        [problems, runs.rename({"_row": "subject rows not contiguous in the shard"})], how="horizontal"
    ).collect()
    best: tuple[int, str] | None = None
    for reason in found.columns:
        row = found[reason][0]
        if row is not None and (best is None or row < best[0]):
            best = (int(row), reason)
    return best


def check_meds_dataset(root: str | os.PathLike) -> MedsInfo:
    """Validate a MEDS dataset (schema, subjects in one shard, sorted times); raise `MedsFormatError`."""
    root = Path(root)
    files = data_files(root)
    owner: pl.DataFrame | None = None
    rows = 0
    for shard, path in enumerate(files):
        try:
            found = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise MedsFormatError(f"{path}: not a readable parquet file: {exc}") from exc
        _check_schema(path, found)
        bad = _first_bad_row(path)
        if bad is not None:
            row, reason = bad
            raise MedsFormatError(f"{path}: row {row}: {reason}")
        subjects = pl.scan_parquet(path).select(pl.col(S.SUBJECT_ID).unique()).collect()
        rows += pq.ParquetFile(path).metadata.num_rows
        subjects = subjects.with_columns(pl.lit(shard, pl.Int32).alias("_shard"))
        if owner is not None:
            clash = subjects.join(owner, on=S.SUBJECT_ID, how="inner", suffix="_other")
            if clash.height:
                other = files[clash["_shard_other"][0]]
                first_row = (
                    pl.scan_parquet(path)
                    .with_row_index("_row")
                    .filter(pl.col(S.SUBJECT_ID) == clash[S.SUBJECT_ID][0])
                    .select(pl.col("_row").min())
                    .collect()
                    .item()
                )
                raise MedsFormatError(
                    f"{path}: row {first_row}: subject also has rows in {other} (a subject must sit in one shard)"
                )
            owner = pl.concat([owner, subjects])
        else:
            owner = subjects
    splits_path = root / S.SPLITS_FILE
    return MedsInfo(
        root=str(root),
        shards=len(files),
        subjects=0 if owner is None else owner.height,
        rows=rows,
        has_splits=splits_path.is_file(),
    )


def scan_shard(path: str | os.PathLike) -> pl.LazyFrame:
    """One shard as a lazy frame with all of Odyssey's columns (missing ones added, `event_type` inferred)."""
    frame = pl.scan_parquet(path)
    names = frame.collect_schema().names()
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in _EXTRA_COLUMNS.items() if name not in names]
    if S.NUMERIC_VALUE not in names:
        missing.append(pl.lit(None, pl.Float32).alias(S.NUMERIC_VALUE))
    if missing:
        frame = frame.with_columns(missing)
    if S.EVENT_TYPE not in names:
        frame = frame.with_columns(infer_event_type(pl.col(S.CODE)).alias(S.EVENT_TYPE))
    return frame


def infer_event_type(code: pl.Expr) -> pl.Expr:
    """Event type from a code's vocabulary prefix (datasets written by other ETLs lack `event_type`)."""
    prefix = code.str.split(S.CODE_SEPARATOR).list.first()
    expr = pl.when(code == S.BIRTH_CODE).then(pl.lit(S.EventType.BIRTH.value))
    expr = expr.when(code == S.DEATH_CODE).then(pl.lit(S.EventType.DEATH.value))
    for vocabulary, event_type in _EVENT_TYPE_BY_PREFIX.items():
        expr = expr.when(prefix == vocabulary).then(pl.lit(event_type.value))
    return expr.otherwise(pl.lit(S.EventType.OBSERVATION.value))


def read_splits(root: str | os.PathLike) -> pl.DataFrame | None:
    """`subject_id`, `split` from `metadata/subject_splits.parquet`, or None when the dataset has none."""
    path = Path(root) / S.SPLITS_FILE
    if not path.is_file():
        return None
    frame = pl.read_parquet(path, columns=[S.SUBJECT_ID, "split"])
    return frame.unique(S.SUBJECT_ID, keep="first")


def write_meds_dataset(
    root: str | os.PathLike,
    events: pl.DataFrame,
    splits: pl.DataFrame | None = None,
    shards: int = 1,
) -> Path:
    """Write `events` as a MEDS dataset at `root` (sorted, Odyssey's `DATA_SCHEMA`, whole subjects per shard).

    Missing optional columns are filled with nulls and `event_type` is inferred from codes when absent.
    `splits` (`subject_id`, `split`) goes to `metadata/subject_splits.parquet` when given.
    """
    root = Path(root)
    names = events.columns
    filled = events.lazy()
    for spec in DATA_SCHEMA_COLUMNS:
        if spec.name not in names:
            value = infer_event_type(pl.col(S.CODE)) if spec.name == S.EVENT_TYPE else pl.lit(None, spec.dtype)
            filled = filled.with_columns(value.alias(spec.name))
    frame = (
        filled.select([pl.col(spec.name).cast(spec.dtype) for spec in DATA_SCHEMA_COLUMNS])
        .sort(S.SUBJECT_ID, S.TIME, nulls_last=False, maintain_order=True)
        .collect()
    )
    data_dir = root / S.DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    subjects = frame[S.SUBJECT_ID].unique(maintain_order=True).to_list()
    per_shard = max(1, -(-len(subjects) // max(1, shards)))
    for index in range(max(1, shards)):
        chosen = subjects[index * per_shard : (index + 1) * per_shard]
        part = frame.filter(pl.col(S.SUBJECT_ID).is_in(chosen))
        if part.height or index == 0:
            pq.write_table(part.to_arrow().cast(S.DATA_SCHEMA), data_dir / f"{index}.parquet")
    if splits is not None:
        (root / S.SPLITS_FILE).parent.mkdir(parents=True, exist_ok=True)
        table = splits.select(pl.col(S.SUBJECT_ID).cast(pl.Int64), pl.col("split").cast(pl.String)).to_arrow()
        pq.write_table(table, root / S.SPLITS_FILE)
    return root


@dataclass(frozen=True)
class _Column:
    name: str
    dtype: pl.DataType


DATA_SCHEMA_COLUMNS = tuple(
    _Column(f.name, pl.from_arrow(pa.table({f.name: pa.array([], f.type)}))[f.name].dtype) for f in S.DATA_SCHEMA
)
