"""Greedy generation in batches, and the scores of generated answers.

Prompts are left-padded into batches and decoded greedily with the KV cache
(``model.generate``), stopping at the end-of-turn/EOS token or after
``max-new-tokens``. Answers are scored against the reference response by:

- **exact match** after normalisation (lower case, punctuation, the articles a/an/the
  and extra whitespace removed: SQuAD's rule), for short answers;
- **ROUGE-L** F1 (Google's ``rouge-score`` package, with its Porter stemmer), for
  free text.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from task.tasks.base import autocast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalise_answer(prediction) == normalise_answer(reference))


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (0 when either is empty)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end an answer: the model's EOS, the tokenizer's, and its end token.

    The end token (:func:`~task.tasks.templates.end_token`: EOS, else SEP) closes every
    response in training under the plain template, so generation must stop at it too.
    """
    from task.tasks.templates import end_token

    found: list[int] = []
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    end = end_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end) if end else None
    for value in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id,
                                                                         end_id]:
        if value is not None and value not in found:
            found.append(int(value))
    return found


def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
    device: torch.device, dtype: torch.dtype | None = None,
) -> list[str]:
    """Greedy answers to token-id ``prompts``, decoded without special tokens."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(model, tokenizer)
    answers: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, prompt in enumerate(rows):  # left padding: every answer starts at `width`
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        with torch.inference_mode(), autocast(device, dtype):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 use_cache=True, pad_token_id=pad_id,
                                 eos_token_id=stops or None)
        for row in out[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def answer_scores(predictions: Sequence[str], references: Sequence[str],
                  groups: Sequence[str] | None = None) -> dict[str, float]:
    """Mean exact match and ROUGE-L, overall and per group (``<group>_exact_match``...)."""
    em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    rl = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    scores = {"exact_match": _mean(em), "rouge_l": _mean(rl)}
    for group in sorted(set(groups or [])):
        members = [i for i, g in enumerate(groups or []) if g == group]
        scores[f"{group}_exact_match"] = _mean([em[i] for i in members])
        scores[f"{group}_rouge_l"] = _mean([rl[i] for i in members])
    return scores


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
