"""`odyssey ingest --meds DIR`: enter with an existing MEDS dataset (e.g. from MIMIC_IV_MEDS).

The dataset is checked against the MEDS schema in place (subjects in one shard, sorted times); the
metadata Odyssey needs and that the dataset lacks is added: subject splits, the codes table.
Nothing that is there already is changed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import meds
import polars as pl

from odyssey.io import write_json
from odyssey.pipelines import schema
from odyssey.pipelines.meds_io import check_meds_dataset, data_files
from odyssey.pipelines.splits import SplitRatios, assign_splits, write_parquet


@dataclass
class MedsCheckReport:
    root: str
    shards: int
    subjects: int
    rows: int
    added: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        added = ", ".join(self.added) if self.added else "nothing (metadata complete)"
        return (
            f"MEDS dataset: {self.root}\n"
            f"  valid: {self.shards} shard(s), {self.subjects:,} subjects, {self.rows:,} rows\n"
            f"  added: {added}"
        )


def _write_atomically(write, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def ingest_meds(root: str | os.PathLike, ratios: SplitRatios | None = None) -> MedsCheckReport:
    """Check `root`, add missing splits and codes; raise MedsFormatError naming the first bad row."""
    root = Path(root)
    info = check_meds_dataset(root)
    shards = data_files(root)
    added: list[str] = []
    (root / "metadata").mkdir(exist_ok=True)
    if not info.has_splits:
        subjects = pl.concat([pl.scan_parquet(p).select(schema.SUBJECT_ID).unique() for p in shards]).collect()
        splits = assign_splits(subjects[schema.SUBJECT_ID].to_numpy(), ratios or SplitRatios())
        _write_atomically(lambda p: write_parquet(splits, p, meds.SubjectSplitSchema.schema()), root / schema.SPLITS_FILE)
        added.append(schema.SPLITS_FILE)
    if not (root / schema.CODES_FILE).is_file():
        codes = (
            pl.concat([pl.scan_parquet(p).select(schema.CODE).unique() for p in shards]).unique().sort(schema.CODE)
            .with_columns(description=pl.lit(None, pl.String), parent_codes=pl.lit(None, pl.List(pl.String)))
            .collect()
        )
        _write_atomically(lambda p: write_parquet(codes, p, meds.CodeMetadataSchema.schema()), root / schema.CODES_FILE)
        added.append(schema.CODES_FILE)
    report = MedsCheckReport(str(root), info.shards, info.subjects, info.rows, added)
    write_json(root / "meds_check_report.json", report.to_dict())
    return report
