"""The task abstraction: the registry, a task added in one file, loss masks, and DP-SGD on them."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from task.tasks import Task, get_task, register, registry, task_names
from task.tasks.causal_lm import CausalLM
from task.tasks.classification import Classification
from task.tasks.instruction import Instruction

CPU = torch.device("cpu")
BUILT_IN = ("classification", "causal-lm", "instruction")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the tiny models run faster so on a shared machine with few cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tasks(monkeypatch):
    """The registry, restored after the test (tasks registered in it disappear)."""
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    return registry._TASKS


# --- the registry -------------------------------------------------------------------------


def test_built_in_tasks_are_registered():
    assert set(BUILT_IN) <= set(task_names())
    kinds = {"classification": Classification, "causal-lm": CausalLM, "instruction": Instruction}
    for name, kind in kinds.items():
        task = get_task(name)
        assert type(task) is kind and task.name == name
    assert get_task("classification").has_labels
    assert (get_task("classification").peft_task_type, get_task("causal-lm").peft_task_type,
            get_task("instruction").peft_task_type) == ("SEQ_CLS", "CAUSAL_LM", "CAUSAL_LM")
    assert [get_task(n).default_partitioner() for n in BUILT_IN] == ["dirichlet", "iid", "iid"]
    assert [(get_task(n).metric, get_task(n).higher_is_better) for n in BUILT_IN] == [
        ("accuracy", True), ("perplexity", False), ("rouge_l", True)]
    assert registry.as_task(None) is get_task("classification")
    assert registry.as_task("instruction") is get_task("instruction")


def test_unknown_task_lists_the_registered_ones():
    from task.settings import ModelSettings

    with pytest.raises(ValueError, match="got 'nope'") as err:
        get_task("nope")
    for name in BUILT_IN:
        assert f"'{name}'" in str(err.value)
    with pytest.raises(ValueError, match="task must be one of") as err:
        ModelSettings(task="nope")
    assert all(f"'{name}'" in str(err.value) for name in BUILT_IN)


def test_a_name_cannot_be_taken_by_another_kind_of_task(tasks):
    class Other(CausalLM):
        name = "instruction"

    with pytest.raises(ValueError, match="task 'instruction' is already registered"):
        register(Other())
    again = Instruction()
    assert register(again) is again and get_task("instruction") is again  # same kind: replaced


class ReversedWords(CausalLM):
    """A new task in one class: causal LM on each text with its words in reverse order."""

    name = "causal-lm-reversed"

    def prepare(self, ds: Dataset, settings) -> Dataset:
        ds = super().prepare(ds, settings)
        return ds.map(lambda row: {"text": " ".join(reversed(row["text"].split()))},
                      load_from_cache_file=False)


def test_a_new_task_is_one_class_and_its_registration(tasks, tmp_path):
    from task.runtime import TaskRuntime
    from task.settings import ModelSettings, TaskSettings
    from task.training import evaluate_task, train_local

    with pytest.raises(ValueError):
        ModelSettings(task="causal-lm-reversed")
    task = register(ReversedWords())
    assert "causal-lm-reversed" in task_names()
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    path = tmp_path / "notes.jsonl"  # text only: no label column
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 10:] + words[:i % 10])})
                            + "\n" for i in range(25)))
    settings = TaskSettings.from_run_config({
        "model": "tiny-gpt2", "task": "causal-lm-reversed", "dataset": str(path),
        "max-length": 16, "lora-rank": 4, "lora-alpha": 8.0, "local-steps": 3,
        "batch-size": 4, "learning-rate": 0.01})  # partitioner: auto
    rt = TaskRuntime.build(settings)
    assert rt.task is task
    assert type(rt.model.get_base_model()).__name__ == "GPT2LMHeadModel"
    assert rt.data.label_names == [] and (len(rt.data.train), len(rt.data.test)) == (20, 5)
    text = rt.data.train["text"][0]
    assert text.split()[::-1] in ([*words[k:], *words[:k]] for k in range(10))
    part = rt.encoded_partition(0, 2)
    assert part.task == "causal-lm-reversed" and len(part) == 10
    first = rt._partitioner(2).load_partition(0)["text"][0]
    assert part.input_ids[0] == rt.tokenizer(first, truncation=True, max_length=16)["input_ids"]
    result = train_local(rt.model, rt.tokenizer, part, settings.train, device=rt.device)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.loss_last))
    scores = evaluate_task(rt.model, rt.tokenizer, rt.encoded_test(), batch_size=8,
                           device=rt.device).scores
    assert set(scores) == {"loss", "perplexity"}


# --- partitioning data without labels ------------------------------------------------------


@pytest.fixture
def notes_jsonl(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": f"note number {i} about things", "site": i % 2})
                            + "\n" for i in range(20)))
    return path


def test_auto_partitioner_on_causal_lm_text_is_iid(notes_jsonl):
    from flwr_datasets.partitioner import IidPartitioner

    from task.data import load_partition, load_task_data, make_partitioner
    from task.settings import DataSettings

    settings = DataSettings(dataset=str(notes_jsonl))  # partitioner=auto, no label column
    data = load_task_data(settings, "causal-lm")
    assert (len(data.train), len(data.test), data.num_labels) == (16, 4, 0)
    partitioner = make_partitioner(settings, 4, data.train, "causal-lm")
    assert isinstance(partitioner, IidPartitioner)
    parts = [load_partition(data.train, settings, partition_id=i, num_partitions=4,
                            partitioner=partitioner, task="causal-lm") for i in range(4)]
    assert [len(p) for p in parts] == [4, 4, 4, 4]
    assert sorted(t for p in parts for t in p["text"]) == sorted(data.train["text"])


def test_dirichlet_on_data_without_labels_says_partition_by_or_iid(notes_jsonl):
    from task.data import load_task_data, make_partitioner
    from task.settings import DataSettings

    settings = DataSettings(dataset=str(notes_jsonl), partitioner="dirichlet")
    data = load_task_data(settings, "causal-lm")
    with pytest.raises(ValueError, match="'label' column") as err:
        make_partitioner(settings, 2, data.train, "causal-lm")
    assert "partition-by" in str(err.value) and "partitioner=iid" in str(err.value)
    by_site = DataSettings(dataset=str(notes_jsonl), partitioner="dirichlet", partition_by="site")
    data = load_task_data(by_site, "causal-lm")
    assert type(make_partitioner(by_site, 2, data.train, "causal-lm")).__name__ \
        == "DirichletPartitioner"


def test_instruction_data_partitions_by_a_column(tmp_path):
    from task.data import load_partition, load_task_data
    from task.settings import DataSettings

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}",
                                        "kind": ["topic", "headline"][i % 2]}) + "\n"
                            for i in range(10)))
    settings = DataSettings(dataset=str(path), partitioner="natural", partition_by="kind")
    data = load_task_data(settings, "instruction")
    kinds = [set(load_partition(data.train, settings, partition_id=i, num_partitions=2,
                                task="instruction")["kind"]) for i in range(2)]
    assert sorted(map(sorted, kinds)) == [["headline"], ["topic"]]


# --- loss masks: the response tokens only ---------------------------------------------------

USER = ["<", "|", "user", "|", ">"]
ASSISTANT = ["<", "|", "assistant", "|", ">"]


@pytest.fixture(scope="module")
def tok():
    from task.model import load_tokenizer
    from task.settings import ModelSettings

    return load_tokenizer(ModelSettings(model="tiny-llama", task="instruction"))


@pytest.fixture(scope="module")
def llama():
    """A tiny LoRA llama (r=4 on q/v, no dropout) with random B, so every factor has a gradient."""
    from task.model import attach_lora, load_base_model
    from task.settings import LoraSettings, ModelSettings

    base = load_base_model(ModelSettings(model="tiny-llama", task="instruction"), num_labels=0,
                           seed=0)
    model = attach_lora(base, LoraSettings(lora_rank=4, lora_alpha=8.0), "instruction", seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def model(llama):
    """The module's model with its trainable parameters restored after the test."""
    saved = {n: p.detach().clone() for n, p in llama.named_parameters() if p.requires_grad}
    yield llama
    with torch.no_grad():
        for name, param in llama.named_parameters():
            if name in saved:
                param.copy_(saved[name])
            param.grad = None


