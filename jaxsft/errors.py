"""The error a user can fix: `python -m jaxsft.<stage>` reports it as one line and exits 2."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a config value, a data or model file); the message
    names what is wrong, where (field, file, row, tensor) and what to do about it."""
