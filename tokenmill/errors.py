"""Errors shared across the engine's layers."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request parameter is invalid; `field` names it so servers can report it, `message` says what is wrong."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message
