"""The MEDS v0.4 tables Odyssey writes, with Odyssey's extra columns, and the codes it emits.

Core columns come from the `meds` package; Odyssey adds optional columns that MEDS allows.
Every stage reads these names from here: no stage spells a column or code prefix itself.
"""

from __future__ import annotations

from enum import StrEnum

import meds
import pyarrow as pa

SUBJECT_ID = meds.DataSchema.subject_id_name  # "subject_id"
TIME = meds.DataSchema.time_name  # "time"
CODE = meds.DataSchema.code_name  # "code"
NUMERIC_VALUE = meds.DataSchema.numeric_value_name  # "numeric_value"
TEXT_VALUE = meds.DataSchema.text_value_name  # "text_value"

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


BIRTH_CODE = meds.birth_code  # "MEDS_BIRTH"
DEATH_CODE = meds.death_code  # "MEDS_DEATH"
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

DATA_DIR = meds.data_subdirectory  # "data"
CODES_FILE = meds.code_metadata_filepath  # "metadata/codes.parquet"
SPLITS_FILE = meds.subject_splits_filepath  # "metadata/subject_splits.parquet"
DATASET_FILE = meds.dataset_metadata_filepath  # "metadata/dataset.json"
SUBJECT_MAP_FILE = "metadata/subject_map.parquet"  # FHIR Patient id -> subject_id (stays beside the data)

TRAIN_SPLIT = meds.train_split
TUNING_SPLIT = meds.tuning_split
HELD_OUT_SPLIT = meds.held_out_split


def make_code(prefix: str, value: str) -> str:
    return f"{prefix}{CODE_SEPARATOR}{value}"
