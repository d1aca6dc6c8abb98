"""The MEDS v0.4 tables Odyssey writes, with Odyssey's extra columns, and the codes it emits.

Core names are those of the `meds` package (v0.4), spelled out so that importing this module does not
import `meds` (~0.05 CPU-s, paid by every ingest helper process); a test checks them against `meds`.
Odyssey adds optional columns that MEDS allows. Every stage reads these names from here: no stage spells a
column or code prefix itself.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa

SUBJECT_ID = "subject_id"  # meds.DataSchema.subject_id_name
TIME = "time"  # meds.DataSchema.time_name
CODE = "code"  # meds.DataSchema.code_name
NUMERIC_VALUE = "numeric_value"  # meds.DataSchema.numeric_value_name
TEXT_VALUE = "text_value"  # meds.DataSchema.text_value_name

# Odyssey's extra columns.
ENCOUNTER_ID = "encounter_id"  # int64 hash of the FHIR Encounter id; null when the event has none
UNIT = "unit"  # UCUM or source unit of numeric_value
COMPARATOR = "comparator"  # FHIR Quantity.comparator: <, <=, >=, >
EVENT_TYPE = "event_type"  # an EventType value
ISSUED = "issued"  # when a result became available (Observation.issued); null: available at `time`


class EventType(StrEnum):
    """What kind of fact a MEDS row records (drives token types downstream)."""

    BIRTH = "birth"
    DEATH = "death"
    DEMOGRAPHIC = "demographic"  # static rows such as gender (time is null)
    ENCOUNTER_START = "encounter_start"
    ENCOUNTER_END = "encounter_end"
    CONDITION = "condition"
    PROCEDURE = "procedure"
    MEDICATION = "medication"
    LAB = "lab"
    VITAL = "vital"
    OBSERVATION = "observation"  # any other Observation category


BIRTH_CODE = "MEDS_BIRTH"  # meds.birth_code
DEATH_CODE = "MEDS_DEATH"  # meds.death_code
GENDER_PREFIX = "GENDER"  # GENDER//female
ENCOUNTER_START_PREFIX = "ENCOUNTER_START"  # ENCOUNTER_START//IMP (class code); text_value: none
ENCOUNTER_END_PREFIX = "ENCOUNTER_END"  # ENCOUNTER_END//IMP (class code); text_value: discharge disposition
CODE_SEPARATOR = "//"

DATA_SCHEMA = pa.schema(
    [
        pa.field(SUBJECT_ID, pa.int64(), nullable=False),
        pa.field(TIME, pa.timestamp("us"), nullable=True),
        pa.field(CODE, pa.string(), nullable=False),
        pa.field(NUMERIC_VALUE, pa.float32(), nullable=True),
        pa.field(TEXT_VALUE, pa.large_string(), nullable=True),
        pa.field(ENCOUNTER_ID, pa.int64(), nullable=True),
        pa.field(UNIT, pa.string(), nullable=True),
        pa.field(COMPARATOR, pa.string(), nullable=True),
        pa.field(EVENT_TYPE, pa.string(), nullable=False),
        pa.field(ISSUED, pa.timestamp("us"), nullable=True),
    ]
)

DATA_DIR = "data"  # meds.data_subdirectory
CODES_FILE = "metadata/codes.parquet"  # meds.code_metadata_filepath
SPLITS_FILE = "metadata/subject_splits.parquet"  # meds.subject_splits_filepath
DATASET_FILE = "metadata/dataset.json"  # meds.dataset_metadata_filepath
SUBJECT_MAP_FILE = "metadata/subject_map.parquet"  # FHIR Patient id -> subject_id (stays beside the data)

TRAIN_SPLIT = "train"  # meds.train_split
TUNING_SPLIT = "tuning"  # meds.tuning_split
HELD_OUT_SPLIT = "held_out"  # meds.held_out_split


def make_code(prefix: str, value: str) -> str:
    return f"{prefix}{CODE_SEPARATOR}{value}"
