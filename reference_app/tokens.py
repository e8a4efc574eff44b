"""Token counting for the offline stand-ins: honest, simple and the same everywhere.

A token is a run of word characters or one punctuation mark. That is not any real
model's tokenizer, but it is what the stand-ins generate and bill by, so ``usage``
always equals what a caller can count in the text it sent and got back.
"""

from __future__ import annotations

import re

__all__ = ["count_tokens", "split_tokens", "truncate_tokens"]

_TOKEN = re.compile(r"\w+|[^\w\s]")


def split_tokens(text: str) -> list[str]:
    """The tokens of ``text``, in order."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """How many tokens ``text`` holds."""
    return sum(1 for _ in _TOKEN.finditer(text))


def truncate_tokens(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut after ``limit`` tokens, and whether anything was cut."""
    if limit <= 0:
        return "", bool(text.strip())
    for n, match in enumerate(_TOKEN.finditer(text), start=1):
        if n == limit:
            end = match.end()
            return text[:end], bool(text[end:].strip())
    return text, False
