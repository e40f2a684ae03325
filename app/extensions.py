"""Extension objects, created unbound and bound to an app in the factory, and database helpers."""

import hashlib
from typing import Any

from flask_cors import CORS
from flask_limiter import Limiter
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import CursorResult, Executable, MetaData, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase

from app.privacy import client_key
from app.schemas import ErrorSchema
from config import AUTOCOMMIT_BIND

# Stable constraint names let Alembic alter or drop them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base carrying the constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionApi(Api):
    """The OpenAPI registry, documenting errors in the contract's shape."""

    ERROR_SCHEMA = ErrorSchema


# Services return rows after committing; expiring them would cost a reload per attribute.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
migrate = Migrate()
# request.remote_addr is already the client address: ProxyFix rewrites it only for trusted proxies.
limiter = Limiter(key_func=client_key)
cors = CORS()
api = SessionApi()


def execute(statement: Executable, params: Any = None) -> CursorResult[Any]:
    """Run a Core statement in the current transaction, without flushing pending ORM changes.

    Through the connection rather than ``db.session.execute``: a table-level statement needs
    none of the ORM's per-call work. Callers must not depend on an object added to the session
    but not yet flushed.
    """
    return db.session.connection().execute(statement, params)


def scalar_alone(statement: Executable, params: Any) -> Any:
    """Run one statement in a transaction of its own, on PostgreSQL, and return its scalar.

    The statement commits as it ends (one round trip, no BEGIN or COMMIT), outside the
    current session's transaction: use it for a change that one statement makes whole.
    """
    with db.engines[AUTOCOMMIT_BIND].connect() as connection:
        return connection.execute(statement, params).scalar()


def upsert(model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT for ``model`` that accepts ON CONFLICT clauses on the database in use."""
    if on_postgresql():
        return postgresql.insert(model)
    return sqlite.insert(model)


def on_postgresql() -> bool:
    """Whether the database in use is PostgreSQL (else SQLite, the embedded default)."""
    # The engine, not the session: asking the session would create one where none is needed.
    return db.engine.dialect.name == "postgresql"


def has_advisory_locks() -> bool:
    """Whether the database in use offers advisory locks (PostgreSQL does, SQLite does not).

    Without them, the caller's first write takes SQLite's database-wide write lock, which
    serialises writers just as well.
    """
    return on_postgresql()


def lock_key(name: str) -> int:
    """The advisory lock key (a signed 64-bit integer) for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def advisory_xact_lock(name: str, *, wait: bool = True) -> bool:
    """Hold the advisory lock ``name`` until the transaction ends (PostgreSQL only).

    Waiting is bounded by the connection's lock_timeout; without ``wait``, returns False at
    once if another transaction holds the lock.
    """
    function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
    result = db.session.execute(text(f"SELECT {function}(:key)"), {"key": lock_key(name)})
    return result.scalar() is not False


def try_advisory_xact_locks(names: list[str]) -> list[str]:
    """Of ``names``, those whose advisory locks this transaction now holds, taken in one statement.

    Never waits: a lock another transaction holds is left out (PostgreSQL only).
    """
    keys = {lock_key(name): name for name in names}
    held = db.session.execute(_TRY_LOCKS, {"keys": list(keys)}).scalars()
    return [keys[key] for key in held]


_TRY_LOCKS = text(
    "SELECT key FROM unnest(CAST(:keys AS bigint[])) AS key WHERE pg_try_advisory_xact_lock(key)"
)
