"""Floors with the design card's libraries: the two rows, and nothing of the app.

generate-uuid's least work done the way the card says it is built: Flask-SQLAlchemy's session
writes the pending session row and its audit row in one transaction. ``FLOOR_LAYERS`` adds the
card's other per-request libraries one by one: ``limiter`` (flask-limiter counting one limit per
client in a moving window in memory, too high to be reached) and ``cors`` (flask-cors guarding
the path). None of the app's own work is here: no schemas or OpenAPI, no correlation id, no
security headers, no access log, no tombstone check, no retry on a collision.
"""

import os
import uuid

from flask import Flask, jsonify
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from sqlalchemy import insert

from app.extensions import db
from app.models import AuditEvent, ChatSession
from bench.floor_app import new_session_rows

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["FLOOR_DATABASE_URL"]
db.init_app(app)
layers = set(os.environ.get("FLOOR_LAYERS", "").split(","))
limiter = Limiter(get_remote_address, storage_uri="memory://", strategy="moving-window")
if "limiter" in layers:
    limiter.init_app(app)
if "cors" in layers:
    CORS(app, resources={r"/floor/*": {"origins": ["http://localhost:3000"]}})

_sessions = insert(ChatSession.__table__)
_audit = insert(AuditEvent.__table__)


@app.post("/floor/stack")
@limiter.limit("100000000/minute")
def floor_stack():
    new_id = uuid.uuid4()
    session, audit = new_session_rows(new_id)
    db.session.execute(_sessions, session)
    db.session.execute(_audit, audit)
    db.session.commit()
    return jsonify({"status": "success", "uuid": str(new_id)})
