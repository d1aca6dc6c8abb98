"""Vocabulary, special and time tokens, value binning, MEDS → token sequences."""
