"""Secrets (tokens, API keys, passwords) never reach presets, job.json or stored log tails.

A field is secret when the schema marks it `secret=True` or its name looks like a credential: it ends in `token`
(as a whole word: `hf_token`, not `max_token_length` or `keep_tokens`), or contains `api_key`, `apikey`, `password`,
`passwd` or `secret`.
"""
from __future__ import annotations

import re
from typing import Any

from sd_scripts import options as schema

_SECRET_NAME = re.compile(r"(^|[._])token$|api_?key|passw(or)?d|secret", re.IGNORECASE)
REDACTED = "***"


def is_secret(name: str) -> bool:
    """True for schema options marked secret and for credential-like names."""
    opt = schema.BY_NAME.get(name)
    if opt is not None:  # the schema says (num_vectors_per_token is no credential)
        return opt.secret
    return bool(_SECRET_NAME.search(name))


def strip_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values` without secret keys (recursing into nested dicts)."""
    out = {}
    for key, value in values.items():
        if is_secret(str(key)):
            continue
        out[key] = strip_secrets(value) if isinstance(value, dict) else value
    return out


def secret_values(values: dict[str, Any]) -> list[str]:
    """The non-empty secret strings in `values` (to redact them from text)."""
    found = []
    for key, value in values.items():
        if isinstance(value, dict):
            found += secret_values(value)
        elif is_secret(str(key)) and isinstance(value, str) and len(value) >= 4:
            found.append(value)
    return found


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of each secret replaced by ***."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
