"""Model sources: GGUF conversion into a cached folder, and its errors."""
from __future__ import annotations

import importlib.util

import pytest

from task import model as model_module
from task.model import converted_gguf, model_cache_dir, resolve_model_source


def test_gguf_without_the_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("FEDLORA_MODEL_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(model_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fedlora\[llm\]'"):
        resolve_model_source(str(gguf))


def test_a_converted_folder_is_reused_and_named_after_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    stat = gguf.stat()
    done = model_cache_dir() / f"model.Q4-{stat.st_size}-{int(stat.st_mtime)}"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert converted_gguf(gguf) == done  # no conversion: the folder is there
    assert resolve_model_source(str(gguf)).path == str(done)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        resolve_model_source(str(tmp_path / "absent.gguf"))
