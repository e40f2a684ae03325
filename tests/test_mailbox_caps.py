"""The daily cap per mailbox: counted per client network, under a higher ceiling per mailbox.

A stranger's network can use up only its own allowance for a mailbox, so the owner, asking from
another network, still gets codes; plus-tags fold into one mailbox, so they multiply nothing.
Real SMTP (aiosmtpd), on SQLite and PostgreSQL, with the default settings unless a test says.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import Counter
from contextlib import closing

import psycopg2
import pytest
from flask import Flask
from sqlalchemy import select

from app.extensions import db, lock_key
from app.models import EmailSend
from tests.conftest import (
    JSON_HEADERS,
    TEST_SECRET_KEY,
    Inbox,
    build_app,
    code_in,
    smtp_env,
    smtp_server,
)
from tests.test_locks import dsn, eventually, waiting_for_advisory_lock

VICTIM = "victim@example.com"
# The defaults: five codes a day per mailbox from one network, twenty from all networks.
PER_NETWORK = 5
CEILING = 20
NETWORKS = ["198.51.100", "203.0.113", "192.0.2", "100.64.0", "100.64.1"]


@pytest.fixture
def app(database_url: str, mail_server: tuple[int, Inbox]) -> Flask:
    return build_app(database_url, **smtp_env(mail_server[0]))


def new_session(app: Flask, client_ip: str) -> str:
    response = app.test_client().post(
        "/api/v1/generate-uuid", headers=JSON_HEADERS, environ_base={"REMOTE_ADDR": client_ip}
    )
    return str(response.get_json()["uuid"])


def ask_code(app: Flask, client_ip: str, email: str, session_uuid: str | None = None) -> str:
    """verify-email from ``client_ip`` in a new session (or the one given): ``sent`` or the code."""
    session_uuid = session_uuid or new_session(app, client_ip)
    response = app.test_client().post(
        "/api/v1/email-verification/verify-email",
        json={"email": email},
        headers={**JSON_HEADERS, "X-Session-ID": session_uuid},
        environ_base={"REMOTE_ADDR": client_ip},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    return "sent" if body["status"] == "success" else str(body["code"])


def keyed(message: str) -> str:
    return hmac.new(TEST_SECRET_KEY.encode(), message.encode(), hashlib.sha256).hexdigest()


def test_a_strangers_network_uses_up_only_its_own_allowance(app: Flask, inbox: Inbox) -> None:
    # Five new sessions in quick succession from one /24, as in the report, and a sixth.
    stranger = [ask_code(app, f"198.51.100.{host}", VICTIM) for host in (7, 8, 9, 10, 11, 250)]
    owner_session = new_session(app, "203.0.113.5")

    owner = ask_code(app, "203.0.113.5", VICTIM, owner_session)

    assert stranger == ["sent"] * PER_NETWORK + ["address_daily_limit"]
    assert owner == "sent"
    assert len(inbox.to(VICTIM)) == PER_NETWORK + 1
    verified = app.test_client().post(
        "/api/v1/email-verification/verify-code",
        json={"code": code_in(inbox.to(VICTIM)[-1])},
        headers={**JSON_HEADERS, "X-Session-ID": owner_session},
        environ_base={"REMOTE_ADDR": "203.0.113.5"},
    )
    assert verified.get_json()["nextTransition"] == "CHAT_READY"
    # What is kept of the asker: a keyed hash of its network, nothing more.
    with app.app_context():
        networks = Counter(db.session.scalars(select(EmailSend.network_hash)))
    assert networks == {
        keyed("network:198.51.100.0/24"): PER_NETWORK,
        keyed("network:203.0.113.0/24"): 1,
    }


def test_plus_tags_count_as_one_mailbox_and_the_mail_goes_as_typed(
    app: Flask, inbox: Inbox
) -> None:
    typed = [
        "victim+1@example.com",
        "Victim+news@Example.com",
        "victim@example.com",
        "VICTIM@example.com",
        "victim+a+b@example.com",
    ]
    answers = [ask_code(app, "198.51.100.7", address) for address in typed]
    another_tag = ask_code(app, "198.51.100.7", "victim+2@example.com")
    other_mailbox = ask_code(app, "198.51.100.7", "victim2+1@example.com")

    assert answers == ["sent"] * PER_NETWORK
    assert another_tag == "address_daily_limit"
    assert other_mailbox == "sent"
    assert [message["To"] for message in inbox.messages] == [
        "victim+1@example.com",
        "Victim+news@example.com",
        "victim@example.com",
        "VICTIM@example.com",
        "victim+a+b@example.com",
        "victim2+1@example.com",
    ]
    with app.app_context():
        hashes = list(db.session.scalars(select(EmailSend.address_hash).order_by(EmailSend.id)))
    assert hashes == [keyed("address:victim@example.com")] * PER_NETWORK + [
        keyed("address:victim2@example.com")
    ]


def test_the_mailbox_ceiling_stops_many_networks_together(app: Flask, inbox: Inbox) -> None:
    # Each network asks its full share, tagged its own way: five shares are more than the ceiling.
    answers = [
        ask_code(app, f"{network}.{host}", f"victim+{host}@example.com")
        for network in NETWORKS
        for host in range(1, PER_NETWORK + 1)
    ]

    assert answers == ["sent"] * CEILING + ["address_daily_limit"] * (
        len(NETWORKS) * PER_NETWORK - CEILING
    )
    assert len(inbox.messages) == CEILING


def test_ipv6_clients_are_grouped_by_their_64(app: Flask, inbox: Inbox) -> None:
    one_64 = [
        "2001:db8:1:2::1",
        "2001:db8:1:2:ffff:ffff:ffff:fffe",
        "2001:db8:1:2::3",
        "2001:DB8:1:2:0:0:0:4",
        "2001:db8:1:2:8000::5",
    ]
    answers = [ask_code(app, address, VICTIM) for address in one_64]
    same_64 = ask_code(app, "2001:db8:1:2:abcd::9", VICTIM)
    # The next /64 of the same /48: another subscriber.
    next_64 = ask_code(app, "2001:db8:1:3::1", VICTIM)
    # An IPv4-mapped address is its IPv4 network.
    mapped = ask_code(app, "::ffff:198.51.100.7", VICTIM)

    assert answers == ["sent"] * PER_NETWORK
    assert (same_64, next_64, mapped) == ("address_daily_limit", "sent", "sent")
    with app.app_context():
        networks = set(db.session.scalars(select(EmailSend.network_hash)))
    assert networks == {
        keyed("network:2001:db8:1:2::/64"),
        keyed("network:2001:db8:1:3::/64"),
        keyed("network:198.51.100.0/24"),
    }


def test_concurrent_sessions_from_many_networks_stay_within_both_caps(postgres_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(postgres_url, **smtp_env(port))
        # Five networks, each asking its full share at once: together more than the ceiling.
        askers = [
            (f"{network}.{host}", new_session(app, f"{network}.{host}"))
            for network in NETWORKS
            for host in range(1, PER_NETWORK + 1)
        ]
        start = threading.Barrier(len(askers))
        answers: list[tuple[str, str]] = []
        lock = threading.Lock()

        def ask(index: int, client_ip: str, session_uuid: str) -> None:
            start.wait()
            # A different plus-tag each time: they must be counted, and locked, as one mailbox.
            answer = ask_code(app, client_ip, f"victim+{index}@example.com", session_uuid)
            with lock:
                answers.append((client_ip.rpartition(".")[0], answer))

        threads = [
            threading.Thread(target=ask, args=(index, client_ip, session_uuid))
            for index, (client_ip, session_uuid) in enumerate(askers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    sent_per_network = Counter(network for network, answer in answers if answer == "sent")
    assert len(answers) == len(askers)
    assert {answer for _, answer in answers} == {"sent", "address_daily_limit"}
    assert sum(sent_per_network.values()) == CEILING
    assert max(sent_per_network.values()) <= PER_NETWORK
    assert len(inbox.messages) == CEILING


def test_a_plus_tagged_send_waits_for_the_lock_on_its_mailbox(postgres_url: str) -> None:
    with smtp_server() as (port, inbox):
        app = build_app(postgres_url, **smtp_env(port))
        session_uuid = new_session(app, "198.51.100.7")
        mailbox_lock = lock_key(f"email-address:{keyed('address:victim@example.com')}")
        answers: list[str] = []

        # The test holds the folded mailbox's lock, as a request counting its sends would.
        with closing(psycopg2.connect(dsn(postgres_url))) as holder:
            holder.cursor().execute("SELECT pg_advisory_xact_lock(%s)", (mailbox_lock,))
            waiting = threading.Thread(
                target=lambda: answers.append(
                    ask_code(app, "198.51.100.7", "Victim+shop@example.com", session_uuid)
                )
            )
            waiting.start()
            waited = eventually(lambda: waiting_for_advisory_lock(postgres_url, mailbox_lock))
            answered_while_held = list(answers)
            holder.rollback()
        waiting.join(20)

    assert waited, "a plus-tagged send did not take its mailbox's lock"
    assert answered_while_held == []
    assert answers == ["sent"]
    assert [message["To"] for message in inbox.messages] == ["Victim+shop@example.com"]
