import tomllib
from pathlib import Path

import pytest

from task.run_settings import FederationSettings, RunSettings
from task.settings import DataSettings, LoraSettings, ModelSettings, TaskSettings, TrainSettings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_matches_the_code_defaults():
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(config) == RunSettings.keys()
    defaults = RunSettings.from_run_config({}).to_dict()
    parsed = RunSettings.from_run_config(config).to_dict()
    assert parsed == defaults


def test_unknown_key_lists_known_ones():
    message = r"unknown setting\(s\) \['lora-rnak'\]; known settings: .*lora-rank"
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config({"lora-rnak": 4})


def test_string_values_are_typed():
    settings = RunSettings.from_run_config({"lora-rank": "4", "learning-rate": "0.01",
                                            "num-rounds": "3"})
    assert settings.task.lora.lora_rank == 4
    assert settings.task.train.learning_rate == 0.01
    assert settings.federation.num_rounds == 3


def test_seed_reaches_every_part():
    settings = RunSettings.from_run_config({"seed": 7})
    assert settings.federation.seed == settings.task.data.seed == settings.task.train.seed == 7


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (LoraSettings, {"lora_rank": 0}, "lora-rank must be at least 1, got 0"),
        (LoraSettings, {"lora_alpha": -1.0}, "lora-alpha must be positive"),
        (TrainSettings, {"local_steps": 5, "local_epochs": 1}, "exactly one of local-steps"),
        (TrainSettings, {"learning_rate": 0.0}, "learning-rate must be positive"),
        (DataSettings, {"partitioner": "zipf"}, "partitioner must be one of"),
        (DataSettings, {"test_fraction": 1.0}, "test-fraction must be in"),
        (DataSettings, {"partitioner": "natural"}, "needs partition-by"),
        (ModelSettings, {"task": "vision"}, "task must be one of"),
        (FederationSettings, {"num_rounds": 0}, "num-rounds must be at least 1"),
        (FederationSettings, {"fraction_train": 1.5}, "fraction-train must be in"),
    ],
)
def test_bad_values_name_the_setting(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_wrong_type_names_the_key():
    with pytest.raises(ValueError, match="lora-rank must be of type int, got 'eight'"):
        TaskSettings.from_run_config({"lora-rank": "eight"})


def test_target_modules_list_and_all_linear():
    assert LoraSettings(target_modules="query, value").target_module_list() == ["query", "value"]
    assert LoraSettings(target_modules="all-linear").target_module_list() == "all-linear"


@pytest.mark.parametrize(("model_type", "expected"), [
    ("bert", ["query", "value"]), ("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"]),
    ("qwen2", ["q_proj", "v_proj"])])
def test_auto_target_modules_follow_the_architecture(model_type, expected):
    assert LoraSettings().target_module_list(model_type) == expected


def test_auto_target_modules_of_an_unknown_architecture_ask_for_the_setting():
    with pytest.raises(ValueError, match="set target-modules"):
        LoraSettings().target_module_list("mystery")
