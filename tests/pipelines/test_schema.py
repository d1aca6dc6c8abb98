"""schema.py spells MEDS's names out (so that ingest helpers need not import `meds`): they must stay MEDS's."""

import subprocess
import sys

import meds

from odyssey.pipelines import schema


def test_core_names_are_the_meds_packages():
    ours_and_meds = [
        (schema.SUBJECT_ID, meds.DataSchema.subject_id_name), (schema.TIME, meds.DataSchema.time_name),
        (schema.CODE, meds.DataSchema.code_name), (schema.NUMERIC_VALUE, meds.DataSchema.numeric_value_name),
        (schema.TEXT_VALUE, meds.DataSchema.text_value_name), (schema.BIRTH_CODE, meds.birth_code),
        (schema.DEATH_CODE, meds.death_code), (schema.DATA_DIR, meds.data_subdirectory),
        (schema.CODES_FILE, meds.code_metadata_filepath), (schema.SPLITS_FILE, meds.subject_splits_filepath),
        (schema.DATASET_FILE, meds.dataset_metadata_filepath), (schema.TRAIN_SPLIT, meds.train_split),
        (schema.TUNING_SPLIT, meds.tuning_split), (schema.HELD_OUT_SPLIT, meds.held_out_split),
    ]
    assert [ours for ours, _ in ours_and_meds] == [theirs for _, theirs in ours_and_meds]


def test_the_ingest_helpers_modules_do_not_import_meds():
    code = ("import sys, odyssey.pipelines.ingest_read, odyssey.pipelines.ingest_resolve; "
            "print('meds' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
