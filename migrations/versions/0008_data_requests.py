"""Data requests: codes mailed to a verified address, and the grants behind bearer tokens.

Sessions get an index of their verified addresses (in lower case), which a request looks up.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "data_requests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("address_hash", sa.String(64), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=True),
        sa.Column("code_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts_left", sa.Integer(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("grant_id", sa.String(32), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("erasing", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_data_requests"),
        sa.UniqueConstraint("grant_id", name="uq_data_requests_grant_id"),
    )
    op.create_index("ix_data_requests_address_hash", "data_requests", ["address_hash"])
    op.create_index("ix_data_requests_requested_at", "data_requests", ["requested_at"])
    verified = sa.text("email_verified")
    op.create_index(
        "ix_chat_sessions_verified_email",
        "chat_sessions",
        [sa.text("lower(email)")],
        postgresql_where=verified,
        sqlite_where=verified,
    )


def downgrade():
    op.drop_index("ix_chat_sessions_verified_email", table_name="chat_sessions")
    op.drop_index("ix_data_requests_requested_at", table_name="data_requests")
    op.drop_index("ix_data_requests_address_hash", table_name="data_requests")
    op.drop_table("data_requests")
