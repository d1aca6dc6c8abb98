"""check_meds_dataset: valid datasets pass, broken ones stop naming the file and first bad row."""

import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from odyssey.pipelines import schema as S
from odyssey.pipelines.meds_io import MedsFormatError, check_meds_dataset, scan_shard, write_meds_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizer"))
from meds_events import admission, at, event, frame, write_dataset  # noqa: E402


def _rows():
    rows = []
    for subject in (5, 3, 9):
        rows += [event(subject, None, "GENDER//female"), event(subject, at(-9000), "MEDS_BIRTH")]
        rows += admission(subject, subject * 10, at(subject), at(subject + 1))
    return rows


def test_valid_dataset(tmp_path):
    data = write_dataset(tmp_path, _rows(), {5: "train", 3: "tuning", 9: "held_out"}, shards=2)
    info = check_meds_dataset(data)
    assert (info.shards, info.subjects, info.rows, info.has_splits) == (2, 3, 12, True)
    assert info.to_dict()["root"] == str(data)


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def test_unsorted_times_name_the_first_bad_row(tmp_path):
    data = write_dataset(tmp_path, _rows())
    shard = data / "data" / "0.parquet"
    table = pq.read_table(shard)  # rows 0-3: subject 3 (static, birth, start, end)
    order = [0, 1, 3, 2, *range(4, table.num_rows)]
    _rewrite(shard, table.take(order))
    with pytest.raises(MedsFormatError, match=r"0\.parquet: row 3: rows of a subject not sorted by time"):
        check_meds_dataset(data)


def test_static_row_after_timed_rows_is_unsorted(tmp_path):
    data = write_dataset(tmp_path, _rows())
    shard = data / "data" / "0.parquet"
    table = pq.read_table(shard)
    _rewrite(shard, table.take([1, 0, *range(2, table.num_rows)]))
    with pytest.raises(MedsFormatError, match="row 1: rows of a subject not sorted"):
        check_meds_dataset(data)


def test_subject_not_contiguous(tmp_path):
    data = write_dataset(tmp_path, _rows())
    shard = data / "data" / "0.parquet"
    table = pq.read_table(shard)  # subjects 3 (0-3), 5 (4-7), 9 (8-11)
    _rewrite(shard, table.take([0, 1, 4, 5, 6, 7, 2, 3, *range(8, 12)]))
    with pytest.raises(MedsFormatError, match="row 6: subject rows not contiguous"):
        check_meds_dataset(data)


def test_subject_split_across_shards(tmp_path):
    data = write_dataset(tmp_path, _rows(), shards=3)
    first = pq.read_table(data / "data" / "0.parquet")
    second = pq.read_table(data / "data" / "1.parquet")
    _rewrite(data / "data" / "1.parquet", pa.concat_tables([second, first.slice(2, 2)]))
    with pytest.raises(MedsFormatError, match=r"1\.parquet: row 4: subject also has rows in .*0\.parquet"):
        check_meds_dataset(data)


def test_schema_errors(tmp_path):
    data = write_dataset(tmp_path, _rows())
    shard = data / "data" / "0.parquet"
    table = pq.read_table(shard)
    _rewrite(shard, table.set_column(0, S.SUBJECT_ID, table[S.SUBJECT_ID].cast(pa.string())))
    with pytest.raises(MedsFormatError, match="'subject_id' has type string, MEDS requires int64"):
        check_meds_dataset(data)
    _rewrite(shard, table.drop_columns([S.CODE]))
    with pytest.raises(MedsFormatError, match="missing MEDS column 'code'"):
        check_meds_dataset(data)
    shard.write_bytes(b"not parquet")
    with pytest.raises(MedsFormatError, match="not a readable parquet file"):
        check_meds_dataset(data)
    with pytest.raises(MedsFormatError, match="no data/ folder"):
        check_meds_dataset(tmp_path / "nowhere")


def test_null_subject_or_code(tmp_path):
    data = write_dataset(tmp_path, _rows())
    shard = data / "data" / "0.parquet"
    table = pq.read_table(shard).cast(S.DATA_SCHEMA.set(2, pa.field(S.CODE, pa.string(), nullable=True)))
    codes = table[S.CODE].to_pylist()
    codes[5] = None
    _rewrite(shard, table.set_column(2, pa.field(S.CODE, pa.string()), pa.array(codes, pa.string())))
    with pytest.raises(MedsFormatError, match="row 5: null code"):
        check_meds_dataset(data)


def test_foreign_meds_dataset_gets_odyssey_columns(tmp_path):
    plain = frame(_rows()).select(S.SUBJECT_ID, S.TIME, S.CODE, S.NUMERIC_VALUE)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    plain.sort(S.SUBJECT_ID, S.TIME, nulls_last=False).write_parquet(data_dir / "x.parquet")
    info = check_meds_dataset(tmp_path)
    assert info.rows == 12 and not info.has_splits
    scanned = scan_shard(data_dir / "x.parquet").collect()
    types = dict(zip(scanned[S.CODE], scanned[S.EVENT_TYPE], strict=False))
    assert types["GENDER//female"] == "demographic" and types["ENCOUNTER_START//IMP"] == "encounter_start"
    assert types["MEDS_BIRTH"] == "birth"
    assert scanned[S.ENCOUNTER_ID].null_count() == scanned.height


def test_write_meds_dataset_sorts_and_keeps_subjects_whole(tmp_path):
    rows = frame(_rows()).sample(fraction=1.0, shuffle=True, seed=3)
    write_meds_dataset(tmp_path, rows, shards=2)
    info = check_meds_dataset(tmp_path)
    assert info.subjects == 3 and info.shards == 2
    back = pl.read_parquet(tmp_path / "data" / "0.parquet")
    assert back[S.SUBJECT_ID].to_list() == [3] * 4 + [5] * 4
