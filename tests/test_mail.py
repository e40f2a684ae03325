"""The SMTP adapter against servers that misbehave slowly."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage

import pytest

from app import deadline
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


def test_inside_a_request_the_exchange_gets_only_the_time_left() -> None:
    with hung_server() as port:
        started = time.monotonic()
        with deadline.until(time.monotonic() + 0.5), pytest.raises(MailUnavailable):
            mailer(port, timeout=10).send(message())
    assert time.monotonic() - started < 1.0


def test_a_slow_goodbye_does_not_turn_a_sent_message_into_a_failure() -> None:
    with slow_to_say_goodbye() as (port, accepted):
        started = time.monotonic()
        mailer(port, timeout=2).send(message())
        elapsed = time.monotonic() - started
    assert accepted == [True]
    assert elapsed < 1.0


@contextmanager
def slow_to_say_goodbye() -> Iterator[tuple[int, list[bool]]]:
    """An SMTP server that accepts one message at once and answers QUIT only after 5 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[bool] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, connection.makefile("rb") as lines:
            connection.sendall(b"220 ready\r\n")
            in_data = False
            for line in lines:
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        accepted.append(True)
                        connection.sendall(b"250 accepted\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    in_data = True
                    connection.sendall(b"354 go on\r\n")
                elif verb == b"QUIT":
                    time.sleep(5)
                    return
                else:
                    connection.sendall(b"250 ok\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.close()
