"""Prompt formatting and truncation for instruction tuning.

A tokenizer with a chat template (SmolLM2-Instruct, Llama, Qwen, ...) formats the prompt
turns with ``add_generation_prompt=True``; the response is what the template adds for
the assistant's turn (its text and end-of-turn token). A tokenizer without one uses the
plain template (:data:`PLAIN_PROMPT`), the response followed by the EOS token::

    [<system prompt><blank line>]### Instruction:
    <user turn>

    ### Response:
    <response><eos>

Chat ``messages`` data (several turns) needs a chat template. Truncation keeps the
response: when prompt and response exceed ``max-length``, tokens are cut from the
middle of the prompt (its start, with the system prompt and the instruction, and its
end, with the generation prompt, are kept); an example whose response alone takes
``max-length`` tokens or more is dropped, and the drops are counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


@dataclass
class Tokenized:
    """Prompt and response token ids of each kept example, and the dropped ones' indices."""

    prompts: list[list[int]]
    responses: list[list[int]]
    kept: list[int]
    dropped: list[int]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def end_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text that ends a response under the plain template (EOS, else SEP, else none)."""
    return tokenizer.eos_token or getattr(tokenizer, "sep_token", None) or ""


def plain_prompt(turns: list[dict[str, str]]) -> str:
    """The plain-template prompt of a system turn (optional) and one user turn.

    Raises:
        ValueError: more than one user turn, or assistant turns (multi-turn chat data
            needs a tokenizer with a chat template).

    """
    system = [t["content"] for t in turns if t["role"] == "system"]
    users = [t["content"] for t in turns if t["role"] == "user"]
    if len(users) != 1 or any(t["role"] == "assistant" for t in turns):
        raise ValueError("multi-turn chat messages need a tokenizer with a chat template; "
                         "this one has none: use a chat model, or one user turn per record")
    head = f"{system[0]}\n\n" if system else ""
    return head + PLAIN_PROMPT.format(user=users[0])


def format_texts(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]],
                 response: str) -> tuple[str, str]:
    """(prompt text, response text) under the tokenizer's chat template or the plain one."""
    if not has_chat_template(tokenizer):
        return plain_prompt(turns), response + end_token(tokenizer)
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": response}],
                                         tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):].rstrip()
    return prompt, response + end_token(tokenizer)  # a template that rewrites earlier turns


def cut_middle(ids: list[int], budget: int) -> list[int]:
    """``ids`` shortened to ``budget`` tokens by removing tokens from the middle."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                      responses: list[str], max_length: int) -> Tokenized:
    """Format and tokenize (prompt messages JSON, response) pairs, keeping each response.

    Raises:
        ValueError: chat-formatted prompts need a chat template the tokenizer lacks.

    """
    chat = has_chat_template(tokenizer)
    pairs = [format_texts(tokenizer, json.loads(p), r) for p, r in zip(prompts, responses,
                                                                      strict=True)]
    prompt_ids = tokenizer([p for p, _ in pairs], add_special_tokens=not chat)["input_ids"]
    response_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = Tokenized([], [], [], [])
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(response) >= max_length or not response:
            out.dropped.append(index)
            continue
        out.prompts.append(cut_middle(list(prompt), max_length - len(response)))
        out.responses.append(list(response))
        out.kept.append(index)
    return out
