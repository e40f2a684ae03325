"""E-mail verification: the code on the session, and the history of sends.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("chat_sessions") as batch:
        batch.add_column(sa.Column("verification_code_hash", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("verification_code_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("verification_attempts_left", sa.Integer(), nullable=True))

    op.create_table(
        "email_sends",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_uuid", sa.Uuid(), nullable=True),
        sa.Column("address_hash", sa.String(length=64), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_email_sends")),
    )
    op.create_index(op.f("ix_email_sends_sent_at"), "email_sends", ["sent_at"])
    op.create_index(
        "ix_email_sends_session_uuid_sent_at", "email_sends", ["session_uuid", "sent_at"]
    )
    op.create_index(
        "ix_email_sends_address_hash_sent_at", "email_sends", ["address_hash", "sent_at"]
    )


def downgrade():
    op.drop_table("email_sends")
    with op.batch_alter_table("chat_sessions") as batch:
        batch.drop_column("verification_attempts_left")
        batch.drop_column("verification_code_expires_at")
        batch.drop_column("verification_code_hash")