@pytest.fixture(scope="module")
def pairs(tok):
    """Three encoded examples: prompts and responses (1, 4 and 3 words) of different lengths."""
    from task.settings import DataSettings

    task = get_task("instruction")
    ds = task.prepare(Dataset.from_dict({
        "prompt": ["what is red", "name the colour of the sky", "hi"],
        "response": ["red", "the sky is blue", "hello there friend"]}),
        DataSettings(dataset="unused"))
    return task.encode(ds, tok, 64)


def _ids(tok, tokens: list[str]) -> list[int]:
    return tok.convert_tokens_to_ids(tokens)


def test_collated_labels_mask_prompt_and_padding(tok, pairs):
    prompt0 = _ids(tok, [*USER, "what", "is", "red", "[SEP]", *ASSISTANT])
    response0 = _ids(tok, ["red", "[SEP]"])
    prompt2 = _ids(tok, [*USER, "hi", "[SEP]", *ASSISTANT])
    response2 = _ids(tok, ["hello", "there", "friend", "[SEP]"])
    assert pairs.input_ids[0] == prompt0 + response0 and pairs.prompt_lengths[0] == 14
    assert pairs.input_ids[2] == prompt2 + response2 and pairs.prompt_lengths[2] == 12
    batch = get_task("instruction").collate(pairs, [0, 2], tok, CPU)
    # both have 16 tokens: no padding; with example 1 (22 tokens) example 2 is padded
    assert batch["input_ids"].tolist() == [prompt0 + response0, prompt2 + response2]
    assert batch["labels"].tolist() == [[-100] * 14 + response0, [-100] * 12 + response2]
    assert batch["attention_mask"].tolist() == [[1] * 16, [1] * 16]
    batch = get_task("instruction").collate(pairs, [2, 1], tok, CPU)
    pad = tok.pad_token_id
    assert pad == 0 and batch["input_ids"].shape == (2, 22)
    assert batch["input_ids"][0].tolist() == prompt2 + response2 + [pad] * 6
    assert batch["labels"][0].tolist() == [-100] * 12 + response2 + [-100] * 6
    assert batch["attention_mask"][0].tolist() == [1] * 16 + [0] * 6
    response1 = _ids(tok, ["the", "sky", "is", "blue", "[SEP]"])
    assert batch["labels"][1].tolist() == [-100] * 17 + response1


