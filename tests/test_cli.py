import subprocess
import sys

import pytest

from simulations.cli import build_parser, main, simulate_run_config
from simulations.runconfig import parse_run_config


def test_help_is_fast_because_heavy_libraries_are_lazy():
    code = ("import sys, simulations.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'opacus', 'ray', 'flwr') "
            "if m in sys.modules]\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_run_config_parsing():
    assert parse_run_config('lora-rank=4 results-dir="/tmp/a b" strategy=fedit') == {
        "lora-rank": "4", "results-dir": "/tmp/a b", "strategy": "fedit"}
    with pytest.raises(ValueError, match="key=value"):
        parse_run_config("lora-rank")


def test_explicit_options_override_run_config():
    args = build_parser().parse_args(
        ["simulate", "--rank", "16", "--num-clients", "6", "--run-config", "lora-rank=4 seed=3"])
    config = simulate_run_config(args)
    assert config["lora-rank"] == 16 and config["seed"] == "3"
    assert config["min-available-nodes"] == 6


def test_bad_setting_exits_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--run-config", "lora-rank=0"])
    assert info.value.code == 2
    assert "lora-rank must be at least 1, got 0" in capsys.readouterr().err


def test_unknown_strategy_lists_known(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--strategy", "fedprox-lora"])
    err = capsys.readouterr().err
    assert "unknown strategy 'fedprox-lora'; known strategies: " in err and " fedit," in err


def test_a_bad_setting_is_one_line_and_debug_shows_its_traceback(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--run-config", "hetlora-gamma=2", "--strategy", "hetlora"])
    err = capsys.readouterr().err
    assert err == "fedlora: error: hetlora-gamma must be in (0, 1), got 2.0\n"
    with pytest.raises(ValueError, match="hetlora-gamma must be in"):
        main(["--debug", "simulate", "--run-config", "hetlora-gamma=2", "--strategy", "hetlora"])


def test_an_unexpected_error_shows_its_traceback(monkeypatch, capsys):
    import simulations.cli as cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_run_simulate", broken)
    with pytest.raises(SystemExit):  # a ValueError that is not a setting: a hint to --debug
        cli.main(["simulate"])
    assert "fedlora --debug simulate" in capsys.readouterr().err

    def crashed(args):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "_run_simulate", crashed)
    with pytest.raises(KeyError):  # anything else is never hidden behind one line
        cli.main(["simulate"])


def test_a_failed_run_ends_with_its_error_once_and_a_nonzero_exit(monkeypatch, capsys):
    import simulations.cli as cli
    from server.errors import RunFailed

    def failed(args):
        raise RunFailed("the run stopped after round 1: every client (4) failed with the "
                        "same error: KeyError: 'topic'")

    monkeypatch.setattr(cli, "_run_simulate", failed)
    assert cli.main(["simulate"]) == 1
    err = capsys.readouterr().err
    assert err.count("KeyError: 'topic'") == 1 and err.startswith("fedlora: error: the run")
    assert "Traceback" not in err
