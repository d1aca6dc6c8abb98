"""Integrated gradients (completeness, planted signal), their aggregation, and `odyssey explain` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import typer
from typer.testing import CliRunner

from odyssey.interpretability.attribution import (
    aggregate,
    bin_range,
    code_and_bin,
    code_category,
    code_family,
    event_mask_of,
    integrated_gradients,
    token_table,
)
from odyssey.models import EHRMambaConfig
from odyssey.models.modeling_ehrmamba_tasks import EHRMambaForTaskClassification
from odyssey.tokenizer import TokenType

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "time_embedding_size": 8, "scan_backend": "torch"}
VOCAB = 40
PROMPT = 7  # a token id standing for the task prompt in the hand-made models
FIRST_EVENT_ID = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def task_model(seed: int = 0, outputs: int = 1) -> EHRMambaForTaskClassification:
    torch.manual_seed(seed)
    config = EHRMambaConfig(vocab_size=VOCAB, task_names=["task"], task_outputs=[outputs],
                            task_prompt_ids=[[PROMPT + j for j in range(outputs)]], **TINY)
    return EHRMambaForTaskClassification(config)


def hand_input(ids: np.ndarray, prompt_width: int = 1) -> dict[str, np.ndarray]:
    """A prompted input: prompt, one visit of event tokens framed by [VS] .. [VE], prompt again."""
    length = ids.size + 2 * prompt_width + 2
    input_ids = np.concatenate([np.arange(PROMPT, PROMPT + prompt_width), [3], ids, [4],
                                np.arange(PROMPT, PROMPT + prompt_width)])
    types = np.full(length, int(TokenType.CONDITION))
    types[:prompt_width] = types[-prompt_width:] = int(TokenType.TASK)
    types[prompt_width] = types[-prompt_width - 1] = int(TokenType.SPECIAL)
    return {"input_ids": input_ids, "token_type_ids": types, "ages": np.linspace(60.0, 61.0, length),
            "times": np.linspace(0.0, 30.0, length), "visit_orders": np.ones(length, dtype=np.int64),
            "visit_segments": np.ones(length, dtype=np.int64)}


def test_completeness_attributions_sum_to_the_output_difference():
    model = task_model().double()
    with torch.no_grad():  # larger embeddings and head than at init, so that F(input) - F(baseline) is sizeable
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        model.get_input_embeddings().weight[model.config.pad_token_id].zero_()
        model.classifier.weight.normal_(0.0, 1.0)
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(20.0)
    ids = np.random.default_rng(0).integers(FIRST_EVENT_ID, VOCAB, size=40)
    inputs = hand_input(ids)
    result = integrated_gradients(model, inputs, task_index=0, n_steps=64)
    assert model.training  # left as found (it scores in eval mode: no dropout)

    model.eval()
    tensors = {k: torch.as_tensor(v)[None] for k, v in inputs.items()}
    baseline_ids = tensors["input_ids"].masked_fill(torch.as_tensor(event_mask_of(inputs["token_type_ids"]))[None], 0)
    with torch.no_grad():
        full = model(**tensors, task_index=torch.tensor([0])).logits[0, 0].item()
        blank = model(**{**tensors, "input_ids": baseline_ids}, task_index=torch.tensor([0])).logits[0, 0].item()
    difference = full - blank
    assert abs(difference) > 0.01
    assert result.logit == pytest.approx(full) and result.baseline_logit == pytest.approx(blank)
    assert result.scores.sum() == pytest.approx(difference, rel=1e-4)
    assert abs(result.convergence_delta) < 1e-4 * abs(difference)
    # Structural tokens (prompts, [VS], [VE]) equal their baseline: exactly zero.
    assert np.all(result.scores[~result.event_mask] == 0.0)
    assert np.count_nonzero(result.scores[result.event_mask]) == ids.size
    # More steps, better completeness (left Riemann sums converge as 1/n on this smooth path).
    coarse = integrated_gradients(model, inputs, task_index=0, n_steps=2)
    assert abs(coarse.scores.sum() - difference) > abs(result.scores.sum() - difference)


PLANTED = FIRST_EVENT_ID + 1
PLANTED_LENGTH = 12


@pytest.fixture(scope="module")
def planted_model() -> EHRMambaForTaskClassification:
    """A tiny model trained until its output is 'is token PLANTED in the sequence' (about 2 s)."""
    model = task_model(seed=1)
    rng = np.random.default_rng(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        ids = rng.integers(FIRST_EVENT_ID + 2, VOCAB, size=(32, PLANTED_LENGTH))
        labels = rng.random(32) < 0.5
        ids[labels, rng.integers(0, PLANTED_LENGTH, size=int(labels.sum()))] = PLANTED
        batch = [hand_input(row) for row in ids]
        tensors = {k: torch.as_tensor(np.stack([b[k] for b in batch])) for k in batch[0]}
        loss = model(**tensors, task_index=torch.zeros(32, dtype=torch.long),
                     labels=torch.as_tensor(labels, dtype=torch.float32)[:, None]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_a_planted_token_gets_the_largest_attribution(planted_model):
    ids = np.random.default_rng(2).integers(FIRST_EVENT_ID + 2, VOCAB, size=PLANTED_LENGTH)
    ids[5] = PLANTED
    inputs = hand_input(ids)
    result = integrated_gradients(planted_model, inputs, task_index=0, n_steps=32)
    assert result.probability > 0.8
    assert int(np.argmax(result.scores)) == int(np.flatnonzero(inputs["input_ids"] == PLANTED)[0])
    # This model's logit jumps within a small part of the path: 32 quadrature nodes miss much of the jump
    # (the completeness error says so); doubling the steps until the error is within 1% recovers it.
    difference = result.logit - result.baseline_logit
    assert difference > 1.0
    assert abs(result.scores.sum() - difference) > 0.1 * difference
    fine = integrated_gradients(planted_model, inputs, task_index=0, n_steps=32, internal_batch_size=256,
                                tolerance=1e-2, max_steps=2048)
    assert 64 <= fine.n_steps <= 2048  # at least one doubling was needed
    assert fine.scores.sum() == pytest.approx(difference, rel=1e-2)
    assert int(np.argmax(fine.scores)) == int(np.argmax(result.scores))
    # Without room to double, it stops at max_steps and the error shows.
    capped = integrated_gradients(planted_model, inputs, task_index=0, n_steps=32, tolerance=1e-2, max_steps=32)
    assert capped.n_steps == 32 and capped.scores.sum() == pytest.approx(result.scores.sum())


def test_multilabel_output_choice_and_range():
    model = task_model(outputs=3)
    inputs = hand_input(np.arange(FIRST_EVENT_ID, FIRST_EVENT_ID + 6), prompt_width=3)
    scores = [integrated_gradients(model, inputs, task_index=0, output=j, n_steps=4).scores for j in range(3)]
    assert not np.allclose(scores[0], scores[1])
    with pytest.raises(ValueError, match="3 outputs"):
        integrated_gradients(model, inputs, task_index=0, output=3)


def test_code_helpers():
    binned = {"LOINC//2160-0": "LOINC//2160-0"}
    assert code_and_bin("LOINC//2160-0_3", binned) == ("LOINC//2160-0", 3)
    assert code_and_bin("ICD10CM//E11_9", binned) == ("ICD10CM//E11_9", None)  # not a binned code
    assert code_family("ICD10CM//I50.9") == "ICD10CM" and code_family("[UNK]") == "[UNK]"
    assert code_category("ICD10CM//I50.9") == "ICD10CM//I50"
    assert code_category("ICD9CM//4280") == "ICD9CM//428"
    assert code_category("LOINC//2160-0") == "LOINC//2160-0"

    class Bins:
        bins = {"LOINC//2160-0": [0.8, 1.1, 1.6]}

    assert bin_range(Bins, "LOINC//2160-0", 0) == "<= 0.8"
    assert bin_range(Bins, "LOINC//2160-0", 2) == "1.1 to 1.6"
    assert bin_range(Bins, "LOINC//2160-0", 3) == "> 1.6"
    assert bin_range(Bins, "LOINC//2160-0", None) is None


# ----- on a small synthetic cohort with a finetuned tiny model ------------------------------------------


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from odyssey.finetune import finetune
    from odyssey.pipelines.ingest import ingest_fhir
    from odyssey.pipelines.labels import make_labels
    from odyssey.pipelines.synth import synthesize
    from odyssey.tokenizer import tokenize

    root = tmp_path_factory.mktemp("explain_cohort")
    synthesize(150, root / "fhir", seed=0, workers=1)
    ingest_fhir(root / "fhir", root / "meds", splits={"train": 0.5, "tuning": 0.25, "held_out": 0.25, "seed": 0},
                workers=1)
    tokenize(root / "meds", root / "seq", progress=False)
    make_labels(root / "meds", Path(__file__).resolve().parents[3] / "configs" / "tasks.yaml", root / "labels",
                progress=False)
    finetune(data=root / "seq", labels=root / "labels", out=root / "ft", tasks=["mortality_30d", "los_7d", "conditions"],
             model={k: v for k, v in TINY.items() if k != "scan_backend"}, scan_backend="torch", max_steps=4,
             batch_size=8, context_length=256, progress_bar=False)
    return root


def subject_with_admissions(root: Path) -> int:
    labels = pl.read_parquet(root / "labels" / "mortality_30d" / "labels.parquet")
    return int(labels["subject_id"].value_counts().sort("count", descending=True)["subject_id"][0])


def test_aggregates_add_up_and_match_the_timeline_events(finetuned):
    from odyssey.finetune import load_finetuned
    from odyssey.finetune.data import prompt_input
    from odyssey.tokenizer import EHRTokenizer, load_sequences
    from odyssey.viz import token_scores_to_events

    model, specs = load_finetuned(finetuned / "ft")
    tokenizer = EHRTokenizer.from_pretrained(finetuned / "seq" / "tokenizer")
    subject = subject_with_admissions(finetuned)
    row = load_sequences(finetuned / "seq").filter(pl.col("subject_id") == subject).row(0, named=True)
    time = pl.read_parquet(finetuned / "labels" / "mortality_30d" / "labels.parquet").filter(
        pl.col("subject_id") == subject)["prediction_time"].max()
    inputs = prompt_input(row, time, 256, specs[0].prompt_ids)
    scores = integrated_gradients(model, inputs, task_index=0, n_steps=8).scores
    # Scale up: a 4-step model's attributions are tiny; the sums below are exact identities anyway.
    scores = scores / np.abs(scores).max()
    table = token_table(inputs, scores, tokenizer)
    sums = aggregate(table)
    total = scores.sum()
    for name in ("events", "visits", "codes", "categories", "families"):
        assert sums[name]["score"].sum() == pytest.approx(total, abs=1e-9), name
        assert sums[name]["tokens"].sum() == int(table["is_event"].sum()), name
    assert sums["families"]["family"].to_list()  # vocabularies such as ICD9CM / MIMIC_LAB
    assert sums["visits"]["visit"].to_list() == sorted(set(table.filter("is_event")["visit"].to_list()))
    # Per-event sums agree with the timeline's own token -> event mapping.
    expected = token_scores_to_events(inputs, scores, tokenizer)
    got = {(t, c): s for t, c, s in sums["events"].select("time", "code", "score").iter_rows()}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(expected[k], abs=1e-12) for k in expected)
    # Binned lab tokens keep their bin; their code is the lab code.
    labs = table.filter(pl.col("value_bin").is_not_null())
    assert labs.height and all(code in tokenizer.bins for code in labs["code"].to_list())


def test_default_prediction_time_is_the_last_admissions_label(finetuned):
    from odyssey.interpretability.explain import last_admission_time
    from odyssey.tokenizer import EHRTokenizer, load_sequences

    tokenizer = EHRTokenizer.from_pretrained(finetuned / "seq" / "tokenizer")
    sequences = load_sequences(finetuned / "seq")
    checks = {"mortality_30d": ("discharge", 0.0), "los_7d": ("admission", 24.0)}
    for task, (anchor, hours) in checks.items():
        labels = pl.read_parquet(finetuned / "labels" / task / "labels.parquet")
        last = labels.group_by("subject_id").agg(pl.col("prediction_time").max())
        matches = 0
        for subject, label_time in last.iter_rows():
            row = sequences.filter(pl.col("subject_id") == subject).row(0, named=True)
            matches += last_admission_time(row, tokenizer, anchor, hours) == label_time
        # Labels skip some last admissions (in-hospital deaths, short stays); most must agree exactly.
        assert matches >= 0.8 * last.height, task


@pytest.fixture(scope="module")
def cli():
    from odyssey.cli.explain import register

    app = typer.Typer()
    register(app)

    @app.command(name="noop")
    def _noop() -> None:  # a second command keeps typer from collapsing the app into `explain`
        pass

    return app


def test_cli_writes_the_explanation(finetuned, cli, tmp_path):
    subject = subject_with_admissions(finetuned)
    out = tmp_path / "explained"
    result = CliRunner().invoke(cli, ["explain", "--model", str(finetuned / "ft"), "--data", str(finetuned / "seq"),
                                      "--task", "mortality_30d", "--subject", str(subject), "--out", str(out),
                                      "--steps", "16", "--top", "5"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "timeline.png", "timeline.svg",
                                                    "top_events.md"]
    report = json.loads((out / "explanation.json").read_text())
    assert report["task"] == "mortality_30d" and report["n_steps"] == 16
    assert 0.0 < report["probability"] < 1.0
    assert report["attribution_sum"] == pytest.approx(report["logit"] - report["baseline_logit"], abs=1e-4)
    assert len(report["top_events"]) == 5
    tokens = report["tokens"]
    assert sum(t["score"] for t in tokens) == pytest.approx(report["attribution_sum"], abs=1e-9)
    assert tokens[0]["token"] == tokens[-1]["token"] == "[MOR_1M]"  # prompted at both ends
    assert all(e["description"] and e["time"] for e in report["top_events"])
    # Descriptions come from codes.parquet: at least one top event is described in words, not as a code.
    assert any("//" not in e["description"] for e in report["top_events"])
    table = (out / "top_events.md").read_text()
    assert table.count("\n| ") == 1 + 5  # header + one row per top event
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "timeline.svg").read_text()
    assert "timeline:attribution" in svg and "timeline:risk" in svg
    # Risk over time by incremental scoring: one point per moment, oldest first, ending at the explained
    # prediction itself (the scorer's state path against the parallel forward).
    risk = report["risk_over_time"]
    assert len(risk) == report["risk_points"] > 1
    assert [r["time"] for r in risk] == sorted(r["time"] for r in risk)
    assert risk[-1]["probability"] == pytest.approx(report["probability"], rel=1e-5)
    assert len({r["time"] for r in risk}) == len(risk)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--subject", "12345", "subject 12345 has no sequence"),
    ("--task", "readmission_30d", "not finetuned on task 'readmission_30d'; it knows: mortality_30d, los_7d, conditions"),
    ("--time", "yesterday", "not an ISO date"),
    ("--output", "flu", "task 'mortality_30d' has no output 'flu'"),
])
def test_cli_bad_input_is_a_clear_error(finetuned, cli, tmp_path, option, value, message):
    args = {"--model": str(finetuned / "ft"), "--data": str(finetuned / "seq"), "--task": "mortality_30d",
            "--subject": str(subject_with_admissions(finetuned)), "--out": str(tmp_path / "out"), option: value}
    result = CliRunner().invoke(cli, ["explain", *[x for pair in args.items() for x in pair]])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_a_multilabel_task_explains_its_likeliest_output_or_the_one_asked(finetuned, tmp_path):
    from odyssey.finetune import load_finetuned
    from odyssey.finetune.data import prompt_input
    from odyssey.interpretability.explain import explain
    from odyssey.tokenizer import load_sequences

    subject = subject_with_admissions(finetuned)
    time = "2200-01-01T00:00"  # after every event: the whole history
    report = explain(finetuned / "ft", finetuned / "seq", "conditions", subject, tmp_path / "a", prediction_time=time,
                     n_steps=4, formats=("png",))
    model, specs = load_finetuned(finetuned / "ft")
    model.eval()
    row = load_sequences(finetuned / "seq").filter(pl.col("subject_id") == subject).row(0, named=True)
    inputs = prompt_input(row, time, 256, specs[2].prompt_ids)
    tensors = {k: torch.as_tensor(np.asarray(inputs[k]).astype(np.float32 if k in ("ages", "times") else np.int64))[None]
               for k in ("input_ids", "token_type_ids", "ages", "times", "visit_orders", "visit_segments")}
    with torch.no_grad():
        logits = model(**tensors, task_index=torch.tensor([2])).logits[0, :6]
    assert report.output == specs[2].output_names()[int(torch.argmax(logits))]
    assert report.logit == pytest.approx(float(logits.max()), abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["explanation.json", "timeline.png", "top_events.md"]
    # Without a MEDS dataset (none given, none named by the sequences' report): codes, no timeline, a note.
    import shutil

    bare_seq = shutil.copytree(finetuned / "seq", tmp_path / "seq", ignore=shutil.ignore_patterns("tokenize_report.json"))
    asked = explain(finetuned / "ft", bare_seq, "conditions", subject, tmp_path / "b", prediction_time=time,
                    output="copd", n_steps=4)
    assert asked.output == "conditions_copd"
    assert asked.files == ["explanation.json", "top_events.md"] and "no MEDS dataset" in asked.notes[0]
    assert all(e["description"].startswith(e["code"]) for e in asked.top_events)  # codes, not words
    with pytest.raises(ValueError, match="not a MEDS dataset"):
        explain(finetuned / "ft", finetuned / "seq", "conditions", subject, tmp_path / "c", meds_dir=tmp_path)
