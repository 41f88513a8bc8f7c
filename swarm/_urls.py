"""`redact_url`: URLs fit for messages and logs, their credentials hidden."""

from __future__ import annotations

import re

__all__ = ["redact_url", "redis_url_problem"]

# The userinfo of any URL in the text (`user:password@` or a bare `token@`): up to the last `@`
# before the path, so an unencoded `@` in a password is hidden too.
_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")
# Query parameters that carry secrets (`?api_key=`, `&token=`, `password=`, ...).
_SECRET_PARAM = re.compile(
    r"([?&;](?:[\w.-]*[_.-]|api|access)?"
    r"(?:key|token|secret|password|passwd|pass|auth|authorization|signature|sig)=)[^&;#\s]*",
    re.IGNORECASE)


def redact_url(text: str) -> str:
    """`text` (a URL, or a message holding URLs) with userinfo and secret query parameters
    replaced by `***`."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub("***@", text))


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a redis://, rediss:// or unix:// URL as redis-py would read it (a
    port or database that isn't a number, a unix URL with no path), or None; with the URL's
    credentials hidden."""
    from redis.connection import parse_url

    try:
        parse_url(url)
    except (ValueError, TypeError) as exc:
        return f"{redact_url(url)!r} is not a usable Redis URL: {redact_url(str(exc))}"
    return None
