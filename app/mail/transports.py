"""The configured mail transport, built once by the app factory."""

from __future__ import annotations

from flask import Flask

from app.mail import Mailer
from app.mail.console import ConsoleMailer
from app.mail.smtp import SmtpMailer


def init_app(app: Flask) -> None:
    """Build the configured transport and keep it on the app."""
    config = app.config
    mailer: Mailer
    if config["MAIL_BACKEND"] == "smtp":
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
        mailer = ConsoleMailer()
    app.extensions["mailer"] = mailer
