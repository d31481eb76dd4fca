import dataclasses

import numpy as np
import torch

from strategies.adapter import LoraAdapter
from strategies.slora import stage_two_adapter
from strategies.sparse import mask_size, sparse_key
from task.base_deltas import adapted_base_layers
from task.runtime import TaskRuntime
from task.settings import TaskSettings
from task.training import train_local
from tests.conftest import tiny_run_config


def _runtime(tiny_bert_dir, toy_csv, rank=4):
    config = tiny_run_config(tiny_bert_dir, toy_csv, **{"lora-rank": rank,
                                                         "lora-alpha": 2.0 * rank})
    return TaskRuntime.build(TaskSettings.from_run_config(config))


def _with_deltas(rt, density=0.25, value=0.0):
    state = rt.initial_adapter.to_state_dict()
    for name, layer in adapted_base_layers(rt.model).items():
        k = mask_size(tuple(layer.weight.shape), density)
        state[sparse_key(name)] = np.full(k, value, dtype=np.float32)
    return LoraAdapter.from_state_dict(state, rt.alpha)


def test_stage_one_trains_only_masked_base_entries_and_resets(tiny_bert_dir, toy_csv):
    rt = _runtime(tiny_bert_dir, toy_csv)
    layers = adapted_base_layers(rt.model)
    originals = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    rt.set_adapter(_with_deltas(rt))
    rt.set_trainable({"extras"})
    rt.base.start_training()
    settings = dataclasses.replace(rt.settings.train, local_steps=5, learning_rate=0.05)
    train_local(rt.model, rt.tokenizer, rt.encoded_partition(0, 1), settings,
                device=rt.device, seed=0)
    rt.base.stop_training()
    rt.set_trainable({"lora_A", "lora_B", "extras"})
    trained = rt.get_adapter()
    for name, layer in layers.items():
        changed = (layer.weight.detach() != originals[name]).view(-1).nonzero().view(-1)
        delta = trained.extras[sparse_key(name)]
        idx = rt.base._indices[name]
        assert set(changed.tolist()) <= set(idx.tolist())  # nothing outside the mask
        assert np.abs(delta).sum() > 0
        expected = (layer.weight.detach().view(-1) - originals[name].view(-1))[idx]
        np.testing.assert_allclose(delta, expected.numpy(), atol=1e-7)
    # a state without deltas puts the base back, exactly
    rt.set_adapter(rt.initial_adapter)
    for name, layer in layers.items():
        assert torch.equal(layer.weight, originals[name])
    assert not any(layer.weight.requires_grad for layer in layers.values())


def test_full_rank_lora_from_stage_one_equals_w0_plus_the_update(tiny_bert_dir, toy_csv):
    rt = _runtime(tiny_bert_dir, toy_csv, rank=32)  # tiny-bert layers are 32 x 32
    layers = adapted_base_layers(rt.model)
    rng = np.random.default_rng(0)
    stage_one = _with_deltas(rt)
    for key in list(stage_one.extras):
        if key.endswith(".sparse_delta"):
            stage_one.extras[key] = rng.standard_normal(len(stage_one.extras[key])).astype(
                np.float32) * 0.1
    rt.set_adapter(stage_one)
    w_stage_one = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    rt.set_adapter(stage_two_adapter(stage_one, seed=rt.settings.train.seed))
    merged = rt.model.merge_and_unload()
    for name in layers:
        path = name.replace("base_model.model.", "", 1)
        weight = merged.get_submodule(path).weight
        torch.testing.assert_close(weight, w_stage_one[name], atol=1e-5, rtol=0)


def test_dense_deltas_apply_extract_and_leave_the_pretrained_weights_known(tiny_bert_dir,
                                                                          toy_csv):
    """A cached runtime that carries a run's dense deltas still knows the pretrained W."""
    from strategies.sparse import dense_key

    rt = _runtime(tiny_bert_dir, toy_csv)
    pretrained = rt.base_weights()
    rng = np.random.default_rng(0)
    deltas = {dense_key(n): rng.normal(0, 0.1, w.shape).astype(np.float32)
              for n, w in pretrained.items()}
    rt.set_adapter(LoraAdapter.from_state_dict(
        {**rt.initial_adapter.to_state_dict(), **deltas}, rt.alpha))
    for name, layer in adapted_base_layers(rt.model).items():
        np.testing.assert_allclose(layer.weight.detach().numpy(),
                                   pretrained[name] + deltas[dense_key(name)], atol=1e-6)
    extracted = rt.get_adapter().extras
    for key, delta in deltas.items():
        np.testing.assert_allclose(extracted[key], delta, atol=1e-6)
    for name, weight in rt.base_weights().items():  # the deltas are not reported as W
        np.testing.assert_array_equal(weight, pretrained[name])
    rt.set_adapter(rt.initial_adapter)  # no deltas: back at the pretrained weights
    for name, layer in adapted_base_layers(rt.model).items():
        np.testing.assert_array_equal(layer.weight.detach().numpy(), pretrained[name])
