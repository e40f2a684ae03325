"""The SMTP adapter against servers that misbehave slowly."""

from __future__ import annotations

import time
from email.message import EmailMessage

import pytest

from app.mail import MailUnavailable
from app.mail.smtp import SmtpMailer
from tests.conftest import smtp_server
from tests.servers import dripping_server, hung_server


def mailer(port: int, timeout: int = 2) -> SmtpMailer:
    return SmtpMailer(
        host="127.0.0.1",
        port=port,
        username=None,
        password=None,
        implicit_tls=False,
        starttls=False,
        timeout=timeout,
    )


def message() -> EmailMessage:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "a@example.org", "b@example.org", "Hello"
    mail.set_content("Hello")
    return mail


def test_a_server_that_never_answers_costs_the_deadline_once() -> None:
    with hung_server() as port:
        started = time.monotonic()
        with pytest.raises(MailUnavailable):
            mailer(port).send(message())
    assert time.monotonic() - started < 3


def test_a_server_that_answers_one_byte_at_a_time_still_costs_only_the_deadline() -> None:
    greeting = b"220 slow.example ESMTP a greeting sent one byte at a time\r\n"
    with dripping_server(greeting, interval=0.2) as port:
        started = time.monotonic()
        with pytest.raises(MailUnavailable):
            mailer(port).send(message())
    assert time.monotonic() - started < 3, "each read was in time, the whole was not"


def test_a_working_server_gets_the_message() -> None:
    with smtp_server() as (port, inbox):
        mailer(port).send(message())
    assert [m["Subject"] for m in inbox.messages] == ["Hello"]
