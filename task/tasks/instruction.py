"""Instruction tuning: prompt and response, loss on the response only, scored on answers.

Data formats and their checks: :mod:`task.tasks.instruction_data`; prompt templates and
truncation: :mod:`task.tasks.templates`; generation and its metrics:
:mod:`task.tasks.generation`.

Loss: the response tokens only (prompt and padding are masked to -100). Without DP it
is the mean over every response token of the batch, as transformers computes it; under
DP-SGD each example's loss is the mean over its own response tokens, and the batch
loss is the mean over examples (per-example clipping needs a mean over examples), so
under DP a short answer weighs as much as a long one.
"""

from __future__ import annotations

from logging import WARNING
from typing import TYPE_CHECKING

from task.encoded import Encoded
from task.tasks import instruction_data as records
from task.tasks.base import Evaluation, require_columns
from task.tasks.causal_lm import CausalLM, perplexity_scores
from task.tasks.generation import answer_scores, generate_answers
from task.tasks.registry import register
from task.tasks.templates import has_chat_template, tokenize_examples

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from task.settings import DataSettings, GenerationSettings


class Instruction(CausalLM):
    """Prompt/response pairs (Alpaca, prompt/response columns or chat messages).

    Collation and the per-example loss are causal LM's: the prompt lengths in the
    encoded data mask the prompt tokens, so both cover the response only.
    """

    name = "instruction"
    peft_task_type = "CAUSAL_LM"
    metric = "rouge_l"
    higher_is_better = True

    def required_columns(self, settings: DataSettings) -> list[str]:
        """The columns of the configured format (for ``auto``: the messages column)."""
        fmt = settings.instruction_format
        return records.format_columns("messages" if fmt == "auto" else fmt, settings)

    def prepare(self, ds: Dataset, settings: DataSettings) -> Dataset:
        """Check every record; keep (prompt messages, response[, group]) and partition-by."""
        from datasets import Dataset

        require_columns(ds, [settings.partition_by], "set partition-by")
        columns = records.canonical_records(ds, settings)
        if settings.partition_by and settings.partition_by not in columns:
            columns[settings.partition_by] = list(ds[settings.partition_by])
        return Dataset.from_dict(columns)

    def encode(self, ds: Dataset, tokenizer: PreTrainedTokenizerBase,
               max_length: int) -> Encoded:
        """Prompt + response ids (the prompt cut first), with the prompt lengths.

        Raises:
            ValueError: chat ``messages`` data and a tokenizer without a chat template, or
                no response fits in ``max-length``.

        """
        if not has_chat_template(tokenizer) and "messages" in set(ds[records.FORMAT_COLUMN]):
            raise ValueError("chat 'messages' data needs a tokenizer with a chat template, and "
                             "this model's has none: use a chat/instruct model, or give the "
                             "data as Alpaca or prompt/response columns (plain template)")
        prompts, responses = ds[records.PROMPT_COLUMN], ds[records.RESPONSE_COLUMN]
        tokens = tokenize_examples(tokenizer, prompts, responses, max_length)
        if len(ds) and not tokens.kept:
            raise ValueError(f"no response fits in max-length={max_length} tokens "
                             f"(all {len(ds)} records dropped); raise max-length")
        if tokens.dropped:
            from flwr.supercore import log

            log(WARNING, "instruction data: %d of %d records dropped: their response alone "
                "takes max-length=%d tokens or more", len(tokens.dropped), len(ds),
                max_length)
        groups = ds[records.GROUP_COLUMN] if records.GROUP_COLUMN in ds.column_names else None
        return Encoded(
            input_ids=[p + r for p, r in zip(tokens.prompts, tokens.responses, strict=True)],
            prompt_lengths=[len(p) for p in tokens.prompts],
            references=[responses[i] for i in tokens.kept],
            groups=None if groups is None else [groups[i] for i in tokens.kept],
            task=self.name, dropped=len(tokens.dropped))

    def evaluate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 data: Encoded, *, batch_size: int, device: torch.device,
                 autocast: torch.dtype | None = None,
                 generation: GenerationSettings | None = None) -> Evaluation:
        """Response perplexity; with generation on, exact match and ROUGE-L of greedy answers.

        The samples are the first ``eval-samples`` (prompt, reference, generated) triples.
        """
        scores = perplexity_scores(self, model, tokenizer, data, batch_size=batch_size,
                                   device=device, dtype=autocast)
        if generation is None or not generation.eval_generate or len(data) == 0:
            return Evaluation(scores)
        lengths = data.prompt_lengths or [len(ids) for ids in data.input_ids]
        prompts = [ids[:n] for ids, n in zip(data.input_ids, lengths, strict=True)]
        answers = generate_answers(model, tokenizer, prompts,
                                   max_new_tokens=generation.max_new_tokens,
                                   batch_size=batch_size, device=device, dtype=autocast)
        references = data.references or [""] * len(data)
        scores.update(answer_scores(answers, references, data.groups))
        samples = [{"prompt": tokenizer.decode(prompts[i], skip_special_tokens=False),
                    "reference": references[i], "generated": answers[i],
                    **({} if data.groups is None else {"group": data.groups[i]})}
                   for i in range(min(generation.eval_samples, len(data)))]
        return Evaluation(scores, samples)


register(Instruction())
