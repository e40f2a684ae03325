"""File deletions recorded as pending before storage is asked.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "pending_file_deletions",
        sa.Column("session_uuid", sa.Uuid(), nullable=False),
        sa.Column("file_ref", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_uuid", "file_ref", name="pk_pending_file_deletions"),
    )
    op.create_index(
        "ix_pending_file_deletions_requested_at", "pending_file_deletions", ["requested_at"]
    )


def downgrade():
    op.drop_index("ix_pending_file_deletions_requested_at", table_name="pending_file_deletions")
    op.drop_table("pending_file_deletions")
