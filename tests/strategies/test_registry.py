"""The registry: one home for each strategy's settings, checked against what is committed."""

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulations.settings_reference import markdown, strategy_settings
from strategies import FedIT, StrategyConfig, available_strategies, get_strategy_class
from strategies.config import ConfigError, setting
from strategies.hetero import RankConfig
from strategies.registry import register_strategy, strategy_keys
from task.run_settings import RunSettings

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_committed_reference_is_generated_from_the_code():
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == markdown(), (
        "docs/settings.md is stale: run "
        "`python -m simulations.settings_reference > docs/settings.md`")


def test_the_reference_covers_every_setting_with_its_help():
    text = markdown()
    for key in RunSettings.keys():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
        assert len(rows) == 1, f"{key} is listed {len(rows)} times in the settings reference"
        assert not rows[0].rstrip().endswith("|  |"), f"{key} has no help text"


def test_pyproject_declares_every_strategy_setting_with_the_registrys_default():
    declared = _declared()
    for key, (default, _, owner) in strategy_settings().items():
        assert key in declared, f"{key} ({owner}) is missing from [tool.flwr.app.config]"
        assert declared[key] == default, f"{key}: pyproject says {declared[key]!r}, the " \
            f"config class {default!r}"


def test_pyproject_declares_every_setting_with_the_codes_default():
    from simulations.settings_reference import groups
    from strategies.config import settings_help

    declared = _declared()
    for _, classes in groups():
        for cls in classes:
            for key, (default, _) in settings_help(cls).items():
                assert declared.get(key) == default, \
                    f"{key}: pyproject says {declared.get(key)!r}, {cls.__name__} {default!r}"


def test_pyproject_declares_only_settings_the_code_reads():
    assert set(_declared()) == RunSettings.keys()


def test_every_strategy_is_registered_with_a_config_class_and_hooks():
    for name in available_strategies():
        cls = get_strategy_class(name)
        assert cls.name == name and issubclass(cls.config_class, StrategyConfig)
        cls.config_class()  # the defaults are valid
        assert hasattr(cls.client_hooks, "after_training")


def test_the_run_carries_the_chosen_strategys_typed_config():
    settings = RunSettings.from_run_config({"strategy": "hetlora", "hetlora-lambda": "0.5",
                                            "slora-rounds": 1})
    assert settings.strategy.hetlora_lambda == 0.5  # typed once, here
    flat = settings.to_dict()
    assert flat["hetlora-lambda"] == 0.5 and "slora-rounds" not in flat  # only its own
    with pytest.raises(ConfigError, match="hetlora-gamma must be in"):
        RunSettings.from_run_config({"strategy": "hetlora", "hetlora-gamma": 2})
    with pytest.raises(ConfigError, match="slora-rounds \\(5\\) must be below num-rounds"):
        RunSettings.from_run_config({"strategy": "slora", "slora-rounds": 5})
    with pytest.raises(ConfigError, match="client rank 16 is above the maximum rank 8"):
        RunSettings.from_run_config({"strategy": "hetlora", "client-ranks": "16,8"})


@pytest.fixture
def scratch_registry():
    """Strategies registered by a test are removed after it."""
    from strategies import registry

    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def test_two_strategies_cannot_give_one_key_two_meanings(scratch_registry):
    @dataclass(frozen=True)
    class Clashing(StrategyConfig):
        rank_choices: str = setting("", "not the rank plan's")

    with pytest.raises(ValueError, match="already defined by"):
        @register_strategy("clashing-test")
        class ClashingStrategy(FedIT):
            config_class = Clashing

    @dataclass(frozen=True)
    class Sharing(RankConfig):  # the rank plan's keys, by inheritance: one meaning
        sharing_test_level: int = setting(1, "a new key")

    @register_strategy("sharing-test")
    class SharingStrategy(FedIT):
        config_class = Sharing

    assert "sharing-test-level" in strategy_keys()
