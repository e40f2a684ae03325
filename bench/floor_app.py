"""Floors under generate-uuid: the rows it must write, with nothing else around them.

Each endpoint inserts a pending session row and its audit row in one transaction, the least
work generate-uuid can do and still keep the contract's audit rule. ``/floor/psycopg2`` does it
with bare psycopg2, which prices the data work itself; ``/floor/sqlalchemy`` does it with
SQLAlchemy Core on the app's own tables, which adds the price of the data layer the app is
built on. Neither has rate limiting, schemas, CORS, headers, logging or a tombstone check.
"""

import json
import os
import uuid
from datetime import UTC, datetime

from flask import Flask, jsonify
from sqlalchemy import create_engine, insert

from app.models import AuditEvent, ChatSession, SessionState
from bench.bare_app import connection

app = Flask(__name__)
_engine = create_engine(os.environ["FLOOR_DATABASE_URL"], pool_size=1)
_sessions = insert(ChatSession.__table__)
_audit = insert(AuditEvent.__table__)

SESSION_SQL = (
    "INSERT INTO chat_sessions (uuid, state, created_at, last_seen_at, client_ip,"
    " consent_user_data, email_verified) VALUES (%s, 'pending', %s, %s, %s, false, false)"
)
AUDIT_SQL = (
    "INSERT INTO audit_events (occurred_at, event_type, session_uuid, client_ip,"
    " correlation_id, details) VALUES (%s, 'uuid_generated', %s, %s, %s, %s)"
)


@app.post("/floor/psycopg2")
def floor_psycopg2():
    new_id, now, correlation_id = str(uuid.uuid4()), datetime.now(UTC), str(uuid.uuid4())
    conn = connection()
    with conn.cursor() as cursor:
        cursor.execute(SESSION_SQL, (new_id, now, now, "127.0.0.0"))
        details = json.dumps({"attempt": 1})
        cursor.execute(AUDIT_SQL, (now, new_id, "127.0.0.0", correlation_id, details))
    conn.commit()
    return jsonify({"status": "success", "uuid": new_id})


def new_session_rows(new_id: uuid.UUID) -> tuple[dict, dict]:
    """The values of a pending session row and of its ``uuid_generated`` audit row."""
    now = datetime.now(UTC)
    session = {
        "uuid": new_id,
        "state": SessionState.PENDING,
        "created_at": now,
        "last_seen_at": now,
        "client_ip": "127.0.0.0",
        "consent_user_data": False,
        "email_verified": False,
    }
    audit = {
        "occurred_at": now,
        "event_type": "uuid_generated",
        "session_uuid": new_id,
        "client_ip": "127.0.0.0",
        "correlation_id": str(uuid.uuid4()),
        "details": {"attempt": 1},
    }
    return session, audit


@app.post("/floor/sqlalchemy")
def floor_sqlalchemy():
    new_id = uuid.uuid4()
    session, audit = new_session_rows(new_id)
    with _engine.begin() as conn:
        conn.execute(_sessions, session)
        conn.execute(_audit, audit)
    return jsonify({"status": "success", "uuid": str(new_id)})
