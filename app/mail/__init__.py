"""Outgoing e-mail behind one small interface.

Two transports implement it: SMTP (``smtp.py``, the only module that imports smtplib) and a
console transport for development that prints each message to standard output;
``transports.py`` builds the configured one. The interface imports neither, so no import runs
from this package's top to its transports and back.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Protocol

from flask import current_app


class MailUnavailable(Exception):
    """The message could not be handed to the mail server."""


class Mailer(Protocol):
    """What the service needs from a mail transport."""

    def send(self, message: EmailMessage) -> None:
        """Deliver ``message`` or raise MailUnavailable."""
        ...


def current_mailer() -> Mailer:
    """The mail transport of the current app."""
    mailer: Mailer = current_app.extensions["mailer"]
    return mailer
