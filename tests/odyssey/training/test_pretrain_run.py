"""End-to-end pretraining on the synthetic sequences: the tuning loss falls, a crash + resume replays the run."""

import math

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from odyssey.config import ConfigError
from odyssey.io import read_json
from odyssey.models import EHRMambaForPretraining
from odyssey.training.data import SequenceCollator, SequenceDataset, read_sequences, read_vocabulary
from odyssey.training.pretrain import PretrainConfig, pretrain

SMALL_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "time_embedding_size": 8}


def run_config(data, out, **overrides) -> PretrainConfig:
    settings = dict(
        data=data, out=out, model=SMALL_MODEL, batch_size=4, learning_rate=5e-3, warmup_steps=0,
        max_steps=12, eval_steps=100, save_steps=100, logging_steps=4, progress_bar=False, seed=7,
    )
    settings.update(overrides)
    return PretrainConfig(**settings)


def test_tuning_loss_falls_and_run_folder_is_complete(sequences_dir, tmp_path):
    untrained = pretrain(run_config(sequences_dir, tmp_path / "zero", max_steps=1, learning_rate=1e-9))
    trained = pretrain(run_config(sequences_dir, tmp_path / "run", max_steps=40, eval_steps=20, save_steps=20))
    assert trained.steps == 40
    assert trained.tuning_loss < untrained.tuning_loss - 1.0
    assert trained.tuning_perplexity == pytest.approx(math.exp(trained.tuning_loss), rel=1e-6)
    assert trained.train_tokens > 0 and trained.tokens_per_second > 0
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").exists() and (run / "model" / "tokenizer" / "tokenizer.json").exists()
    assert not list((run / "model").glob("*.bin"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-20", "checkpoint-40"]
    # No pickled training arguments anywhere in the run folder (transformers writes one by default).
    assert not list(run.rglob("training_args.bin"))
    tags = set()
    for events in (run / "logs").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/perplexity"} <= tags
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "logs", "model", "pretrain_report.json"]
    assert not (run / "checkpoints" / "runs").exists()
    report = read_json(run / "pretrain_report.json")
    assert report["tuning_loss"] == pytest.approx(trained.tuning_loss) and report["config"]["max_steps"] == 40
    model = EHRMambaForPretraining.from_pretrained(run / "model").eval()
    assert model.config.hidden_size == 32 and model.config.vocab_size == 54
    assert trained.tuning_loss == pytest.approx(token_weighted_loss(model, sequences_dir), rel=1e-5)


def token_weighted_loss(model, sequences_dir) -> float:
    """Mean next-token loss over every tuning token, one sequence at a time (no padding at all)."""
    vocabulary = read_vocabulary(sequences_dir)
    dataset = SequenceDataset(read_sequences(sequences_dir, "tuning"), vocabulary, 2048, "windows")
    collate = SequenceCollator(vocabulary.pad_id, pad_to_multiple_of=1)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = collate([dataset[i]])
            labels = batch.pop("labels")
            count = int(labels[:, 1:].ne(-100).sum())
            total += model(**batch, labels=labels).loss.item() * count
            tokens += count
    return total / tokens


class CrashAt(TrainerCallback):
    """Raises once `step` optimizer steps are done and saved, like a killed job."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(sequences_dir, tmp_path):
    # Dropout stays on (default 0.1), so RNG state restore is part of what is checked.
    settings = dict(max_steps=8, save_steps=3, batch_size=4, gradient_accumulation_steps=2)
    straight = pretrain(run_config(sequences_dir, tmp_path / "straight", **settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(run_config(sequences_dir, tmp_path / "crashed", **settings), callbacks=[CrashAt(5)])
    assert (tmp_path / "crashed" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "crashed" / "model").exists()
    with pytest.raises(ValueError, match="already has checkpoints"):
        pretrain(run_config(sequences_dir, tmp_path / "crashed", **settings))
    resumed = pretrain(run_config(sequences_dir, tmp_path / "crashed", resume=True, **settings))
    assert resumed.resumed_from == "checkpoint-3" and resumed.steps == straight.steps == 8
    assert resumed.tuning_loss == pytest.approx(straight.tuning_loss, rel=1e-5)
    assert resumed.train_tokens == straight.train_tokens  # tokens over the whole run, both sessions
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name


class SpoilWeightsAfter(TrainerCallback):
    """Adds noise to every weight after a step, so that the tuning loss is worse from then on."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for weight in model.parameters():
                    weight.add_(torch.randn(weight.shape, generator=generator) * 0.5)


def test_keep_best_saves_the_checkpoint_with_the_lowest_tuning_loss(sequences_dir, tmp_path):
    settings = dict(max_steps=8, eval_steps=2, save_steps=2, save_total_limit=2)
    last = pretrain(run_config(sequences_dir, tmp_path / "last", **settings), callbacks=[SpoilWeightsAfter(3)])
    best = pretrain(run_config(sequences_dir, tmp_path / "best", keep_best=True, **settings),
                    callbacks=[SpoilWeightsAfter(3)])
    losses = {entry["step"]: entry["tuning_loss"] for entry in best.tuning_history}
    assert sorted(losses) == [2, 4, 6, 8] and losses == {e["step"]: e["tuning_loss"] for e in last.tuning_history}
    assert min(losses[4], losses[6], losses[8]) > losses[2]  # the weights spoiled after step 3 score worse
    assert best.best_step == 2
    assert best.tuning_loss == pytest.approx(losses[best.best_step], rel=1e-6)
    assert last.best_step is None and last.tuning_loss == pytest.approx(losses[8], rel=1e-6)
    kept = load_file(tmp_path / "best" / "model" / "model.safetensors")
    checkpoint = load_file(tmp_path / "best" / "checkpoints" / f"checkpoint-{best.best_step}" / "model.safetensors")
    assert all(torch.equal(kept[name], checkpoint[name]) for name in kept)
    report = read_json(tmp_path / "best" / "pretrain_report.json")
    assert report["best_step"] == best.best_step and len(report["tuning_history"]) == 4


class RecordCheckpointing(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.enabled = [layer.gradient_checkpointing for layer in model.backbone.layers]


@pytest.mark.slow
def test_gradient_checkpointing_is_on_and_changes_nothing_but_memory(sequences_dir, tmp_path):
    settings = dict(max_steps=3, model={**SMALL_MODEL, "embedding_dropout": 0.0})
    plain = pretrain(run_config(sequences_dir, tmp_path / "plain", **settings))
    record = RecordCheckpointing()
    checkpointed = pretrain(run_config(sequences_dir, tmp_path / "gc", gradient_checkpointing=True, **settings),
                            callbacks=[record])
    assert record.enabled == [True, True]
    assert checkpointed.tuning_loss == pytest.approx(plain.tuning_loss, rel=1e-5)


def test_config_errors_are_clear(sequences_dir, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        pretrain(run_config(sequences_dir, tmp_path / "new", resume=True))
    with pytest.raises(ValueError, match="needs both"):
        pretrain(PretrainConfig())
    with pytest.raises(ValueError, match="unknown scan_backend 'cuda'"):
        PretrainConfig(scan_backend="cuda")
    with pytest.raises(ValueError, match="unknown model_size"):
        PretrainConfig(model_size="gigantic")
    with pytest.raises(ValueError, match="less than or equal to 65536"):
        PretrainConfig(context_length=70_000)
    with pytest.raises(ValueError, match=r"unknown or tokenizer-owned EHRMambaConfig fields \['hidden_sise'\]"):
        PretrainConfig(model={"hidden_sise": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        PretrainConfig(model={"vocab_size": 8})
    with pytest.raises(ValueError, match=r"keep_best needs save_steps \(30\) to be a multiple of eval_steps \(20\)"):
        PretrainConfig(keep_best=True, eval_steps=20, save_steps=30)
    config = tmp_path / "bad.yaml"
    config.write_text("batch_size: 4\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        PretrainConfig.load(config)
