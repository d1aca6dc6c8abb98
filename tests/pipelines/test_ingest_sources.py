"""Reading chunks of NDJSON: block-wise line splitting gives exactly the lines of the byte range."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from odyssey.pipelines import fhir_sources
from odyssey.pipelines.fhir_sources import Chunk, line_offsets, plan_chunks, read_lines


def _expected(piece: bytes) -> list[bytes]:
    lines = piece.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.rstrip(b"\r") for line in lines]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=80).map(lambda b: bytes(b"ab\n\r{}"[x % 6] for x in b)),
    block=st.integers(1, 16),
    cut=st.data(),
)
def test_block_reading_matches_splitting_the_whole_range(data, block, cut):
    start = cut.draw(st.integers(0, len(data)))
    end = cut.draw(st.none() | st.integers(start, len(data)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.ndjson"
        path.write_bytes(data)
        saved = fhir_sources._READ_BLOCK
        fhir_sources._READ_BLOCK = block  # lines that straddle blocks, and \r\n split between blocks
        try:
            got = list(read_lines(Chunk(0, str(path), start, end, 7, "ndjson", 0)))
        finally:
            fhir_sources._READ_BLOCK = saved
    want = _expected(data[start:] if end is None else data[start:end])
    assert got == list(zip(range(7, 7 + len(want)), want, strict=True))


def test_chunks_cover_the_file_and_offsets_number_its_lines(tmp_path):
    path = tmp_path / "Obs.ndjson"
    lines = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * (i % 50)) for i in range(3000)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    chunks = plan_chunks([path], chunk_bytes=20_000)
    assert len(chunks) > 3 and all(c.first_line == 1 for c in chunks)
    offsets = line_offsets(chunks, {})  # nothing read yet: every chunk is counted from its bytes
    numbered = [(n + offsets[c.index], raw) for c in chunks for n, raw in read_lines(c)]
    assert numbered == list(enumerate(lines, start=1))
    counted = {c.index: len(list(read_lines(c))) for c in chunks}
    assert line_offsets(chunks, counted) == offsets
