"""The exceptions of the server API, one base class for all of them."""

from __future__ import annotations

__all__ = ["NameTaken", "OptionError", "Pop3dError", "StateError", "UnknownConnection"]


class Pop3dError(Exception):
    """Base class of every error the server API raises on purpose."""


class NameTaken(Pop3dError, ValueError):
    """``new(name)`` was given the name of a server that exists."""


class OptionError(Pop3dError, ValueError):
    """An unknown option, a read-only one, or a bad value: nothing was changed.

    ``errors`` lists each problem as ``(option, message)``.
    """

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors))


class StateError(Pop3dError, RuntimeError):
    """The call is not allowed in the server's current state (up while exiting, say)."""


class UnknownConnection(Pop3dError, KeyError):
    """``conn_state(id)`` or ``close_connection(id)`` named no open connection."""

    def __str__(self) -> str:
        return f"no open connection {self.args[0]!r}"
