"""Answer extraction: the rule that turns a generated text into a final answer.

GSM8K-style: the number after the last `####` if there is one, otherwise the
last number in the text. Numbers are compared after normalisation (commas,
currency signs and trailing `.0` removed) so "1,000" matches "1000".
"""
from __future__ import annotations

import re

MARK = "####"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize(answer: str) -> str:
    """Canonical form used for exact match."""
    s = answer.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return " ".join(s.split()).lower()
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer a completion commits to, or None if it gives none."""
    if MARK in text:
        tail = text.rsplit(MARK, 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return normalize(m.group())
        stripped = tail.strip().splitlines()
        return normalize(stripped[0]) if stripped and stripped[0].strip() else None
    found = _NUMBER.findall(text)
    return normalize(found[-1]) if found else None


def is_correct(text: str, answer: str) -> bool:
    got = extract_answer(text)
    return got is not None and got == normalize(answer)
