"""Instruction tuning: data formats and their checks, templates, truncation, BBC instructions,
and a tiny model that learns to answer."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
from datasets import Dataset

from task.bbc_instruct import HEADLINE_INSTRUCTION, article_parts, bbc_instructions
from task.data import bbc_news_dir, load_raw_dataset, load_task_data
from task.model import load_tokenizer
from task.settings import DataSettings, GenerationSettings, ModelSettings, TaskSettings
from task.tasks import get_task
from task.tasks.instruction_data import detect_format
from task.tasks.templates import (
    PLAIN_PROMPT,
    cut_middle,
    end_token,
    format_texts,
    plain_prompt,
    tokenize_examples,
)

TASK = get_task("instruction")
NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()
USER = ["<", "|", "user", "|", ">"]
ASSISTANT = ["<", "|", "assistant", "|", ">"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the tiny models run faster so on a shared machine with few cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_tok():
    """tiny-llama's tokenizer: MiniLM's (lower-cases) with a small chat template."""
    return load_tokenizer(ModelSettings(model="tiny-llama", task="instruction"))


@pytest.fixture(scope="module")
def plain_tok():
    """tiny-gpt2's tokenizer: MiniLM's without a chat template (plain template)."""
    return load_tokenizer(ModelSettings(model="tiny-gpt2", task="instruction"))


def _settings(dataset: str | Path = "data.jsonl", **changes) -> DataSettings:
    return DataSettings(dataset=str(dataset), **changes)


def _records(prepared: Dataset) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt turns, response) of each prepared record."""
    return [(json.loads(p), r) for p, r in zip(prepared["prompt_messages"],
                                                prepared["response"], strict=True)]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokens(tok, ids: list[int]) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


# --- data formats, from files ------------------------------------------------------------


def test_alpaca_jsonl_with_and_without_input(tmp_path):
    path = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Name a colour.", "output": "red"},  # no input key at all
    ])
    settings = _settings(path)
    ds = load_raw_dataset(str(path))
    assert detect_format(ds, settings) == "alpaca"
    prepared = TASK.prepare(ds, settings)
    assert _records(prepared) == [(_user("Translate to French.\n\ncat"), "chat"),
                                  (_user("Say hi."), "hi"), (_user("Name a colour."), "red")]
    assert prepared["source_format"] == ["alpaca"] * 3


def test_prompt_response_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([["prompt", "response", "site"], ["2+2?", "4", "a"],
                                  ["Capital of France?", "Paris", "b"]])
    ds = load_raw_dataset(str(path))
    assert detect_format(ds, _settings(path)) == "prompt-response"
    assert _records(TASK.prepare(ds, _settings(path))) == [(_user("2+2?"), "4"),
                                                           (_user("Capital of France?"), "Paris")]


def test_chat_messages_json_list(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Colour of grass?"},
                          {"role": "assistant", "content": "Green"}]},
            {"messages": [{"role": "user", "content": "Sky?"},
                          {"role": "assistant", "content": "Blue"}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))  # one JSON list, not JSON lines
    ds = load_raw_dataset(str(path))
    assert detect_format(ds, _settings(path)) == "messages"
    assert _records(TASK.prepare(ds, _settings(path))) == [
        (rows[0]["messages"][:4], "Green"), (rows[1]["messages"][:1], "Blue")]


def test_parquet_with_custom_column_names(tmp_path):
    path = tmp_path / "qa.parquet"
    Dataset.from_dict({"question": ["Largest planet?", "Smallest prime?"],
                       "answer": ["Jupiter", "2"]}).to_parquet(str(path))
    settings = _settings(path, prompt_column="question", response_column="answer")
    prepared = TASK.prepare(load_raw_dataset(str(path)), settings)
    assert _records(prepared) == [(_user("Largest planet?"), "Jupiter"),
                                  (_user("Smallest prime?"), "2")]


def test_alpaca_with_output_column_setting(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Sum 1 and 1.", "answer": "2",
                                          "output": "not this one"}])
    settings = _settings(path, instruction_format="alpaca", output_column="answer")
    assert _records(TASK.prepare(load_raw_dataset(str(path)), settings)) == [
        (_user("Sum 1 and 1."), "2")]


