"""EHRTokenizer: fixed special ids, save/load, and the round trip through transformers."""

import pytest
from transformers import PreTrainedTokenizerFast

from odyssey.tokenizer import EHRTokenizer, SpecialTokens, TokenType
from odyssey.tokenizer.ehr_tokenizer import EXTRA_FILE, TOKENIZER_FILE

WORDS = ["ICD10CM//I50.9", "LOINC//2160-0", "LOINC//2160-0_0", "LOINC//2160-0_1", "GENDER//female"]
TYPES = [TokenType.CONDITION, TokenType.LAB, TokenType.LAB, TokenType.LAB, TokenType.DEMOGRAPHIC]


@pytest.fixture
def tokenizer():
    return EHRTokenizer(
        WORDS, TYPES, bins={"LOINC//2160-0": [1.1]}, settings={"n_bins": 2}, extra_task_tokens=["[SEPSIS_7D]"]
    )


def test_ids_and_types(tokenizer):
    assert tokenizer.pad_token_id == SpecialTokens.PAD == 0
    assert tokenizer.cls_token_id == SpecialTokens.CLS
    assert tokenizer.token_to_id("[MOR_1M]") == SpecialTokens.MOR_1M
    assert tokenizer.token_to_id("[SEPSIS_7D]") == len(SpecialTokens)
    assert tokenizer.token_to_id(WORDS[0]) == len(SpecialTokens) + 1
    assert len(tokenizer) == tokenizer.vocab_size == len(SpecialTokens) + 1 + len(WORDS)
    assert tokenizer.token_type(tokenizer.token_to_id("[SEPSIS_7D]")) is TokenType.TASK
    assert tokenizer.token_type(SpecialTokens.W_2) is TokenType.TIME_GAP
    assert tokenizer.token_type(tokenizer.token_to_id("LOINC//2160-0_1")) is TokenType.LAB
    assert tokenizer.encode(["[CLS]", "nope", WORDS[4]]) == [SpecialTokens.CLS, SpecialTokens.UNK, 38]


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = EHRTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.token_types == tokenizer.token_types
    assert loaded.bins == tokenizer.bins
    assert loaded.settings == tokenizer.settings
    assert loaded.extra_task_tokens == ["[SEPSIS_7D]"]


def test_round_trip_through_pretrained_tokenizer_fast(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / TOKENIZER_FILE), **EHRTokenizer.hf_special_kwargs())
    words = ["[CLS]", "[VS]", "ENCOUNTER_START//IMP", *WORDS, "[VE]", "[REG]", "[W_3]", "[MOR_1M]", "[SEPSIS_7D]"]
    ids = hf(" ".join(words), add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(words)
    assert ids[2] == SpecialTokens.UNK  # not in the vocabulary
    assert hf.convert_ids_to_tokens(ids) == tokenizer.decode(ids)
    assert hf.pad_token_id == tokenizer.pad_token_id and hf.cls_token_id == tokenizer.cls_token_id
    assert len(hf) == len(tokenizer)
    in_memory = tokenizer.to_transformers()
    assert in_memory(" ".join(words), add_special_tokens=False)["input_ids"] == ids


def test_from_pretrained_rejects_foreign_folders(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=EXTRA_FILE):
        EHRTokenizer.from_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    extra = tmp_path / EXTRA_FILE
    extra.write_text(extra.read_text().replace('"CLS": 2', '"CLS": 9'))
    with pytest.raises(ValueError, match="special token ids"):
        EHRTokenizer.from_pretrained(tmp_path)
