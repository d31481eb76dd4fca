"""Instruction data in its three common shapes, brought into one: prompt messages + response.

- **Alpaca** records: ``instruction``, optional ``input``, ``output``. The user turn is
  the instruction, followed by a blank line and the input when there is one.
- **Prompt/response** columns: the user turn is the prompt.
- **Chat** ``messages``: a list of ``{"role", "content"}`` turns (roles ``system``,
  ``user``, ``assistant``); the last turn is the assistant's response, the turns before
  it are the prompt.

Column names are settings (``instruction-column``, ``input-column``, ``output-column``,
``prompt-column``, ``response-column``, ``messages-column``); ``instruction-format=auto``
picks the first shape whose columns the data has (messages, then Alpaca, then
prompt/response). ``system-prompt``, when set, becomes a system turn for records that
have none. Every record is checked: an error names the record (0-based), the column and
the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from task.tasks.base import require_columns

if TYPE_CHECKING:
    from datasets import Dataset

    from task.settings import DataSettings

FORMATS = ("auto", "messages", "alpaca", "prompt-response")
ROLES = ("system", "user", "assistant")
#: canonical columns of prepared instruction data
PROMPT_COLUMN, RESPONSE_COLUMN, GROUP_COLUMN = "prompt_messages", "response", "group"
FORMAT_COLUMN = "source_format"


def detect_format(ds: Dataset, settings: DataSettings) -> str:
    """The data's format: ``instruction-format``, or for ``auto`` the first that fits.

    Raises:
        ValueError: ``auto`` and no format's columns are present.

    """
    if settings.instruction_format != "auto":
        return settings.instruction_format
    columns = set(ds.column_names)
    if settings.messages_column in columns:
        return "messages"
    if {settings.instruction_column, settings.output_column} <= columns:
        return "alpaca"
    if {settings.prompt_column, settings.response_column} <= columns:
        return "prompt-response"
    raise ValueError(
        f"the dataset's columns {ds.column_names} fit no instruction format: expected "
        f"'{settings.messages_column}' (chat messages), '{settings.instruction_column}' and "
        f"'{settings.output_column}' (Alpaca), or '{settings.prompt_column}' and "
        f"'{settings.response_column}' (prompt/response); name yours with messages-column, "
        "instruction-column/output-column or prompt-column/response-column")


def format_columns(fmt: str, settings: DataSettings) -> list[str]:
    """The columns a format reads (Alpaca's input column is optional and not listed)."""
    if fmt == "messages":
        return [settings.messages_column]
    if fmt == "alpaca":
        return [settings.instruction_column, settings.output_column]
    return [settings.prompt_column, settings.response_column]


def _text(record: int, column: str, value: Any, *, required: bool) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"record {record}: column '{column}' holds {type(value).__name__} "
                         f"{value!r}, not text; fix the record")
    if required and not value.strip():
        raise ValueError(f"record {record}: column '{column}' is empty; every record needs "
                         "it (fill it in or remove the record)")
    return value


def _user_prompt(index: int, row: Mapping[str, Any], fmt: str,
                 settings: DataSettings) -> tuple[list[dict[str, str]], str]:
    if fmt == "alpaca":
        instruction = _text(index, settings.instruction_column,
                            row[settings.instruction_column], required=True)
        extra = _text(index, settings.input_column, row.get(settings.input_column),
                      required=False)
        user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction
        response = _text(index, settings.output_column, row[settings.output_column],
                         required=True)
    else:
        user = _text(index, settings.prompt_column, row[settings.prompt_column], required=True)
        response = _text(index, settings.response_column, row[settings.response_column],
                         required=True)
    return [{"role": "user", "content": user}], response


def _messages(index: int, value: Any, column: str) -> tuple[list[dict[str, str]], str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"record {index}: column '{column}' is text that is not a JSON "
                             "list of messages; give a list of {role, content}") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"record {index}: column '{column}' must be a non-empty list of "
                         f"{{role, content}} messages, got {type(value).__name__}")
    turns: list[dict[str, str]] = []
    for position, turn in enumerate(value):
        if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
            raise ValueError(f"record {index}: message {position} in '{column}' must have "
                             f"'role' and 'content', got {turn!r}")
        role = turn["role"]
        if role not in ROLES:
            raise ValueError(f"record {index}: message {position} in '{column}' has the "
                             f"unknown role {role!r}; roles are {ROLES}")
        content = _text(index, f"{column}[{position}].content", turn["content"],
                        required=role == "assistant")
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "assistant":
        raise ValueError(f"record {index}: the last message in '{column}' is from "
                         f"'{turns[-1]['role']}'; it must be the assistant's response")
    if not any(t["role"] == "user" for t in turns[:-1]):
        raise ValueError(f"record {index}: '{column}' has no user message before the "
                         "response")
    return turns[:-1], turns[-1]["content"]


def canonical_records(ds: Dataset, settings: DataSettings) -> dict[str, list[Any]]:
    """Every record as (prompt messages as JSON, response, format), and its group if set.

    Raises:
        ValueError: a column is missing or a record is malformed (named in the message).

    """
    fmt = detect_format(ds, settings)
    require_columns(ds, [*format_columns(fmt, settings), settings.group_column],
                    f"instruction format '{fmt}'; set its column names or instruction-format")
    prompts, responses = [], []
    for index, row in enumerate(ds):
        if fmt == "messages":
            turns, response = _messages(index, row[settings.messages_column],
                                        settings.messages_column)
        else:
            turns, response = _user_prompt(index, row, fmt, settings)
        if settings.system_prompt and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": settings.system_prompt}, *turns]
        prompts.append(json.dumps(turns, ensure_ascii=False))
        responses.append(response)
    columns: dict[str, list[Any]] = {PROMPT_COLUMN: prompts, RESPONSE_COLUMN: responses,
                                     FORMAT_COLUMN: [fmt] * len(prompts)}
    if settings.group_column:
        columns[GROUP_COLUMN] = [str(g) for g in ds[settings.group_column]]
    return columns
