"""Turn a daemon settings' pydantic ``ValidationError`` into lines a user acts on: the flag they typed.

The daemons read settings from CLI options, ``SPLITINFER_<ROLE>_*`` variables and a config file; pydantic
reports field names, its own wording ("Input should be ...") and a documentation URL. :func:`describe` names
the CLI flag when the field has one (else the environment variable and the config key), says what value was
refused, and drops the URL, so ``splitinfer edge run --port -1`` answers::

    error: --port / SPLITINFER_EDGE_PORT (-1): must be greater than or equal to 0

(the value may have come from either, so both are named).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError


def _wording(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    if message.startswith("Input should be "):
        message = "must be " + message[len("Input should be "):]
    return message


def describe(exc: ValidationError, env_prefix: str, flags: Mapping[str, str] = ()) -> list[str]:
    """One line per error: ``FLAG / ENV_VAR (VALUE): what is wrong``; ``flags`` maps field names to their CLI
    flag (fields without one are named by their environment variable and config key)."""
    flags = dict(flags)
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err.get("loc", ())]
        field = loc[0] if loc else ""
        if not field:  # a model-level check (e.g. two fields that go together)
            lines.append(_wording(err["msg"]))
            continue
        env = f"{env_prefix}{field.upper()}"
        name = f"{flags[field]} / {env}" if field in flags else f"{env} (config key {field!r})"
        if err.get("type") == "missing":
            lines.append(f"{flags.get(field, env)} is required" + (f" (or set {env})" if field in flags else ""))
            continue
        if err.get("type") == "extra_forbidden":
            lines.append(f"unknown setting {field!r} (from the environment or the config file)")
            continue
        value = err.get("input")
        shown = f" ({value!r})" if isinstance(value, str) else f" ({value})" if value is not None else ""
        lines.append(f"{name}{shown}: {_wording(err['msg'])}")
    return lines
