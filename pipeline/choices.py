"""Named choices: the values a setting, a model card or an argument may take, as StrEnums.

A member is its text ("t1-to-t2", "median-volume") and compares equal to it, so model
cards, JSON, config.toml and the database hold the same strings as before these were
enums, and files written before read the same.
"""

from __future__ import annotations

import enum
from typing import Self


class Choice(enum.StrEnum):
    @classmethod
    def parse(cls, value: object, what: str) -> Self:
        """``value`` as a member; ValueError naming ``what`` and the choices if it is none."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(cls)
            raise ValueError(f"{what} must be one of {choices}, not {value!r}") from None
