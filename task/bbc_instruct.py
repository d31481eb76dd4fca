"""``bbc-news-instruct``: instructions built from the embedded BBC News articles.

Each article gives one Alpaca record (so no article is in both the training pool and
the held-out split), alternating between two kinds in file order:

- ``topic``: "What is the topic of this article? Answer with one word: business,
  entertainment, politics, sports or tech." followed by the article's opening; the
  output is the topic (the article's folder name), scored by exact match;
- ``headline``: "Write a headline for this news article." followed by the opening;
  the output is the headline (the first line of each BBC file), scored by ROUGE-L.

The opening is the first :data:`SNIPPET_WORDS` words of the body (after the headline).
Columns: ``instruction``, ``input``, ``output``, ``kind`` (topic/headline) and
``topic`` (for partitioning by topic, ``partition-by=topic``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

SNIPPET_WORDS = 60
HEADLINE_INSTRUCTION = "Write a headline for this news article."


def topic_instruction(topics: list[str]) -> str:
    """The topic question, listing the ``topics`` (the corpus's folder names)."""
    return ("What is the topic of this article? Answer with one word: "
            f"{', '.join(topics[:-1])} or {topics[-1]}.")


def article_parts(text: str) -> tuple[str, str]:
    """(headline, body) of a BBC file: its first non-empty line, and the rest."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines:  # an empty file: no headline, no body (skipped by the caller)
        return "", ""
    headline = next((line for line in lines if line), "")
    body = " ".join(line for line in lines[lines.index(headline) + 1:] if line)
    return headline, body


def bbc_instructions(root: Path, snippet_words: int = SNIPPET_WORDS) -> Dataset:
    """The instruction dataset from the BBC folder ``root`` (``<root>/<topic>/*.txt``)."""
    from datasets import Dataset

    rows: dict[str, list[str]] = {k: [] for k in ("instruction", "input", "output", "kind",
                                                  "topic")}
    index = 0
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    question = topic_instruction(topics) if topics else ""
    for topic in topics:
        for file in sorted((root / topic).glob("*.txt")):
            headline, body = article_parts(file.read_bytes().decode("utf-8", errors="replace"))
            if not headline or not body:
                continue
            kind = "topic" if index % 2 == 0 else "headline"
            index += 1
            rows["instruction"].append(question if kind == "topic" else HEADLINE_INSTRUCTION)
            rows["input"].append(" ".join(body.split()[:snippet_words]))
            rows["output"].append(topic if kind == "topic" else headline)
            rows["kind"].append(kind)
            rows["topic"].append(topic)
    if not rows["output"]:
        raise ValueError(f"no BBC articles found under {root}/<topic>/*.txt")
    return Dataset.from_dict(rows)
