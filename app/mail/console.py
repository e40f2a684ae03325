"""The development outbox: messages are printed, not sent."""

from __future__ import annotations

import sys
from email.message import EmailMessage
from typing import TextIO


class ConsoleMailer:
    """Prints each message's headers and plain-text body to a stream.

    It writes to the stream directly, not through logging: the application log never
    carries message contents, and production refuses this transport.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def send(self, message: EmailMessage) -> None:
        stream = self.stream or sys.stdout
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        stream.write(
            f"--- e-mail (console transport) ---\n"
            f"From: {message['From']}\nTo: {message['To']}\nSubject: {message['Subject']}\n\n"
            f"{text}\n--- end ---\n"
        )
        stream.flush()
