"""Slugs as Prefect makes them with python-slugify: ASCII, runs of other characters to one '-'.

One rule for every name flowhand derives (worker resource ids, Docker container names,
Kubernetes names and label values), without slugify's transliteration table: non-ASCII letters
lose their accents or are dropped.
"""

from __future__ import annotations

import re
import unicodedata


def slugify(text: str, pattern: str = r"[^a-z0-9]+", max_length: int = 0,
            lowercase: bool = True, drop_quotes: bool = True) -> str:
    """`text` in ASCII, runs of characters matching `pattern` as one '-', at most `max_length`
    characters when that is set; lower-cased unless `lowercase` is false; quotes dropped
    (worker resource ids) or treated as any other character (Kubernetes names)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    if drop_quotes:
        ascii_text = re.sub(r"['\"]+", "", ascii_text)
    if lowercase:
        ascii_text = ascii_text.lower()
    slug = re.sub(r"-{2,}", "-", re.sub(pattern, "-", ascii_text)).strip("-")
    return slug[:max_length].rstrip("-") if max_length else slug