def _response_terms(model, pairs, indices) -> list[list[torch.Tensor]]:
    """By hand: -log p(token t | tokens before t) for each response token, per example."""
    terms = []
    with torch.no_grad():
        for i in indices:
            ids = torch.tensor([pairs.input_ids[i]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            terms.append([-logp[t - 1, pairs.input_ids[i][t]]
                          for t in range(pairs.prompt_lengths[i], len(pairs.input_ids[i]))])
    return terms


def test_losses_cover_response_tokens_only(model, tok, pairs):
    from task.dp_training import dp_loss
    from task.training import evaluate, per_example_losses

    task = get_task("instruction")
    model.eval()
    terms = _response_terms(model, pairs, [0, 1, 2])
    assert [len(t) for t in terms] == [2, 5, 4]
    flat = [x for t in terms for x in t]
    token_mean = float(sum(flat) / len(flat))
    example_means = [float(sum(t) / len(t)) for t in terms]
    batch = task.collate(pairs, [0, 1, 2], tok, CPU)
    with torch.no_grad():
        # training: the mean over every response token of the batch
        assert float(task.loss(model, batch)) == pytest.approx(token_mean, rel=1e-5)
        # DP-SGD: the mean over examples of each one's mean response-token loss
        assert task.example_losses(model, batch).tolist() == pytest.approx(example_means,
                                                                          rel=1e-5)
        assert float(dp_loss(model, batch, task)) == pytest.approx(
            sum(example_means) / 3, rel=1e-5)
    assert abs(token_mean - sum(example_means) / 3) > 1e-3  # the two reductions differ here
    assert per_example_losses(model, tok, pairs, batch_size=2, device=CPU).tolist() \
        == pytest.approx(example_means, rel=1e-5)
    scores = evaluate(model, tok, pairs, batch_size=2, device=CPU)
    assert scores["loss"] == pytest.approx(token_mean, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(float(torch.tensor(token_mean).exp()), rel=1e-5)


def test_no_gradient_reaches_the_logits_of_prompt_and_padding(model, tok, pairs):
    batch = get_task("instruction").collate(pairs, [2, 1], tok, CPU)
    captured = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    # the final norm's output: one hidden state per position, each feeding only its own
    # logits (the loss asks for the logits of the positions it needs, not all of them)
    handle = model.get_base_model().model.norm.register_forward_hook(keep)
    try:
        get_task("instruction").loss(model, batch).backward()
    finally:
        handle.remove()
    reached = captured[0].grad.abs().sum(-1) > 0  # [batch, length]
    # the logits at t predict token t + 1: only positions before a response token count
    expected = torch.zeros_like(reached)
    expected[0, 11:15] = True  # example 2: prompt 12 tokens, response 4 (tokens 12..15)
    expected[1, 16:21] = True  # example 1: prompt 17 tokens, response 5 (tokens 17..21)
    assert torch.equal(reached, expected)


# --- DP-SGD with masked tokens -------------------------------------------------------------


def test_per_sample_grads_equal_each_example_alone(model, tok, pairs):
    from task.dp_training import dp_loss, per_sample_grads

    task = get_task("instruction")
    batch = task.collate(pairs, [0, 1, 2], tok, CPU)  # padded to 22 tokens
    opacus = per_sample_grads(model, batch, "instruction")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(opacus) == trainable and any("lora_A" in n for n in opacus)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    for i in range(3):
        model.zero_grad(set_to_none=True)
        alone = task.collate(pairs, [i], tok, CPU)  # no padding
        dp_loss(model, alone, task).backward()
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param.grad.abs().max() > 0, name
                torch.testing.assert_close(opacus[name][i], param.grad, atol=1e-5, rtol=1e-4,
                                           msg=f"{name}, example {i}")


def test_dp_training_step_on_instruction_data(model, tok, pairs):
    from privacy.accounting import DPSettings, PrivacyLedger
    from task.dp_training import train_local_dp
    from task.settings import TrainSettings

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.eval()
    expected = sum(sum(t) / len(t) for t in _response_terms(model, pairs, [0, 1, 2])) / 3
    ledger = PrivacyLedger()
    settings = TrainSettings(local_steps=1, batch_size=3, learning_rate=0.01)
    result = train_local_dp(model, tok, pairs, settings, ledger=ledger, device=CPU, seed=0,
                            dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
                            poisson=False)  # the one batch is all three examples
    assert result.steps == ledger.steps == 1 and result.examples_seen == 3
    assert result.loss_first == pytest.approx(float(expected), rel=1e-5)
    assert 0 < result.epsilon < float("inf") and result.sample_rate == 1.0
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(after[n], before[n]) for n in before)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_task_interface_defaults():
    class Bare(Task):
        name = "bare"
        peft_task_type = "CAUSAL_LM"

    bare = Bare()
    assert bare.default_partitioner() == "iid" and bare.label_names(Dataset.from_dict({})) == []
    assert bare.auto_model().__name__ == "AutoModelForCausalLM"
    with pytest.raises(NotImplementedError):
        bare.encode(Dataset.from_dict({}), None, 8)


def test_encoded_subset_keeps_every_field():
    from task.encoded import Encoded

    data = Encoded(input_ids=[[1], [2, 3], [4, 5, 6]], prompt_lengths=[0, 1, 2],
                   references=["a", "b", "c"], groups=["x", "y", "x"], task="instruction",
                   dropped=4)
    part = data.subset([2, 0])
    assert (part.input_ids, part.prompt_lengths, part.references, part.groups) == (
        [[4, 5, 6], [1]], [2, 0], ["c", "a"], ["x", "x"])
    assert (part.task, part.dropped, part.labels) == ("instruction", 4, None)
    assert len(data.empty()) == 0 and data.empty().task == "instruction"
    assert Encoded(input_ids=[[1]], labels=[0]).task == "classification"
    assert Encoded(input_ids=[[1]]).task == "causal-lm"


def test_logits_only_where_the_loss_counts_give_the_full_loss_and_gradient(
        model, tok, pairs, monkeypatch):
    from task.tasks import causal_lm

    task = get_task("instruction")
    batch = task.collate(pairs, [0, 1, 2], tok, CPU)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.requires_grad}

    trimmed, trimmed_grads = loss_and_grads()
    monkeypatch.setattr(causal_lm, "_keeps_logits", lambda _cls: False)
    full, full_grads = loss_and_grads()
    assert torch.allclose(trimmed, full, atol=1e-6)
    assert torch.allclose(trimmed, model(**batch).loss, atol=1e-6)  # transformers' own
    for name, grad in full_grads.items():
        assert torch.allclose(trimmed_grads[name], grad, atol=1e-6), name
