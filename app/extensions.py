"""Extension objects, created unbound and bound to an app in the factory."""

from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_migrate import Migrate
from flask_smorest import Api
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

from app.schemas import ErrorSchema

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
limiter = Limiter(key_func=get_remote_address)
cors = CORS()
api = SessionApi()
