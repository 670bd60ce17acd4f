"""Credentials in URLs: what in a URL is one, and URLs with them taken out, for every message and log line.

A data URL reaches the back-end without credentials (s3fs, gcsfs, ... read theirs from the environment and
their config files); one that holds them is refused where it enters (the config, storage.filesystem), and
whatever text leaves the program (an error, a log line) passes through `redact` on its way out."""

from __future__ import annotations

import re

# A URL inside any text: a scheme, "://", then up to a space, a quote, an angle bracket, a parenthesis or a
# comma (messages put URLs in parentheses and lists).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>(),]*")
# An authority without user info: a host (or an [IPv6] address) and an optional numeric port.
_PLAIN_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:@]*)(:[0-9]*)?")
# Query keys that carry a secret: X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature,
# Azure's sig, Signature, AWSAccessKeyId, token, access_token, api_key, password, ...
_SECRET_KEY = re.compile(r"sig|token|credential|secret|passw|pwd|key|auth", re.IGNORECASE)
_QUERY_PART = re.compile(r"([^?&;=]*)=([^&;]*)")
HIDDEN = "***"


def _split(url: str) -> tuple[str, str, str, str]:
    """(scheme://, user info with its "@" or "", the rest before any "?", the query with its "?" or "")."""
    scheme, rest = url.split("://", 1)
    head, mark, query = rest.partition("?")
    authority = re.split(r"[/#]", head, maxsplit=1)[0]
    userinfo = ""
    if "@" in authority:
        userinfo = authority[: authority.rindex("@") + 1]
    elif not _PLAIN_AUTHORITY.fullmatch(authority) and "@" in head:
        userinfo = head[: head.index("@") + 1]  # a password holding "/" ends the authority early
    return f"{scheme}://", userinfo, head[len(userinfo) :], mark + query


def _secret_keys(query: str) -> list[str]:
    """The keys of the query's key=value parts that carry a secret. A part without "=" is no key: a glob's
    "?" (part-?.gz) starts no query."""
    return [key for key, _ in _QUERY_PART.findall(query) if _SECRET_KEY.search(key)]


def credentials_in(url: str) -> str | None:
    """What in `url` is a credential, in words that do not repeat it; None when it holds none."""
    if "://" not in url:
        return None
    _, userinfo, _, query = _split(url)
    found = []
    if userinfo:
        found.append("a password" if ":" in userinfo or "%3a" in userinfo.lower() else "a user name")
    keys = _secret_keys(query)
    if keys:
        found.append(f"a signature or token in its query ({', '.join(f'{key}=' for key in keys)})")
    return " and ".join(found) or None


def redact(text: str) -> str:
    """`text` with every URL in it stripped of its user info and of the values of its query parts that
    carry a secret (X-Amz-Signature=***). The one function every error and log line passes through."""
    return _URL.sub(lambda match: _redacted(match.group()), text)


def _redacted(url: str) -> str:
    scheme, _, rest, query = _split(url)

    def hide(part: re.Match) -> str:
        key = part.group(1)
        return f"{key}={HIDDEN}" if _SECRET_KEY.search(key) else part.group()

    return scheme + rest + _QUERY_PART.sub(hide, query)
