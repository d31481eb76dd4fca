"""What a user sees: each log line once, no DEBUG by default, no warnings fedlora causes."""

import subprocess
import sys
import warnings


def test_each_flower_log_line_prints_once_and_debug_stays_hidden():
    """Opacus' import-time ``logging.basicConfig`` would print every Flower line twice."""
    code = ("import logging\n"
            "import privacy.accounting, task.dp_training\n"
            "from flwr.supercore import log\n"
            "log(logging.INFO, 'round-line-marker')\n"
            "log(logging.DEBUG, 'debug-line-marker')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    text = out.stdout + out.stderr
    assert text.count("round-line-marker") == 1, text
    assert "debug-line-marker" not in text


def test_building_an_adapter_raises_no_deprecation_warning(tiny_bert_dir):
    from task.model import attach_lora, load_base_model
    from task.settings import LoraSettings, ModelSettings

    model = load_base_model(ModelSettings(model=str(tiny_bert_dir)), num_labels=3, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach_lora(model, LoraSettings(lora_rank=2), "classification", seed=0)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_activation_checkpointing_is_enabled_without_the_deprecated_alias(tiny_bert_dir):
    from task.model import enable_checkpointing, load_base_model
    from task.settings import ModelSettings

    model = load_base_model(ModelSettings(model=str(tiny_bert_dir)), num_labels=3, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_checkpointing(model)
    assert model.is_activation_checkpointing
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
