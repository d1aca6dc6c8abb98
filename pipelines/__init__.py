"""FHIR → MEDS ingestion, MEDS reading and writing, synthetic cohorts, task labels."""
