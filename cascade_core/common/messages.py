"""One-line messages: what an exception says in its first line, the first keys of a state dict."""
from __future__ import annotations

SHOW = 5  # keys listed in an error


def first_keys(names, total: int | None = None) -> str:
    """The first :data:`SHOW` of ``names`` (sorted) for a message, with the total when there are more."""
    names = sorted(names)
    total = len(names) if total is None else total
    return ", ".join(names[:SHOW]) + (f" ... ({total} in all)" if total > SHOW else "")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error."""
    try:
        text = str(exc).strip()
    except Exception:  # an exception whose message cannot be made
        text = ""
    return text.splitlines()[0] if text else type(exc).__name__
