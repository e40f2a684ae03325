"""Audit rows partitioned by day on PostgreSQL; indexes for the burst check and tombstone pruning.

On PostgreSQL ``audit_events`` becomes a table partitioned by range of ``occurred_at``: one
partition per UTC day (``audit_events_pYYYYMMDD``) from the oldest row to a week ahead, and a
default partition for rows of any other date, so a restore of old rows always inserts. Retention
then drops whole days instead of deleting rows (app/services/audit_partitions.py). The primary
key becomes (id, occurred_at): PostgreSQL requires the partition key in every unique index. The
existing rows are copied, so on a large table this migration takes as long as that copy.
SQLite keeps a plain table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The table as migration 0001 made it, with the primary key and partitioning given.
_CREATE = """
CREATE TABLE audit_events (
    id bigint NOT NULL DEFAULT nextval('audit_events_id_seq'),
    occurred_at timestamp with time zone NOT NULL,
    event_type varchar(64) NOT NULL,
    session_uuid uuid,
    client_ip varchar(45),
    correlation_id varchar(36),
    details jsonb NOT NULL,
    CONSTRAINT pk_audit_events PRIMARY KEY ({key})
) {partitioning}
"""
_COPY = (
    "INSERT INTO audit_events (id, occurred_at, event_type, session_uuid, client_ip,"
    " correlation_id, details) SELECT id, occurred_at, event_type, session_uuid, client_ip,"
    " correlation_id, details FROM {source}"
)
REJECTED = sa.text("event_type = 'verification_code_rejected'")


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        _partition_audit_events()
    # The wrong-code burst check reads only rejected codes of one client in the last minutes.
    op.create_index(
        "ix_audit_events_rejected_codes",
        "audit_events",
        ["client_ip", "occurred_at"],
        postgresql_where=REJECTED,
        sqlite_where=REJECTED,
    )
    # Tombstones are pruned by age; they are written in time order, so a BRIN index is enough.
    op.create_index(
        "ix_retired_session_uuids_retired_at",
        "retired_session_uuids",
        ["retired_at"],
        postgresql_using="brin",
    )


def downgrade():
    op.drop_index("ix_retired_session_uuids_retired_at", table_name="retired_session_uuids")
    op.drop_index("ix_audit_events_rejected_codes", table_name="audit_events")
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_audit_events()


def _partition_audit_events():
    op.execute("ALTER TABLE audit_events RENAME TO audit_events_unpartitioned")
    for index in (
        "pk_audit_events",
        "ix_audit_events_occurred_at",
        "ix_audit_events_session_uuid_occurred_at",
    ):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_unpartitioned")
    op.execute(
        _CREATE.format(key="id, occurred_at", partitioning="PARTITION BY RANGE (occurred_at)")
    )
    op.execute("ALTER SEQUENCE audit_events_id_seq OWNED BY audit_events.id")
    op.execute("CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT")
    # Days are UTC days, whatever the server's time zone.
    op.execute(
        """
        DO $$
        DECLARE
            today date := (now() AT TIME ZONE 'UTC')::date;
            day date := LEAST(
                today,
                (SELECT (min(occurred_at) AT TIME ZONE 'UTC')::date FROM audit_events_unpartitioned)
            );
        BEGIN
            WHILE day <= today + 7 LOOP
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                    'audit_events_p' || to_char(day, 'YYYYMMDD'),
                    day::timestamp AT TIME ZONE 'UTC',
                    (day + 1)::timestamp AT TIME ZONE 'UTC'
                );
                day := day + 1;
            END LOOP;
        END $$
        """
    )
    op.execute(_COPY.format(source="audit_events_unpartitioned"))
    op.execute("DROP TABLE audit_events_unpartitioned")
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])
    op.create_index(
        "ix_audit_events_session_uuid_occurred_at", "audit_events", ["session_uuid", "occurred_at"]
    )


def _unpartition_audit_events():
    op.execute("ALTER TABLE audit_events RENAME TO audit_events_partitioned")
    for index in (
        "pk_audit_events",
        "ix_audit_events_occurred_at",
        "ix_audit_events_session_uuid_occurred_at",
    ):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_partitioned")
    op.execute(_CREATE.format(key="id", partitioning=""))
    op.execute("ALTER SEQUENCE audit_events_id_seq OWNED BY audit_events.id")
    op.execute(_COPY.format(source="audit_events_partitioned"))
    op.execute("DROP TABLE audit_events_partitioned")
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])
    op.create_index(
        "ix_audit_events_session_uuid_occurred_at", "audit_events", ["session_uuid", "occurred_at"]
    )
