"""Every YAML in configs/ loads into its typed class, and the evaluate config states the class defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _classes():
    from odyssey.finetune.evaluate import EvaluateConfig
    from odyssey.finetune.train import FinetuneConfig
    from odyssey.training.pretrain import PretrainConfig

    return {"evaluate.yaml": EvaluateConfig, "finetune.yaml": FinetuneConfig, "pretrain.yaml": PretrainConfig}


@pytest.mark.parametrize("name", ["evaluate.yaml", "finetune.yaml", "pretrain.yaml"])
def test_shipped_config_loads(name):
    config = _classes()[name].load(CONFIGS / name)
    assert set(yaml.safe_load((CONFIGS / name).read_text())) <= set(type(config).model_fields)


def test_evaluate_yaml_repeats_the_class_defaults():
    from odyssey.finetune.evaluate import EvaluateConfig

    assert EvaluateConfig.load(CONFIGS / "evaluate.yaml") == EvaluateConfig()
