"""Telling the administrator: unexpected errors, job errors, server problems and suspicious bursts.

Notifications are built from what is known at the moment of the error, then handed to one
background thread that adds the session's recent audit events ("user actions") and mails
ADMIN_EMAIL; the request never waits for the mail server, and a failing mail server is
only logged. Each signature goes out at most once per ADMIN_NOTIFY_DEDUP_MINUTES in the whole
deployment: the ``admin_notices`` table is the shared record, and when the database is the
thing that is down each process falls back on its own memory. Without ADMIN_EMAIL the
notification is logged instead.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage

from flask import Flask, current_app, has_request_context, request
from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError

from app import metrics
from app.clock import utcnow
from app.extensions import db, upsert
from app.logging_setup import recent_problems
from app.mail import MailUnavailable, current_mailer
from app.models import AdminNotice, AuditEvent
from app.privacy import keyed_hash
from app.request_context import current_correlation_id, request_session_uuid
from app.services.pruning import delete_in_batches

log = logging.getLogger(__name__)

USER_ACTIONS_SHOWN = 20
# Signatures a process remembers for deduplication before it forgets expired ones.
SIGNATURES_REMEMBERED = 1024


@dataclass
class Alert:
    """One notification, as gathered where the problem happened."""

    subject: str
    signature: str
    facts: dict[str, str]
    session_uuid: uuid.UUID | None = None
    sections: dict[str, str] = field(default_factory=dict)


class AdminAlerts:
    """Deduplicates alerts and delivers them from a background thread."""

    def __init__(self, app: Flask) -> None:
        self._app = app
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin-alerts")
        self._last_sent: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def send(self, alert: Alert) -> Future[None] | None:
        """Queue ``alert`` unless this process sent the same signature within the window."""
        now = utcnow()
        with self._lock:
            last = self._last_sent.get(alert.signature)
            if last is not None and now - last < self._window():
                return None
            if len(self._last_sent) >= SIGNATURES_REMEMBERED:
                self._forget_expired(now)
            self._last_sent[alert.signature] = now
        return self._executor.submit(self._deliver, alert, now)

    def _forget_expired(self, now: datetime) -> None:
        """Drop signatures whose window has passed; past the limit, the oldest too.

        A long-lived worker sees ever new signatures (a signature can name a client network);
        the map must not grow with them. Forgetting one early only risks a repeated alert, and
        the deployment-wide record in ``admin_notices`` still holds it back.
        """
        window = self._window()
        for signature, sent_at in list(self._last_sent.items()):
            if now - sent_at >= window:
                del self._last_sent[signature]
        while len(self._last_sent) >= SIGNATURES_REMEMBERED:
            del self._last_sent[next(iter(self._last_sent))]

    def remembered(self) -> int:
        """How many signatures this process holds back (for tests and metrics)."""
        with self._lock:
            return len(self._last_sent)

    def _window(self) -> timedelta:
        return timedelta(minutes=self._app.config["ADMIN_NOTIFY_DEDUP_MINUTES"])

    def _deliver(self, alert: Alert, now: datetime) -> None:
        with self._app.app_context():
            try:
                if not _first_in_deployment(alert.signature, now, self._window()):
                    return
                if alert.session_uuid is not None:
                    alert.sections["User actions (latest audit events of the session)"] = (
                        _user_actions(alert.session_uuid)
                    )
                address = current_app.config["ADMIN_EMAIL"]
                if address is None:
                    log.warning("admin notification, ADMIN_EMAIL unset: %s", alert.subject)
                    return
                current_mailer().send(_compose(alert, address))
                metrics.count_email(metrics.ADMIN_NOTIFICATION_MAIL, sent=True)
            except MailUnavailable:
                metrics.count_email(metrics.ADMIN_NOTIFICATION_MAIL, sent=False)
                log.error("admin notification not sent: mail server unavailable")
                self._forget(alert.signature, now)
            except Exception:
                metrics.count_email(metrics.ADMIN_NOTIFICATION_MAIL, sent=False)
                log.exception("admin notification failed")
                self._forget(alert.signature, now)

    def _forget(self, signature: str, now: datetime) -> None:
        """A notification that did not go out must not silence the next one of its kind."""
        with self._lock:
            if self._last_sent.get(signature) == now:
                del self._last_sent[signature]
        try:
            db.session.execute(
                delete(AdminNotice).where(
                    AdminNotice.signature_hash == _signature_hash(signature),
                    AdminNotice.last_sent_at == now,
                )
            )
            db.session.commit()
        except SQLAlchemyError:
            db.session.rollback()


def init_app(app: Flask) -> None:
    app.extensions["admin_alerts"] = AdminAlerts(app)


def current_alerts() -> AdminAlerts:
    alerts: AdminAlerts = current_app.extensions["admin_alerts"]
    return alerts


def report_exception(exc: BaseException, *, status: int | None = None) -> None:
    """Notify about an error that answered ``status`` (5xx), or broke a job (no status).

    Never raises: it runs inside error handlers, whose own answer must still go out.
    """
    try:
        _report_exception(exc, status)
    except Exception:
        log.exception("admin notification could not be prepared")


def _report_exception(exc: BaseException, status: int | None) -> None:
    where = _where(exc)
    facts = {"Time": utcnow().isoformat(), "Error": f"{type(exc).__name__}: {exc}"}
    session_uuid = None
    endpoint = "a background job"
    if has_request_context():
        endpoint = request.endpoint or "unmatched"
        session_uuid = request_session_uuid()
        facts.update(
            {
                "Status": str(status),
                "Correlation ID": current_correlation_id(),
                "Session UUID": str(session_uuid) if session_uuid else "unknown",
                # The route, not the path: a path can carry a download link's token.
                "Request": f"{request.method} {request.url_rule.rule if request.url_rule else '?'}",
            }
        )
    current_alerts().send(
        Alert(
            subject=f"{status or 'Error'} {type(exc).__name__} in {endpoint}",
            signature=f"exception:{_cause(exc)}:{where}:{endpoint}",
            facts=facts,
            session_uuid=session_uuid,
            sections={
                "Stack trace": "".join(traceback.format_exception(exc)),
                "Recent warnings and errors": "\n".join(recent_problems.lines),
            },
        )
    )


def _where(exc: BaseException) -> str:
    """The innermost frame of the app's own code the error passed through.

    The innermost frame of all is usually a library's (SQLAlchemy's ``default.py`` for every
    database error), which would give unrelated failures one signature.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    own = [frame for frame in frames if f"{os.sep}app{os.sep}" in frame.filename]
    chosen = own or frames
    if not chosen:
        return "unknown"
    return f"{os.path.basename(chosen[-1].filename)}:{chosen[-1].lineno}"


