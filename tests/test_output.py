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


def test_the_live_display_follows_replies_and_rounds_on_a_terminal_only():
    import io

    from rich.console import Console

    from simulations.progress import RunProgress

    screen = io.StringIO()
    with RunProgress(3, console=Console(file=screen, force_terminal=True, width=120)) as live:
        live.on_reply(1, 0, 4)
        live.on_reply(1, 3, 4)
        assert live.progress is not None
        task = live.progress.tasks[0]
        assert task.completed == 0.75 and task.fields["clients"] == "clients 3/4"
        live.on_round({"round": 1, "eval_accuracy": 0.8125})
        assert task.completed == 1 and task.fields["score"] == "accuracy 0.8125"
        assert task.description == "round 1/3"
    assert "round 1/3" in screen.getvalue()
    plain = io.StringIO()
    with RunProgress(3, console=Console(file=plain, force_terminal=False)) as quiet:
        quiet.on_reply(1, 1, 4)
        quiet.on_round({"round": 1, "eval_accuracy": 0.5})
        assert quiet.progress is None  # CI and files: the round log lines are the progress
    assert plain.getvalue() == ""
