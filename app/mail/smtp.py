"""Delivery through an SMTP server."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from email.message import EmailMessage

from app import deadline
from app.mail import MailUnavailable


class SmtpMailer:
    """One connection per message; the whole exchange ends within its bound.

    smtplib's timeout bounds each socket operation, and one message takes dozens of them: a
    server that answers each just in time (or drips a reply one byte at a time) would hold the
    request for many timeouts, and the host name is looked up before any timeout applies. The
    exchange therefore runs through ``deadline.call_within``, bounded by ``timeout`` and the
    time the request has left; at the bound the connection is cut under whatever smtplib was
    waiting for, and an exchange given up on never goes on to send the message late.
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
        given_up = threading.Event()

        def give_up() -> None:
            given_up.set()
            _cut(smtp)

        try:
            deadline.call_within(
                self.timeout, lambda: self._exchange(smtp, message, given_up), on_abandon=give_up
            )
        except deadline.DeadlineExceeded as exc:
            raise MailUnavailable(f"SMTP {self.host}:{self.port}: {exc}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise MailUnavailable(f"SMTP {self.host}:{self.port}: {exc}") from exc

    def _exchange(
        self, smtp: smtplib.SMTP, message: EmailMessage, given_up: threading.Event
    ) -> None:
        try:
            smtp.connect(self.host, self.port)
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            if not given_up.is_set():
                smtp.send_message(message)
        finally:
            _say_goodbye(smtp)


def _cut(smtp: smtplib.SMTP) -> None:
    """End the connection under whatever smtplib is waiting for."""
    sock = smtp.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return


def _say_goodbye(smtp: smtplib.SMTP) -> None:
    """Send QUIT and close without waiting for the reply.

    The message was accepted (or refused) by then; a server slow to answer QUIT must not turn
    a sent message into a reported failure.
    """
    try:
        if smtp.sock is not None:
            smtp.putcmd("quit")
    except (smtplib.SMTPException, OSError):
        pass
    smtp.close()