def test_auto_detection_order_and_explicit_format():
    both = Dataset.from_dict({"messages": ['[{"role": "user", "content": "u"}, '
                                           '{"role": "assistant", "content": "m"}]'],
                              "instruction": ["i"], "output": ["o"], "prompt": ["p"],
                              "response": ["r"]})
    assert detect_format(both, _settings()) == "messages"  # messages first
    assert detect_format(both.remove_columns("messages"), _settings()) == "alpaca"
    assert detect_format(both.remove_columns(["messages", "output"]), _settings()) \
        == "prompt-response"
    assert _records(TASK.prepare(both, _settings(instruction_format="prompt-response"))) == [
        (_user("p"), "r")]
    assert _records(TASK.prepare(both, _settings())) == [(_user("u"), "m")]
    with pytest.raises(ValueError, match="fit no instruction format") as err:
        detect_format(Dataset.from_dict({"question": ["q"]}), _settings())
    assert "['question']" in str(err.value) and "prompt-column" in str(err.value)


def test_system_prompt_adds_a_system_turn_unless_there_is_one():
    ds = Dataset.from_dict({"messages": [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Yo"}]]})
    records = _records(TASK.prepare(ds, _settings(system_prompt="Be brief.")))
    assert records[0][0] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi"}]
    assert records[1][0] == [{"role": "system", "content": "Own."},
                             {"role": "user", "content": "Hi"}]


def test_group_column_and_partition_by_are_kept():
    ds = Dataset.from_dict({"prompt": ["a", "b", "c"], "response": ["x", "y", "z"],
                            "kind": ["topic", "headline", "topic"], "site": [1, 2, 1]})
    prepared = TASK.prepare(ds, _settings(group_column="kind", partition_by="site"))
    assert prepared["group"] == ["topic", "headline", "topic"]
    assert prepared["site"] == [1, 2, 1]


# --- bad records: the error names the record and the column --------------------------------


def test_missing_or_empty_output_names_record_and_column(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "A", "output": "ok"},
                                           {"instruction": "B"}])
    with pytest.raises(ValueError, match=r"record 1: column 'output' is empty"):
        TASK.prepare(load_raw_dataset(str(path)), _settings(path))
    ds = Dataset.from_dict({"instruction": ["A", "B", "C"], "output": ["ok", "fine", "  "]})
    with pytest.raises(ValueError, match=r"record 2: column 'output' is empty"):
        TASK.prepare(ds, _settings())
    ds = Dataset.from_dict({"instruction": ["A", ""], "output": ["ok", "fine"]})
    with pytest.raises(ValueError, match=r"record 1: column 'instruction' is empty"):
        TASK.prepare(ds, _settings())


def test_empty_response_in_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,response\nq1,a1\nq2,\n")
    with pytest.raises(ValueError, match=r"record 1: column 'response' is empty"):
        TASK.prepare(load_raw_dataset(str(path)), _settings(path))


def test_non_text_value_names_its_type():
    ds = Dataset.from_dict({"prompt": ["q"], "response": [7]})
    with pytest.raises(ValueError, match=r"record 0: column 'response' holds int 7, not text"):
        TASK.prepare(ds, _settings())


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],
     r"record 0: message 1 in 'messages' has the unknown role 'bot'"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
      {"role": "user", "content": "Bye"}],
     r"record 0: the last message in 'messages' is from 'user'"),
    ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hello"}],
     r"record 0: 'messages' has no user message before the response"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
     r"record 0: column 'messages\[1\].content' is empty"),
    ([{"role": "user", "text": "Hi"}],
     r"record 0: message 0 in 'messages' must have 'role' and 'content'"),
    ({"role": "user", "content": "Hi"}, r"record 0: column 'messages' must be a non-empty list"),
    ([], r"record 0: column 'messages' must be a non-empty list"),
])
def test_bad_messages(messages, message):
    ds = Dataset.from_dict({"messages": [json.dumps(messages)]})  # as JSON text
    with pytest.raises(ValueError, match=message):
        TASK.prepare(ds, _settings())


def test_messages_text_that_is_not_json():
    ds = Dataset.from_dict({"messages": ['[{"role": "user", "content": "a"}, '
                                         '{"role": "assistant", "content": "b"}]',
                                         "hello there"]})
    with pytest.raises(ValueError, match=r"record 1: column 'messages' is text that is not a "
                                         r"JSON list"):
        TASK.prepare(ds, _settings())


