"""Credentials out of everything formatlab logs, stores or raises.

Secrets are learnt from storage options, the AWS environment and URLs' user-info as
they pass; :func:`redact` replaces every one it knows, and secret-looking query
parameters, with ``***``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from typing import Any

# Keys in storage options whose values are secrets.
SECRET_OPTION_KEYS = re.compile(r"(secret|token|password|passwd|session|key)$", re.I)
# Environment variables whose values are secrets.
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "RAY_AUTH_TOKEN",
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret so :func:`redact` removes it from any text."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def register_env_secrets() -> None:
    for name in _SECRET_ENV:
        register_secret(os.environ.get(name))


def register_option_secrets(options: Mapping[str, Any]) -> None:
    for key, value in options.items():
        if isinstance(value, Mapping):
            register_option_secrets(value)
        elif isinstance(value, str) and SECRET_OPTION_KEYS.search(key):
            register_secret(value)


_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<k>(?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|signature|token|"
    r"secret|password|access_key|secret_key|key)=)[^&\s\"']+",
    re.I,
)


def register_url_secrets(text: str) -> None:
    """Remember the user-info of URLs in ``text`` (``KEY:SECRET``, ``KEY``, ``SECRET``).

    Libraries quote such a URL's parts without the scheme (``Invalid bucket name
    "KEY:SECRET@bucket"``), which the URL pattern alone would not catch.
    """
    for match in _URL_USERINFO.finditer(text):
        userinfo = match.group(0)[len(match.group("scheme")):-1]
        register_secret(userinfo)
        for part in userinfo.split(":", 1):
            register_secret(part)


def redact(text: Any) -> str:
    """Return ``text`` as a string with every known credential replaced by ``***``.

    Removes registered secrets (storage options, AWS environment), the user-info
    part of URLs (``s3://KEY:SECRET@bucket``) and secret-looking query parameters.
    """
    register_env_secrets()
    out = str(text)
    register_url_secrets(out)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        out = out.replace(secret, "***")
    out = _URL_USERINFO.sub(r"\g<scheme>***@", out)
    return _QUERY_SECRET.sub(r"\g<k>***", out)


def one_line(exc: BaseException) -> str:
    """An exception's message as one line (multi-line library messages joined)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def redact_url(url: str) -> str:
    """A URL fit for logs and manifests: no user info, no secrets."""
    return redact(url)
