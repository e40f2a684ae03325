"""Delivery through an SMTP server."""

from __future__ import annotations

import math
import smtplib
import ssl
import time
from email.message import EmailMessage
from typing import Any

from typing_extensions import Buffer

from app.mail import MailUnavailable

_SourceAddress = tuple[Any, ...] | str | Buffer | None


class _BoundedSMTP(smtplib.SMTP):
    """An SMTP client whose every step waits only for what is left of one deadline.

    smtplib's timeout applies to each socket operation, and one message takes a dozen of
    them (greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA...): a server that answers each
    just in time would hold the request for many timeouts. Every read and write here gets
    the time remaining instead, so one message never takes longer than the deadline.
    """

    deadline = math.inf

    def _time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("SMTP deadline passed")
        return left

    def connect(
        self, host: str = "localhost", port: int = 0, source_address: _SourceAddress = None
    ) -> tuple[int, bytes]:
        self.timeout = min(self.timeout, self._time_left())
        return super().connect(host, port, source_address)

    def send(self, s: Buffer | str) -> None:
        if self.sock is not None:
            self.sock.settimeout(self._time_left())
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        if self.sock is not None:
            self.sock.settimeout(self._time_left())
        return super().getreply()


class _BoundedSMTPSSL(_BoundedSMTP, smtplib.SMTP_SSL):
    """Implicit TLS (port 465 style) under the same deadline."""


class SmtpMailer:
    """One connection per message; the whole exchange bounded by ``timeout`` seconds."""

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
        try:
            smtp = self._connect()
        except (smtplib.SMTPException, OSError) as exc:
            raise MailUnavailable(f"SMTP {self.host}:{self.port}: {exc}") from exc
        try:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            raise MailUnavailable(f"SMTP {self.host}:{self.port}: {exc}") from exc
        finally:
            _quit(smtp)

    def _connect(self) -> smtplib.SMTP:
        smtp: _BoundedSMTP
        if self.implicit_tls:
            smtp = _BoundedSMTPSSL(timeout=self.timeout, context=ssl.create_default_context())
        else:
            smtp = _BoundedSMTP(timeout=self.timeout)
        smtp.deadline = time.monotonic() + self.timeout
        smtp.connect(self.host, self.port)
        return smtp


def _quit(smtp: smtplib.SMTP) -> None:
    """Say goodbye if there is time; a message accepted before this stays sent either way."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
