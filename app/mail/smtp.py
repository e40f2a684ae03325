"""Delivery through an SMTP server."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from email.message import EmailMessage

from app.mail import MailUnavailable


class SmtpMailer:
    """One connection per message; the whole exchange ends within ``timeout`` seconds.

    smtplib's timeout bounds each socket operation, and one message takes dozens of them: a
    server that answers each just in time (or drips a reply one byte at a time) would hold the
    request for many timeouts. A timer therefore cuts the connection when the deadline for the
    whole message passes; whatever smtplib was waiting for then fails at once.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        implicit_tls: bool,
        starttls: bool,
        timeout: int,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.implicit_tls = implicit_tls
        self.starttls = starttls
        self.timeout = timeout

    def send(self, message: EmailMessage) -> None:
        smtp = (
            smtplib.SMTP_SSL(timeout=self.timeout, context=ssl.create_default_context())
            if self.implicit_tls
            else smtplib.SMTP(timeout=self.timeout)
        )
        deadline = threading.Timer(self.timeout, _cut, args=(smtp,))
        deadline.daemon = True
        deadline.start()
        try:
            smtp.connect(self.host, self.port)
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise MailUnavailable(f"SMTP {self.host}:{self.port}: {exc}") from exc
        finally:
            deadline.cancel()
            _quit(smtp)


def _cut(smtp: smtplib.SMTP) -> None:
    """The deadline passed: end the connection under whatever smtplib is waiting for."""
    sock = smtp.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return


def _quit(smtp: smtplib.SMTP) -> None:
    """Say goodbye if there is time; a message accepted before this stays sent either way."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
