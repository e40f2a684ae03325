"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import inspect

from app import create_app
from app.extensions import db
from app.models import is_audit_partition
from tests.conftest import base_env


def skip_audit_partitions(name: str | None, type_: str, parent_names: object) -> bool:
    return not (type_ == "table" and is_audit_partition(name))


def test_upgrade_on_an_empty_database_matches_the_models(database_url: str) -> None:
    app = create_app(base_env(database_url))
    with app.app_context():
        downgrade(revision="base")
        assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
        upgrade()
        with db.engine.connect() as connection:
            opts = {"compare_type": True, "include_name": skip_audit_partitions}
            context = MigrationContext.configure(connection, opts=opts)
            differences = compare_metadata(context, db.metadata)
    assert differences == []
