"""The compiled reader is built where a C compiler exists: its build is optional (an install without a
compiler still works), so a failed build would otherwise only show as slower ingestion and skipped tests."""

from __future__ import annotations

import shutil

import pytest

from odyssey.pipelines import fhir_scan


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_extension_is_built_and_current():
    assert fhir_scan.AVAILABLE, fhir_scan.IMPORT_ERROR