def test_missing_column_names_format_and_columns():
    ds = Dataset.from_dict({"instruction": ["a"], "answer": ["b"]})
    with pytest.raises(ValueError, match=r"\['output'\] not in the dataset") as err:
        TASK.prepare(ds, _settings(instruction_format="alpaca"))
    assert "'alpaca'" in str(err.value) and "['instruction', 'answer']" in str(err.value)
    with pytest.raises(ValueError, match=r"\['kind'\] not in the dataset"):
        TASK.prepare(Dataset.from_dict({"prompt": ["a"], "response": ["b"]}),
                     _settings(group_column="kind"))


# --- templates --------------------------------------------------------------------------


def test_chat_template_path(chat_tok):
    turns = [{"role": "system", "content": "Be brief."}, *_user("Colour of grass?")]
    prompt, response = format_texts(chat_tok, turns, "Green")
    assert prompt == ("<|system|>\nBe brief.[SEP]\n<|user|>\nColour of grass?[SEP]\n"
                      "<|assistant|>\n")
    assert prompt == chat_tok.apply_chat_template(turns, tokenize=False,
                                                  add_generation_prompt=True)
    assert response == "Green[SEP]"  # the template's end of turn, trailing newline dropped
    ds = TASK.prepare(Dataset.from_dict({"prompt": ["Colour of grass?"],
                                         "response": ["Green"]}), _settings())
    enc = TASK.encode(ds, chat_tok, 64)
    ids, n = enc.input_ids[0], enc.prompt_lengths[0]
    # the chat template's text is tokenized without [CLS]/[SEP] added around it
    assert _tokens(chat_tok, ids[:n]) == [*USER, "colour", "of", "grass", "?", "[SEP]",
                                          *ASSISTANT]
    assert _tokens(chat_tok, ids[n:]) == ["green", "[SEP]"]
    assert enc.references == ["Green"] and enc.task == "instruction"


def test_plain_template_path(plain_tok):
    assert not getattr(plain_tok, "chat_template", None)
    assert end_token(plain_tok) == "[SEP]"  # no EOS: SEP ends the response
    prompt, response = format_texts(plain_tok, _user("Colour of grass?"), "Green")
    assert prompt == "### Instruction:\nColour of grass?\n\n### Response:\n"
    assert prompt == PLAIN_PROMPT.format(user="Colour of grass?")
    assert response == "Green[SEP]"
    system = [{"role": "system", "content": "Be brief."}, *_user("Hi")]
    assert format_texts(plain_tok, system, "Yo")[0] == ("Be brief.\n\n### Instruction:\nHi\n\n"
                                                        "### Response:\n")
    ds = TASK.prepare(Dataset.from_dict({"prompt": ["Colour of grass?"],
                                         "response": ["Green"]}), _settings())
    enc = TASK.encode(ds, plain_tok, 64)
    ids, n = enc.input_ids[0], enc.prompt_lengths[0]
    assert _tokens(plain_tok, ids[:n]) == [
        "[CLS]", "#", "#", "#", "instruction", ":", "colour", "of", "grass", "?",
        "#", "#", "#", "response", ":", "[SEP]"]
    assert _tokens(plain_tok, ids[n:]) == ["green", "[SEP]"]


def test_end_token_prefers_eos_then_sep():
    from types import SimpleNamespace

    assert end_token(SimpleNamespace(eos_token="</s>", sep_token="[SEP]")) == "</s>"
    assert end_token(SimpleNamespace(eos_token=None, sep_token="[SEP]")) == "[SEP]"
    assert end_token(SimpleNamespace(eos_token=None, sep_token=None)) == ""


