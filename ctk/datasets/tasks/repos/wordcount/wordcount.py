"""Count words in text."""

import re
from collections import Counter


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``; punctuation is not part of a word."""
    return re.findall(r"\S+", text.lower())


def top(text: str, n: int = 3) -> list[tuple[str, int]]:
    return Counter(words(text)).most_common(n)
