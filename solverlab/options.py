"""``KEY=VALUE`` command-line options, parsed alike by every ``solverlab`` command (and by
plugin commands: :func:`parse_options` is public, also as ``solverlab.cli.parse_options``)."""

from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["key_value", "option_value", "parse_options"]


def option_value(text: str) -> Any:
    """A JSON value, or the text itself when it is not JSON (``variant=bh1``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def key_value(flag: str, item: str, prefixed: str | None = None) -> tuple[str | None, str, Any]:
    """``(part, key, value)`` of ``PART:KEY=VALUE`` (``prefixed`` names PART) or ``KEY=VALUE``."""
    example = (f"{flag} {prefixed}:KEY=VALUE, e.g. {flag} dpmpp-3m:official_d2=true"
               if prefixed == "SOLVER" else
               f"{flag} {prefixed}:KEY=VALUE, e.g. {flag} karras:rho=5" if prefixed else
               f"{flag} KEY=VALUE, e.g. {flag} dim=4")
    part = None
    body = item
    if prefixed:
        part, sep, body = item.partition(":")
        if not sep or not part.strip():
            raise click.BadParameter(f"{item!r} is not {prefixed}:KEY=VALUE; write {example}",
                                     param_hint=f"'{flag}'")
        part = part.strip()
    key, sep, raw = body.partition("=")
    if not sep or not key.strip() or not key.strip().isidentifier():
        raise click.BadParameter(f"{item!r} is not {'' if not prefixed else prefixed + ':'}"
                                 f"KEY=VALUE with KEY a name; write {example} (VALUE is JSON, "
                                 "or a bare string)", param_hint=f"'{flag}'")
    return part, key.strip(), option_value(raw.strip())


def parse_options(flag: str, items: tuple[str, ...]) -> dict[str, Any]:
    """``{key: value}`` of repeated ``flag KEY=VALUE`` items (``--model-option dim=4``); a value
    is JSON where it parses, else the bare string. A malformed item is a one-line usage error
    naming ``flag``. Public: plugin commands parse their options the same way."""
    out: dict[str, Any] = {}
    for item in items:
        _, key, value = key_value(flag, item)
        out[key] = value
    return out