def test_messages_data_needs_a_chat_template(plain_tok):
    ds = TASK.prepare(Dataset.from_dict({"messages": [[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]}),
        _settings())
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        TASK.encode(ds, plain_tok, 64)
    with pytest.raises(ValueError, match="multi-turn chat messages need a tokenizer with a "
                                         "chat template"):
        plain_prompt([*_user("a"), {"role": "assistant", "content": "b"}, *_user("c")])


# --- truncation -------------------------------------------------------------------------


def test_cut_middle_keeps_head_and_tail():
    ids = list(range(10))
    assert cut_middle(ids, 10) == ids and cut_middle(ids, 12) == ids
    assert cut_middle(ids, 5) == [0, 1, 7, 8, 9]  # head = budget // 2, tail = the rest
    assert cut_middle(ids, 4) == [0, 1, 8, 9]
    assert cut_middle(ids, 1) == [9]


def test_long_prompt_is_cut_in_the_middle_and_the_response_kept(chat_tok):
    long_prompt = " ".join(NUMBERS)
    ds = TASK.prepare(Dataset.from_dict({"prompt": [long_prompt, "hi"],
                                         "response": ["green", "red"]}), _settings())
    enc = TASK.encode(ds, chat_tok, 16)
    assert enc.dropped == 0 and len(enc) == 2
    ids, n = enc.input_ids[0], enc.prompt_lengths[0]
    assert len(ids) == 16 and n == 14  # the budget: max-length minus the 2 response tokens
    # 23 prompt tokens cut to 7 from the start and 7 from the end
    assert _tokens(chat_tok, ids[:n]) == [*USER, "one", "two", "twelve", "[SEP]", *ASSISTANT]
    assert _tokens(chat_tok, ids[n:]) == ["green", "[SEP]"]
    full = chat_tok(format_texts(chat_tok, _user(long_prompt), "green")[0],
                    add_special_tokens=False)["input_ids"]
    assert len(full) == 23 and ids[:n] == cut_middle(full, 14)
    # a short example is left as it is
    assert _tokens(chat_tok, enc.input_ids[1]) == [*USER, "hi", "[SEP]", *ASSISTANT,
                                                   "red", "[SEP]"]


def test_response_of_max_length_tokens_is_dropped_and_counted(chat_tok):
    fits = " ".join(NUMBERS[:6])  # 6 words + [SEP] = 7 tokens: 1 left for the prompt
    too_long = " ".join(NUMBERS[:7])  # 8 tokens = max-length
    ds = TASK.prepare(Dataset.from_dict({"prompt": ["a", "b", "c"],
                                         "response": [too_long, fits, "ok"],
                                         "kind": ["x", "y", "z"]}),
                      _settings(group_column="kind"))
    enc = TASK.encode(ds, chat_tok, 8)
    assert enc.dropped == 1 and len(enc) == 2
    assert enc.references == [fits, "ok"] and enc.groups == ["y", "z"]
    assert _tokens(chat_tok, enc.input_ids[0]) == [">", *NUMBERS[:6], "[SEP]"]
    assert enc.prompt_lengths == [1, 6]
    tokens = tokenize_examples(chat_tok, ds["prompt_messages"], ds["response"], 8)
    assert tokens.kept == [1, 2] and tokens.dropped == [0]


def test_no_response_fits_asks_to_raise_max_length(chat_tok):
    ds = TASK.prepare(Dataset.from_dict({"prompt": ["a"], "response": [" ".join(NUMBERS)]}),
                      _settings())
    with pytest.raises(ValueError, match=r"no response fits in max-length=8 .*raise max-length"):
        TASK.encode(ds, chat_tok, 8)


# --- bbc-news-instruct ----------------------------------------------------------------------


def test_bbc_news_instruct():
    ds = load_raw_dataset("bbc-news-instruct")
    root = bbc_news_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(t, f) for t in topics for f in sorted((root / t).glob("*.txt"))]
    assert len(ds) == len(files) == 2225
    assert ds["kind"] == ["topic", "headline"] * 1112 + ["topic"]
    assert ds["topic"] == [t for t, _ in files]
    question = ds["instruction"][0]
    listed = question.split("Answer with one word: ")[1].rstrip(".")
    head, last = listed.split(" or ")
    assert [*head.split(", "), last] == topics == ["business", "entertainment", "politics",
                                                  "sports", "tech"]
    for row, (topic, file) in zip(ds, files, strict=True):
        if row["kind"] == "topic":
            assert row["instruction"] == question and row["output"] == topic
        else:
            first_line = file.read_bytes().decode("utf-8", errors="replace").strip()
            assert row["instruction"] == HEADLINE_INSTRUCTION
            assert row["output"] == first_line.splitlines()[0].strip()
    first = files[0][1].read_bytes().decode("utf-8", errors="replace").strip().splitlines()
    body_words = " ".join(line.strip() for line in first[1:] if line.strip()).split()
    assert ds["input"][0] == " ".join(body_words[:60])
    prepared = TASK.prepare(ds.select(range(4)), _settings("bbc-news-instruct",
                                                           group_column="kind"))
    assert prepared["group"] == ["topic", "headline", "topic", "headline"]


