"""The compiled reader (`_fhir_scan.c`): many NDJSON lines at once, straight to Arrow columns.

`ColumnScanner.scan` flattens every line of the common shapes the msgspec fast path handles (the same
rows, keys, patients and medications, byte for byte) and stops at each line it does not fully
understand, handing it back so the caller runs the Python paths on exactly that line. It shares the
Python paths' code cache and descriptions (Context), in line order. The extension is optional: where it
was not built or does not import, `AVAILABLE` is False and ingestion reads every line in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

_API = 3  # SCANNER_API in _fhir_scan.c: an editable install keeps an old build until `pip install -e .` reruns

try:
    from odyssey.pipelines import _fhir_scan
except ImportError as exc:  # not built (no compiler at install time) or not loadable here
    _fhir_scan = None
    IMPORT_ERROR: str | None = str(exc)
else:
    IMPORT_ERROR = None
    if getattr(_fhir_scan, "API", None) != _API:
        IMPORT_ERROR = (f"{_fhir_scan.__file__} was built from another version of _fhir_scan.c "
                        "(rebuild it: pip install -e .)")
        _fhir_scan = None

AVAILABLE = _fhir_scan is not None


@dataclass
class ScannedBatch:
    """What the scanner wrote since the last take, as Arrow tables (ingest_read's schemas)."""

    rows: pa.Table
    keys: pa.Table
    patients: pa.Table
    medications: pa.Table


def _table(columns: tuple, schema: pa.Schema) -> pa.Table:
    arrays = []
    for (length, null_count, validity, offsets, values), field in zip(columns, schema, strict=True):
        buffers = [pa.py_buffer(validity) if validity is not None else None]
        if offsets is not None:
            buffers.append(pa.py_buffer(offsets))
        buffers.append(pa.py_buffer(values))
        arrays.append(pa.Array.from_buffers(field.type, length, buffers, null_count=null_count))
    return pa.Table.from_arrays(arrays, schema=schema)


def release_memory() -> None:
    """Free the memory the reader keeps for its next batches. Batches are handed to Arrow without a copy,
    and their buffers, once freed, are kept (bounded) for the following batches and chunks: fresh memory
    costs a page fault and a clearing per page. Ingestion calls this when it is done."""
    if _fhir_scan is not None:
        _fhir_scan.release_memory()


class ColumnScanner:
    """One per chunk reader; `context` is the reader's fhir_flatten.Context (shared caches)."""

    def __init__(self, context, sample_every: int, row_schema: pa.Schema, key_schema: pa.Schema,
                 patient_schema: pa.Schema, medication_schema: pa.Schema):
        if not AVAILABLE:
            raise RuntimeError(f"the compiled reader is not available: {IMPORT_ERROR}")
        self._scanner = _fhir_scan.Scanner(context.systems, context.code_cache, context.descriptions, sample_every)
        self._schemas = (row_schema, key_schema, patient_schema, medication_schema)
        self.scan = self._scanner.scan
        self.drain_counts = self._scanner.drain_counts

    @property
    def rows(self) -> int:
        return self._scanner.rows

    @property
    def pending(self) -> int:
        return self._scanner.pending

    def take(self) -> ScannedBatch:
        parts = self._scanner.take()
        return ScannedBatch(*(_table(cols, schema) for cols, schema in zip(parts, self._schemas, strict=True)))


__all__ = ["AVAILABLE", "IMPORT_ERROR", "ColumnScanner", "ScannedBatch", "release_memory"]
