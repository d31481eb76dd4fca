import dataclasses

import pytest
import torch

from task.model import attach_lora, load_base_model, resolve_model_source, select_device
from task.runtime import TaskRuntime
from task.settings import LoraSettings, ModelSettings, TaskSettings
from task.training import evaluate, train_local
from tests.conftest import tiny_run_config


def _runtime(model, dataset, **extra) -> TaskRuntime:
    return TaskRuntime.build(TaskSettings.from_run_config(tiny_run_config(model, dataset, **extra)))


def test_local_training_lowers_the_loss(tiny_bert_dir, toy_csv):
    rt = _runtime(tiny_bert_dir, toy_csv)
    data = rt.encoded_partition(0, 1)
    before = evaluate(rt.model, rt.tokenizer, data, batch_size=64, device=rt.device)
    settings = dataclasses.replace(rt.settings.train, local_steps=30, learning_rate=0.01)
    result = train_local(rt.model, rt.tokenizer, data, settings, device=rt.device, seed=0)
    after = evaluate(rt.model, rt.tokenizer, data, batch_size=64, device=rt.device)
    assert result.steps == 30 and result.num_examples == len(data)
    assert after["loss"] < before["loss"] - 0.1
    assert after["accuracy"] > before["accuracy"]


def test_only_adapter_and_head_are_trained(tiny_bert_dir, toy_csv):
    rt = _runtime(tiny_bert_dir, toy_csv)
    frozen = {n: p.detach().clone() for n, p in rt.model.named_parameters() if not p.requires_grad}
    train_local(rt.model, rt.tokenizer, rt.encoded_partition(0, 1), rt.settings.train,
                device=rt.device, seed=0)
    for name, param in rt.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    trainable = [n for n, p in rt.model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_epochs_mode_counts_steps(tiny_bert_dir, toy_csv):
    rt = _runtime(tiny_bert_dir, toy_csv)
    data = rt.encoded_partition(0, 1)
    settings = dataclasses.replace(rt.settings.train, local_steps=0, local_epochs=1,
                                   batch_size=50, grad_accumulation=2)
    result = train_local(rt.model, rt.tokenizer, data, settings, device=rt.device, seed=0)
    assert result.steps == -(-len(data) // 100)


def test_causal_lm_loss_goes_down_and_reports_perplexity(toy_csv):
    rt = _runtime("tiny-gpt2", toy_csv, task="causal-lm", **{"target-modules": "c_attn"})
    data = rt.encoded_partition(0, 1)
    before = evaluate(rt.model, rt.tokenizer, data, batch_size=64, device=rt.device)
    settings = dataclasses.replace(rt.settings.train, local_steps=15, learning_rate=0.02)
    train_local(rt.model, rt.tokenizer, data, settings, device=rt.device, seed=0)
    after = evaluate(rt.model, rt.tokenizer, data, batch_size=64, device=rt.device)
    assert after["loss"] < before["loss"]
    assert after["perplexity"] == pytest.approx(torch.tensor(after["loss"]).exp().item(), rel=1e-5)


def test_local_directory_model_loads_with_saved_weights(tiny_bert_dir):
    settings = ModelSettings(model=str(tiny_bert_dir))
    assert resolve_model_source(str(tiny_bert_dir)).kind == "pretrained"
    a = load_base_model(settings, num_labels=3, seed=0)
    b = load_base_model(settings, num_labels=3, seed=123)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name  # weights come from disk, head included


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_source(str(tmp_path))


def test_bad_target_modules_lists_module_names(tiny_bert_dir):
    model = load_base_model(ModelSettings(model=str(tiny_bert_dir)), num_labels=3)
    with pytest.raises(ValueError, match="do not match this model.*query"):
        attach_lora(model, LoraSettings(target_modules="q_proj"), "classification", seed=0)


def test_device_is_cpu_here_or_cuda_when_present():
    device = select_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else
                           "mps" if torch.backends.mps.is_available() else "cpu")


def test_model_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    from task.model import load_tokenizer

    load_base_model(ModelSettings(model="tiny-bert"), num_labels=3).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="lacks its tokenizer files"):
        load_tokenizer(ModelSettings(model=str(tmp_path)))
