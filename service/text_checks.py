"""The one check that request text is valid, encodable, visible Unicode (issue #15).

A lone UTF-16 surrogate (JSON ``"\\ud800"``) survives JSON parsing as a Python ``str`` but no
tokenizer or store can encode it; text made only of zero-width / format characters
(``"\\u200b\\ufeff"``) is empty to a reader yet would be indexed and searched. Both are refused
here so the schemas answer 422 before any model or queue sees them. Empty or whitespace-only
text is left to :func:`service.media.clean_text` (its own "text is empty" 422).
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Unicode categories a reader cannot see: controls, format (zero-width, BOM), surrogates,
# private use, unassigned, and separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def check_text(text: str) -> str:
    """Return ``text`` unchanged, or raise ValueError saying why it is not usable text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text is not valid Unicode: {text[exc.start]!r} at position {exc.start} "
            "(a lone surrogate) cannot be encoded"
        ) from None
    if text.strip() and not any(unicodedata.category(ch) not in _INVISIBLE for ch in text):
        raise ValueError("text has only invisible (zero-width or format) characters")
    return text


def check_encodable(value: Any, where: str) -> Any:
    """Return ``value`` unchanged, or raise ValueError if any string in it (dict keys included,
    at any depth) cannot be encoded as UTF-8. Iterative, so deep nesting cannot overflow."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{where} holds text that is not valid Unicode (a lone surrogate)"
                ) from None
    return value