def test_bbc_instructions_skip_empty_files(tmp_path):
    for topic, name, text in [("sports", "001.txt", "Team wins\n\nThe team won the cup."),
                              ("sports", "002.txt", "   \n"),  # empty: skipped
                              ("sports", "003.txt", "Only a headline\n"),  # no body: skipped
                              ("tech", "001.txt", "New phone\nA phone was launched today.")]:
        (tmp_path / topic).mkdir(exist_ok=True)
        (tmp_path / topic / name).write_text(text)
    assert article_parts("  \n\n ") == ("", "")
    assert article_parts("\n Title \n\n body one\nbody two\n") == ("Title", "body one body two")
    ds = bbc_instructions(tmp_path, snippet_words=3)
    assert ds["kind"] == ["topic", "headline"]
    assert ds["output"] == ["sports", "New phone"]
    assert ds["input"] == ["The team won", "A phone was"]
    assert ds["instruction"][0] == ("What is the topic of this article? Answer with one word: "
                                    "sports or tech.")


# --- a tiny model learns to answer ------------------------------------------------------


def test_instruction_tuning_lowers_the_loss_and_answers(tmp_path):
    from task.runtime import TaskRuntime
    from task.training import evaluate_task, train_local

    colours = ["red", "green", "blue"]
    path = _jsonl(tmp_path / "colours.jsonl",
                  [{"instruction": f"colour number {i % 3}", "output": colours[i % 3],
                    "colour": colours[i % 3]} for i in range(40)])
    settings = TaskSettings.from_run_config({
        "model": "tiny-llama", "task": "instruction", "dataset": str(path), "max-length": 32,
        "local-steps": 30, "batch-size": 8, "learning-rate": 1e-2, "group-column": "colour",
        "max-new-tokens": 3})
    rt = TaskRuntime.build(settings)
    train, test = rt.encoded_partition(0, 1), rt.encoded_test()
    assert (len(train), len(test)) == (32, 8)
    generation = dataclasses.replace(settings.generation, eval_samples=2)

    def scores():
        return evaluate_task(rt.model, rt.tokenizer, test, batch_size=8, device=rt.device,
                             generation=generation)

    before = scores()
    result = train_local(rt.model, rt.tokenizer, train, settings.train, device=rt.device, seed=0)
    after = scores()
    assert result.steps == 30 and result.loss_last < result.loss_first - 2.0
    assert after.scores["loss"] < before.scores["loss"] - 2.0
    assert before.scores["exact_match"] == 0.0
    assert after.scores["exact_match"] > 0.0  # measured: 0.375 on the 8 held-out examples
    # per-group scores, and the overall score is their example-weighted mean
    groups = sorted(set(test.groups))
    counts = {g: test.groups.count(g) for g in groups}
    assert {f"{g}_exact_match" for g in groups} | {f"{g}_rouge_l" for g in groups} \
        | {"loss", "perplexity", "exact_match", "rouge_l"} == set(after.scores)
    assert after.scores["exact_match"] == pytest.approx(
        sum(counts[g] * after.scores[f"{g}_exact_match"] for g in groups) / len(test))
    assert len(after.samples) == 2
    sample = after.samples[0]
    assert sample["reference"] == test.references[0] and sample["group"] == test.groups[0]
    assert sample["prompt"].startswith("< | user | > colour number")
    # the split and the prepared records
    data = load_task_data(settings.data, "instruction")
    assert len(data.train) == 32 and data.label_names == []


def test_generation_off_reports_perplexity_only(chat_tok):
    import torch

    from task.model import attach_lora, load_base_model
    from task.settings import LoraSettings
    from task.training import evaluate_task

    ms = ModelSettings(model="tiny-llama", task="instruction")
    model = attach_lora(load_base_model(ms, num_labels=0), LoraSettings(lora_rank=2), TASK,
                        seed=0)
    ds = TASK.prepare(Dataset.from_dict({"prompt": ["a", "b"], "response": ["x", "y"]}),
                      _settings())
    enc = TASK.encode(ds, chat_tok, 32)
    off = evaluate_task(model, chat_tok, enc, batch_size=2, device=torch.device("cpu"),
                        generation=GenerationSettings(eval_generate=False))
    assert set(off.scores) == {"loss", "perplexity"} and off.samples == []
