"""Admin notification deduplication across workers and hosts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "admin_notices",
        sa.Column("signature_hash", sa.String(length=64), nullable=False),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("signature_hash", name=op.f("pk_admin_notices")),
    )


def downgrade():
    op.drop_table("admin_notices")
