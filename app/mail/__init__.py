"""Outgoing e-mail behind one small interface.

Two transports implement it: SMTP (``smtp.py``, the only module that imports smtplib) and a
console transport for development that prints each message to standard output.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Protocol

from flask import Flask, current_app


class MailUnavailable(Exception):
    """The message could not be handed to the mail server."""


class Mailer(Protocol):
    """What the service needs from a mail transport."""

    def send(self, message: EmailMessage) -> None:
        """Deliver ``message`` or raise MailUnavailable."""
        ...


def init_app(app: Flask) -> None:
    """Build the configured transport and keep it on the app."""
    config = app.config
    mailer: Mailer
    if config["MAIL_BACKEND"] == "smtp":
        from app.mail.smtp import SmtpMailer

        mailer = SmtpMailer(
            host=config["SMTP_HOST"],
            port=config["SMTP_PORT"],
            username=config["SMTP_USERNAME"],
            password=config["SMTP_PASSWORD"],
            implicit_tls=config["SMTP_SSL"],
            starttls=config["SMTP_STARTTLS"] and not config["SMTP_SSL"],
            timeout=config["SMTP_TIMEOUT_SECONDS"],
        )
    else:
        from app.mail.console import ConsoleMailer

        mailer = ConsoleMailer()
    app.extensions["mailer"] = mailer


def current_mailer() -> Mailer:
    """The mail transport of the current app."""
    mailer: Mailer = current_app.extensions["mailer"]
    return mailer
