"""Scores of generated answers (exact match, ROUGE-L) and greedy generation's stopping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from task.model import load_tokenizer
from task.settings import ModelSettings
from task.tasks.generation import (
    answer_scores,
    exact_match,
    generate_answers,
    normalise_answer,
    rouge_l,
    stop_token_ids,
)

SEP, PAD = 102, 0


@pytest.mark.parametrize(("text", "expected"), [
    ("The Sport!", "sport"),
    ("  An   Apple, a day.  ", "apple day"),
    ("theatre", "theatre"),  # articles only as whole words
    ("A-B testing", "ab testing"),  # punctuation is removed, not replaced by a space
    ("", ""),
])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("The Sport!", "sport", 1.0),
    ("sport", "sports", 0.0),  # no stemming in exact match
    ("an apple", "Apple.", 1.0),
    ("red green", "green red", 0.0),
    ("", "", 1.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    # LCS 3; P = 3/3, R = 3/4; F = 2PR/(P+R) = 1.5/1.75
    ("the cat sat", "the cat sat down", 6 / 7),
    # the same, the other way round (F is symmetric in P and R)
    ("the cat sat down", "the cat sat", 6 / 7),
    # LCS ("red green black" or "red blue black") 3 of 4 both ways: P = R = F = 3/4
    ("red green blue black", "red blue green black", 0.75),
    # lower-cased and punctuation dropped by the rouge-score tokenizer
    ("Hello, World!", "hello world", 1.0),
    # Porter stemming: cats -> cat, running/runs -> run
    ("cats running", "cat runs", 1.0),
    # LCS 1 ("dog"); P = 1/2, R = 1/3; F = (1/3)/(5/6) = 0.4
    ("big dog", "dog ran away", 0.4),
    ("completely different", "nothing shared", 0.0),
    ("", "the cat", 0.0),
    ("the cat", "", 0.0),
])
def test_rouge_l_by_hand(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-6)


def test_answer_scores_overall_and_per_group():
    predictions = ["sport", "tech", "the cat sat", "Dollar gains"]
    references = ["Sport", "business", "the cat sat down", "dollar gains"]
    groups = ["topic", "topic", "headline", "headline"]
    scores = answer_scores(predictions, references, groups)
    assert set(scores) == {"exact_match", "rouge_l", "topic_exact_match", "topic_rouge_l",
                           "headline_exact_match", "headline_rouge_l"}
    assert scores["exact_match"] == pytest.approx(2 / 4)
    assert scores["rouge_l"] == pytest.approx((1 + 0 + 6 / 7 + 1) / 4)
    assert scores["topic_exact_match"] == pytest.approx(1 / 2)
    assert scores["topic_rouge_l"] == pytest.approx(1 / 2)
    assert scores["headline_exact_match"] == pytest.approx(1 / 2)
    assert scores["headline_rouge_l"] == pytest.approx((6 / 7 + 1) / 2)


def test_answer_scores_without_groups_and_without_answers():
    assert answer_scores(["a cat"], ["cat"]) == {"exact_match": 1.0, "rouge_l": pytest.approx(
        2 / 3)}  # ROUGE-L keeps the article: LCS 1, P = 1/2, R = 1 -> F = 2/3
    assert answer_scores([], [], []) == {"exact_match": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError):
        answer_scores(["one"], ["one", "two"])


# --- greedy generation: left padding, stopping at the end token ---------------------------


class ScriptedModel(torch.nn.Module):
    """A stand-in for a causal LM whose ``generate`` appends fixed tokens to each row."""

    def __init__(self, new_tokens: list[list[int]], eos: int | list[int] | None) -> None:
        super().__init__()
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.new_tokens = new_tokens
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(),
                           **kwargs})
        start = sum(c["input_ids"].shape[0] for c in self.calls[:-1])
        new = torch.tensor(self.new_tokens[start:start + input_ids.shape[0]])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """MiniLM's tokenizer without a chat template (tiny-gpt2): no EOS, [SEP] ends responses."""
    return load_tokenizer(ModelSettings(model="tiny-gpt2", task="instruction"))


def test_generation_left_pads_and_cuts_at_the_first_stop_token(plain_tokenizer):
    tok = plain_tokenizer
    green, red, blue = tok.convert_tokens_to_ids(["green", "red", "blue"])
    model = ScriptedModel([[green, SEP, red], [red, blue, PAD], [blue, blue, blue]], eos=SEP)
    prompts = [[5, 6, 7], [8], [9, 10]]
    answers = generate_answers(model, tok, prompts, max_new_tokens=3, batch_size=2,
                               device=torch.device("cpu"))
    assert answers == ["green", "red blue", "blue blue blue"]
    first, second = model.calls
    assert first["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert second["input_ids"].tolist() == [[9, 10]]
    assert first["do_sample"] is False and first["max_new_tokens"] == 3
    assert first["eos_token_id"] == [SEP]


def test_plain_template_end_token_stops_generation(plain_tokenizer):
    # tiny-gpt2's config says EOS 50256; the tokenizer has no EOS and ends every training
    # response with [SEP] (templates.end_token): generation must stop there as well.
    tok = plain_tokenizer
    assert tok.eos_token_id is None and tok.sep_token_id == SEP
    model = ScriptedModel([[tok.convert_tokens_to_ids("green"), SEP, 2417]], eos=50256)
    assert stop_token_ids(model, tok) == [50256, SEP]
    assert generate_answers(model, tok, [[5]], max_new_tokens=3, batch_size=4,
                            device=torch.device("cpu")) == ["green"]


def test_stop_tokens_are_unique_and_include_every_configured_eos(plain_tokenizer):
    assert stop_token_ids(ScriptedModel([], eos=[7, SEP, 7]), plain_tokenizer) == [7, SEP]
    assert stop_token_ids(ScriptedModel([], eos=None), plain_tokenizer) == [SEP]
