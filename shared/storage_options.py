"""``--storage-options``: fsspec options from JSON, a file or the environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.redaction import SECRET_OPTION_KEYS, register_option_secrets


class BadStorageOptions(ValueError):
    """``--storage-options`` is not a JSON object."""


STORAGE_OPTIONS_ENV = "FORMATLAB_STORAGE_OPTIONS"


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options``: JSON, ``@path.json``, or (when absent) the same taken from
    ``FORMATLAB_STORAGE_OPTIONS``; the AWS environment is used by s3fs itself.

    A file or the environment keeps secrets out of command lines, which Ray records
    for a job's entrypoint.

    Raises:
        BadStorageOptions: not a JSON object, or an unreadable file (no secret shown).
    """
    where = "--storage-options"
    if not text:
        text, where = os.environ.get(STORAGE_OPTIONS_ENV, ""), STORAGE_OPTIONS_ENV
    if not text:
        return {}
    if text.startswith("@"):
        where = f"{where} file {text[1:]}"
        try:
            text = Path(text[1:]).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadStorageOptions(f"{where}: cannot read: {type(exc).__name__}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadStorageOptions(
            f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(value, dict):
        raise BadStorageOptions(f"{where} must be a JSON object")
    register_option_secrets(value)
    return value


def has_secrets(options: Mapping[str, Any]) -> bool:
    """True when ``options`` hold a secret-looking key (at any depth)."""
    return public_options(options) != dict(options)


def public_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without secret-looking keys (at any depth), safe to hand to Ray."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = public_options(value)
        elif not (isinstance(value, str) and SECRET_OPTION_KEYS.search(key)):
            out[key] = value
    return out


def s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Let s3fs pick up ``AWS_ENDPOINT_URL`` as boto does, unless options say otherwise."""
    opts = dict(options)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(opts.get("client_kwargs") or {})
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in client_kwargs:
        opts["endpoint_url"] = endpoint
    return opts
