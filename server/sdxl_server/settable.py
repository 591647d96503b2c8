"""A dataclass field that can be set from outside the process, declared once with what ``--help`` says.

``setting(default, help)`` is ``dataclasses.field(default=...)`` plus a ``Setting`` in the field's
metadata. The server's settings (server_settings.py) turn every such field - its own and the engine's -
into a flag ``--<name>`` and an environment variable ``SDXL_<NAME>``, parse them by the field's type,
and show the field's default in ``--help``: adding a setting is adding one field here or in
engine/settings.py. Fields without a ``Setting`` are internal (tests and benchmarks set them in code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")
# The metadata key under which a field carries its Setting.
SETTING = "sdxl_setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a flag says and needs beyond its field's name, type and default."""

    help: str
    # What ``--help`` shows as the default when the field's own default would not say it (None fields,
    # defaults that depend on another setting); None: the field's default as written.
    shown_default: str | None = None
    # Text to value, raising ValueError with a message; None: parsed by the field's type.
    parse: Callable[[str], Any] | None = None
    # The flag may be given several times; its values reach `parse` joined by commas (as the
    # environment variable holds them).
    repeatable: bool = False


def setting(
    default: _T,
    help: str,
    *,
    shown_default: str | None = None,
    parse: Callable[[str], Any] | None = None,
    repeatable: bool = False,
) -> _T:
    """A field with ``default`` that can be set by a flag and an environment variable."""
    return dataclasses.field(
        default=default,
        metadata=described(help, shown_default=shown_default, parse=parse, repeatable=repeatable),
    )


def described(
    help: str,
    *,
    shown_default: str | None = None,
    parse: Callable[[str], Any] | None = None,
    repeatable: bool = False,
) -> dict[str, Setting]:
    """The metadata of a settable field without a default: ``dataclasses.field(metadata=described(...))``."""
    return {SETTING: Setting(help, shown_default, parse, repeatable)}


def setting_of(field: dataclasses.Field[Any]) -> Setting | None:
    """The field's Setting, or None when it cannot be set from outside."""
    found = field.metadata.get(SETTING)
    return found if isinstance(found, Setting) else None
