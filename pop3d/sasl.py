"""SASL mechanisms for POP3's AUTH command (RFC 5034, RFC 4422), without I/O.

A mechanism is one server-side exchange: the engine feeds it the client's
decoded responses with :meth:`Mechanism.step` and gets back either a
:class:`Challenge` to send or the :class:`~pop3d.credentials.Credentials`
that the exchange produced.  A response that breaks the mechanism's rules
raises :class:`SaslError`.  The engine does the base64, the ``+ `` lines,
``*`` (cancel) and the cleartext rule; a mechanism only knows its own
messages.  A new mechanism is a subclass listed in :data:`MECHANISMS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from . import replies
from .credentials import Credentials, Password

__all__ = ["MECHANISMS", "Challenge", "Login", "Mechanism", "Plain", "SaslError"]


class SaslError(Exception):
    """The client's response is not what the mechanism expects; the exchange fails.

    The message is one of the ``SASL_*`` texts of :mod:`pop3d.replies`: the
    engine sends it to the client.
    """


@dataclass(frozen=True)
class Challenge:
    """A server challenge (raw bytes; the engine base64-encodes them)."""

    data: bytes


class Mechanism(ABC):
    """One SASL exchange on the server's side.  A new object for each AUTH."""

    #: The name in CAPA's ``SASL`` line and in ``AUTH name``, upper case.
    name: ClassVar[str]
    #: Whether the password crosses the wire as it is (or as good as), so that
    #: the mechanism is refused on unencrypted, untrusted connections.
    sends_password: ClassVar[bool]

    @abstractmethod
    def step(self, response: bytes | None) -> Challenge | Credentials:
        """Take the client's next response; ``None`` when AUTH had no initial response."""


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(replies.SASL_NOT_UTF8.format(what=what)) from None
    if not text:
        raise SaslError(replies.SASL_EMPTY.format(what=what))
    return text


class Plain(Mechanism):
    """PLAIN (RFC 4616): one message, ``authzid NUL authcid NUL password``.

    Acting as another user (an authorization identity other than the
    authentication identity) is not supported and fails.
    """

    name = "PLAIN"
    sends_password = True

    def __init__(self) -> None:
        self._challenged = False

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if response is None:
            if self._challenged:
                raise SaslError(replies.SASL_ONE_MESSAGE.format(mechanism=self.name))
            self._challenged = True
            return Challenge(b"")  # the client sends its message after an empty challenge
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SaslError(replies.SASL_PLAIN_FORM)
        authzid = parts[0].decode("utf-8", "replace")
        user = _text(parts[1], "user name")
        password = _text(parts[2], "password")
        if authzid and authzid != user:
            raise SaslError(replies.SASL_OTHER_USER)
        return Password(user=user, secret=password)


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login): asks ``Username:``, then ``Password:``.

    Not a registered SASL mechanism, but what older clients (Outlook among
    them) use.  An initial response is taken as the user name.
    """

    name = "LOGIN"
    sends_password = True

    def __init__(self) -> None:
        self._user: str | None = None
        self._asked = False

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if self._user is None:
            if response is None:
                if self._asked:
                    raise SaslError(replies.SASL_EMPTY.format(what="user name"))
                self._asked = True
                return Challenge(replies.SASL_LOGIN_USER.encode())
            self._user = _text(response, "user name")
            return Challenge(replies.SASL_LOGIN_PASSWORD.encode())
        if response is None:
            raise SaslError(replies.SASL_EMPTY.format(what="password"))
        return Password(user=self._user, secret=_text(response, "password"))


MECHANISMS: tuple[type[Mechanism], ...] = (Plain, Login)
"""The mechanisms the engine offers by default, in the order CAPA lists them."""
