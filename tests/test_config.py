"""Typed YAML configs: keys, types, overrides and validation errors."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from maskdecay_examples import yaml_config


@dataclass
class Train:
    steps: int = 100
    lr: float = 0.1
    amp: bool = False
    budgets: list[float] = field(default_factory=lambda: [0.5])
    strengths: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


@dataclass
class Cfg:
    name: str = "run"
    train: Train = field(default_factory=Train)


def test_defaults_yaml_and_overrides(tmp_path):
    assert yaml_config.load_config(Cfg) == Cfg()
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  steps: 5\n  lr: 1\n  budgets: [0.25, 0.75]\n  strengths: {l1: 0.01}\n")
    cfg = yaml_config.load_config(Cfg, path, ["train.amp=true", "train.checkpoint=t.pt", "train.lr=2e-3"])
    assert cfg == Cfg("x", Train(5, 0.002, True, [0.25, 0.75], {"l1": 0.01}, "t.pt"))
    assert isinstance(yaml_config.load_config(Cfg, path).train.lr, float)


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  stepz: 5\n", [], "unknown key 'train.stepz' (did you mean 'steps'?)"),
    ("trian: {}\n", [], "unknown key 'trian' (did you mean 'train'?)"),
    ("train:\n  steps: 5.5\n", [], "train.steps: expected an integer"),
    ("train:\n  steps: true\n", [], "train.steps: expected an integer"),
    ("train:\n  lr: .nan\n", [], "train.lr: expected a finite number"),
    ("train:\n  budgets: 0.5\n", [], "train.budgets: expected a list"),
    ("train:\n  budgets: [0.5, x]\n", [], "train.budgets[1]: expected a number"),
    ("train: 3\n", [], "train: expected a mapping"),
    ("train:\n  steps: 0\n", [], "train: steps must be >= 1"),
    ("- a\n", [], "expected a mapping at the top level"),
    ("train: [\n", [], "not valid YAML"),
    ("", ["train.steps"], "SECTION.KEY=VALUE"),
    ("", ["name.x=1"], "name: expected a string"),
    ("name: a\n", ["name.x=1"], "'name' is not a section"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(yaml_config.ConfigError) as e:
        yaml_config.load_config(Cfg, path, overrides)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_file():
    with pytest.raises(ValueError, match="cannot read config"):
        yaml_config.load_config(Cfg, "/nonexistent/c.yaml")