def _cause(exc: BaseException) -> str:
    """The error's type, with the driver's error and code behind a database error.

    A lock wait (55P03) and a lost connection are both SQLAlchemy OperationalErrors raised
    at the same line: different causes, which must not hide each other's alerts.
    """
    original = getattr(exc, "orig", None)
    if original is None:
        return type(exc).__name__
    code = getattr(original, "pgcode", None)
    return f"{type(exc).__name__}/{type(original).__name__}/{code or '-'}"


def notify(subject: str, signature: str, facts: dict[str, str]) -> Future[None] | None:
    """Notify about a problem outside any request or job (a server event, a failing probe)."""
    return current_alerts().send(
        Alert(subject=subject, signature=signature, facts={"Time": utcnow().isoformat(), **facts})
    )


def report_job_error(job: str, error: str, session_uuid: uuid.UUID | None = None) -> None:
    """Notify about an error a background job recorded and survived."""
    current_alerts().send(
        Alert(
            subject=f"{job}: {error[:80]}",
            signature=f"job:{job}:{error[:120]}",
            facts={
                "Time": utcnow().isoformat(),
                "Job": job,
                "Error": error,
                **({"Session UUID": str(session_uuid)} if session_uuid else {}),
            },
            session_uuid=session_uuid,
        )
    )


def forget_old_notices(now: datetime) -> int:
    """Drop deduplication records whose window has passed, in batches; how many."""
    window = timedelta(minutes=current_app.config["ADMIN_NOTIFY_DEDUP_MINUTES"])
    return delete_in_batches(AdminNotice, AdminNotice.last_sent_at < now - window)


def _first_in_deployment(signature: str, now: datetime, window: timedelta) -> bool:
    """Claim ``signature`` for this window in the shared table; False if another process has.

    One statement decides: the row is inserted, or its time moved forward only if the last
    notification is older than the window. If the database cannot be reached, the process's
    own record (checked before this) is all there is, so the notification goes out.
    """
    statement = (
        upsert(AdminNotice)
        .values(signature_hash=_signature_hash(signature), last_sent_at=now)
        .on_conflict_do_update(
            index_elements=["signature_hash"],
            set_={"last_sent_at": now},
            where=AdminNotice.last_sent_at <= now - window,
        )
        .returning(AdminNotice.signature_hash)
    )
    try:
        claimed = db.session.execute(statement).first() is not None
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.warning("admin notification deduplicated per process only: database unavailable")
        return True
    return claimed


def _signature_hash(signature: str) -> str:
    # Keyed: a signature can name a client network, and networks are few enough to enumerate.
    return keyed_hash("admin-notice", signature)


def _user_actions(session_uuid: uuid.UUID) -> str:
    try:
        events = db.session.scalars(
            select(AuditEvent)
            .where(AuditEvent.session_uuid == session_uuid)
            .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
            .limit(USER_ACTIONS_SHOWN)
        ).all()
    except SQLAlchemyError:
        return "(unavailable: the database could not be read)"
    finally:
        db.session.rollback()
    return (
        "\n".join(
            f"{event.occurred_at.isoformat()} {event.event_type} {event.details}"
            for event in reversed(events)
        )
        or "(none)"
    )


def _compose(alert: Alert, address: str) -> EmailMessage:
    config = current_app.config
    lines = [f"{name}: {value}" for name, value in alert.facts.items()]
    for title, text in alert.sections.items():
        lines += ["", f"== {title} ==", text or "(none)"]
    message = EmailMessage()
    message["Subject"] = f"[{config['SERVICE_NAME']}] {alert.subject}"
    message["From"] = config["MAIL_FROM"]
    message["To"] = address
    message.set_content("\n".join(lines))
    return message
