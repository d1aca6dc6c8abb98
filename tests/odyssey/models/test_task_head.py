"""EHRMambaForTaskClassification: which hidden states the head reads, its loss, and loading a backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from odyssey.models import EHRMambaConfig, EHRMambaForPretraining, EHRMambaForTaskClassification

VOCAB = 60
BINARY_TOKEN, GROUP_TOKENS = 24, [27, 28, 29]


def _config(**overrides) -> EHRMambaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, time_embedding_size=8,
                  scan_backend="torch", embedding_dropout=0.0, task_names=["mortality", "conditions"],
                  task_outputs=[1, 3], task_prompt_ids=[[BINARY_TOKEN], GROUP_TOKENS])
    return EHRMambaConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def model() -> EHRMambaForTaskClassification:
    torch.manual_seed(0)
    return EHRMambaForTaskClassification(_config()).eval()


def _manual_logit(model, hidden: torch.Tensor, position: int, row: int) -> torch.Tensor:
    return hidden[position] @ model.classifier.weight[row] + model.classifier.bias[row]


def test_binary_head_reads_last_real_token_and_ignores_padding(model):
    torch.manual_seed(1)
    ids = torch.randint(33, VOCAB, (1, 9))
    ids[0, -1] = BINARY_TOKEN
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone = model(ids, task_index=torch.tensor([0]))
        with_padding = model(padded, task_index=torch.tensor([0]), attention_mask=mask)
        hidden = model.backbone(ids).last_hidden_state[0]
    expected = _manual_logit(model, hidden, 8, 0)
    torch.testing.assert_close(alone.logits[0, 0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_padding.logits[0, 0], expected, rtol=1e-5, atol=1e-6)
    assert alone.output_mask.tolist() == [[True, False, False]]


def test_multilabel_head_reads_one_trailing_prompt_token_per_group(model):
    torch.manual_seed(2)
    ids = torch.randint(33, VOCAB, (2, 12))
    ids[1, -3:] = torch.tensor(GROUP_TOKENS)
    ids[0, 6] = BINARY_TOKEN
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        out = model(ids, task_index=torch.tensor([0, 1]), attention_mask=mask)
        hidden = model.backbone(ids[1:]).last_hidden_state[0]
    for j in range(3):  # conditions' rows follow mortality's one row in the classifier
        torch.testing.assert_close(out.logits[1, j], _manual_logit(model, hidden, 9 + j, 1 + j), rtol=1e-5, atol=1e-6)
    assert out.output_mask.tolist() == [[True, False, False], [True, True, True]]
    assert out.logits[0, 1:].abs().sum() == 0


def test_loss_is_task_weighted_mean_of_per_example_summed_masked_bce():
    torch.manual_seed(3)
    weighted = EHRMambaForTaskClassification(_config(task_loss_weights=[2.0, 0.5])).eval()
    ids = torch.randint(33, VOCAB, (3, 10))
    labels = torch.tensor([[1.0, 0, 0], [0.0, 1, 1], [1.0, 1, 0]])
    label_mask = torch.tensor([[True, False, False], [True, False, True], [True, True, True]])
    task_index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = weighted(ids, task_index=task_index, labels=labels, label_mask=label_mask)
    bce = F.binary_cross_entropy_with_logits(out.logits, labels, reduction="none")
    per_example = torch.stack([bce[0, :1].sum(), bce[1, [0, 2]].sum(), bce[2].sum()])  # summed over outputs
    weights = torch.tensor([2.0, 0.5, 0.5])
    torch.testing.assert_close(out.loss, (per_example * weights).sum() / weights.sum())


def test_from_backbone_loads_pretrained_weights_and_round_trips(tmp_path):
    torch.manual_seed(4)
    config = _config()
    pretrained = EHRMambaForPretraining(EHRMambaConfig(**{k: v for k, v in config.to_dict().items()
                                                          if not k.startswith("task_")}))
    pretrained.save_pretrained(tmp_path / "run")
    model = EHRMambaForTaskClassification.from_backbone(
        tmp_path / "run", task_names=["mortality"], task_outputs=[1], task_prompt_ids=[[BINARY_TOKEN]]
    ).eval()
    for name, tensor in pretrained.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor, msg=name)
    ids = torch.randint(33, VOCAB, (2, 7))
    model.save_pretrained(tmp_path / "task")
    again = EHRMambaForTaskClassification.from_pretrained(tmp_path / "task").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, task_index=torch.zeros(2, dtype=torch.long)).logits,
                                   model(ids, task_index=torch.zeros(2, dtype=torch.long)).logits)


def test_from_backbone_refuses_a_checkpoint_missing_backbone_weights(tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    config = EHRMambaConfig(**{k: v for k, v in _config().to_dict().items() if not k.startswith("task_")})
    EHRMambaForPretraining(config).save_pretrained(tmp_path / "run")
    layout = dict(task_names=["mortality"], task_outputs=[1], task_prompt_ids=[[BINARY_TOKEN]])
    EHRMambaForTaskClassification.from_backbone(tmp_path / "run", **layout)
    # The head is expected to be new: no load report full of "MISSING" is printed for it.
    captured = capfd.readouterr()
    assert "MISSING" not in captured.out + captured.err
    weights = tmp_path / "run" / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if ".layers.1." not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks backbone weights"):
        EHRMambaForTaskClassification.from_backbone(tmp_path / "run", **layout)


def test_inconsistent_task_layout_is_rejected():
    with pytest.raises(ValueError, match="outputs need as many prompt tokens"):
        EHRMambaForTaskClassification(_config(task_outputs=[1, 2]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        EHRMambaForTaskClassification(_config(task_prompt_ids=[[VOCAB + 1], GROUP_TOKENS]))
    with pytest.raises(ValueError, match="shorter than its task prompt"):
        model = EHRMambaForTaskClassification(_config())
        model(torch.randint(33, VOCAB, (1, 2)), task_index=torch.tensor([1]))
