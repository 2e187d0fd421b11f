"""String options of cache methods as enums, so that the generated config schema (``mukv.config.cache_schema``)
refuses an unknown value at compose time, naming the field.

Members are named by their values (OmegaConf looks an enum up by name), and a member is a ``str``: it equals,
hashes, prints and serialises as its value, so method code compares it with plain strings and a method built
by hand (tests, benchmarks) may still pass strings; ``validate`` names the field of a string that is not one.
"""

from __future__ import annotations

from enum import Enum

from mukv.errors import ConfigError


class StrOption(str, Enum):
    """Base of every string option of a cache method (subclass it with ``value = "value"`` members)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The allowed strings, in declaration order (for messages and checks)."""
        return tuple(m.value for m in cls)


def check_options(method: object, **options: type[StrOption]) -> None:
    """Raise ``ConfigError`` naming ``cache.<name>`` for the first knob whose value is not one of its option's
    (a method built by hand may hold any string; a composed config cannot)."""
    for name, option in options.items():
        value = getattr(method, name)
        if value not in option.values():
            raise ConfigError(f"cache.{name}", f"unknown value '{value}'; choose one of {', '.join(option.values())}")
