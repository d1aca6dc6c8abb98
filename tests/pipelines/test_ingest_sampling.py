"""In sample mode only one process validates: the helpers flatten their sampled resources as if valid and
hand them back (ingest_read.ChunkResult.unverified); the calling process checks them, and a chunk whose
sample holds a resource that fails is read again by a process that validates as it reads. The dataset,
rejects and counts are the ones of a run where every process validates its own chunks."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from fhir_builders import dataset_digests, encounter, lab, patient, write_ndjson

from odyssey.pipelines.fhir_sources import discover, plan_chunks
from odyssey.pipelines.ingest import ingest_fhir, load_code_systems
from odyssey.pipelines.ingest_read import ChunkReader, ReadSettings, SampleChecker

R4B_REFUSES = {"foo": 1}  # an element R4B does not know: the structural checks accept it, R4B does not


def _bundle(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}


def _export(folder: Path, invalid_every: int | None) -> Path:
    """~2.5 MB of labs (several 1 MB chunks) with a resource R4B refuses every `invalid_every` lines (None:
    none), and a Bundle with one such entry."""
    write_ndjson(folder / "Patient.ndjson", [patient("a"), patient("b")])
    labs = [lab(f"o{i}", "ab"[i % 2], "e1", f"2150-01-0{1 + i % 9}T00:00:00Z", float(i)) for i in range(8000)]
    for i in _refused(invalid_every):
        labs[i] = {**labs[i], **R4B_REFUSES}
    write_ndjson(folder / "Observation.ndjson", labs)
    write_ndjson(folder / "Encounter.ndjson", [encounter("e1", "a", "2150-01-01T00:00:00Z", "2150-01-09T00:00:00Z")])
    entries = [lab("b1", "a", None, "2150-02-01T00:00:00Z"), {**lab("b2", "b", None, "2150-02-02T00:00:00Z"),
                                                               **R4B_REFUSES}]
    write_ndjson(folder / "bundles.ndjson", [_bundle(entries)])
    return folder


def _refused(invalid_every: int | None) -> range:
    return range(0, 8000, invalid_every) if invalid_every else range(0)



def _counts(report) -> dict:
    return {name: (c.read, c.written, c.rejected, c.skipped, c.rejected_reasons) for name, c in
            report.resource_types.items()}


@pytest.mark.parametrize("compiled_reader", [True, False])
@pytest.mark.parametrize("invalid_every", [7, None])
def test_one_validating_process_gives_the_same_dataset(tmp_path, compiled_reader, invalid_every):
    """Every line sampled (sample_every=1): the chunks the helper read with a refused resource are read
    again; without refused labs, the helper's chunks pass the caller's check as they are."""
    folder = _export(tmp_path / "in", invalid_every)
    options = {"chunk_mb": 1, "sample_every": 1, "compiled_reader": compiled_reader}
    alone = ingest_fhir([folder], tmp_path / "alone", workers=1, **options)
    shared = ingest_fhir([folder], tmp_path / "shared", workers=2, **options)
    assert dataset_digests(tmp_path / "shared") == dataset_digests(tmp_path / "alone")
    assert _counts(shared) == _counts(alone)
    assert shared.validated_resources == alone.validated_resources == 8000 + 2 + 1 + 2
    refused = alone.resource_types["Observation"].rejected_reasons
    assert sum(n for reason, n in refused.items() if reason.startswith("fails FHIR R4B validation")) == (
        len(_refused(invalid_every)) + 1)


def test_a_helper_flattens_its_sample_unvalidated_and_the_checker_finds_the_refused(tmp_path):
    folder = _export(tmp_path / "in", 7)
    (chunk,) = [c for c in plan_chunks(discover([folder]), 64 << 20) if str(c.path).endswith("Observation.ndjson")]
    settings = ReadSettings(systems=load_code_systems(), subject_buckets=1, key_buckets=4, validate="sample",
                            sample_every=1, strict=False, spill_dir=str(tmp_path / "spill"))
    another_process = replace(settings, validating_process=os.getpid() + 1)
    here = ChunkReader(chunk, settings)
    validated_here = here.run()
    helper = ChunkReader(chunk, another_process)
    deferred = helper.run()
    assert helper.validator._classes == {}  # fhir.resources never consulted
    assert not deferred.problems and len(deferred.unverified) == deferred.validated == 8000
    assert [(line, entry) for line, entry, _ in deferred.unverified] == [(n, 0) for n in range(1, 8001)]
    assert orjson.loads(deferred.unverified[7][2])["id"] == "o7"
    assert len(validated_here.problems) == len(range(0, 8000, 7)) and not validated_here.unverified
    assert not SampleChecker().all_pass(deferred)
    deferred.unverified = [item for item in deferred.unverified if b'"foo"' not in item[2]]
    assert SampleChecker().all_pass(deferred)
