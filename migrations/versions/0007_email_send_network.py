"""Verification sends record the client network, and a failed send whose code stayed behind.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade():
    # Sends recorded before this revision have no network: they count towards the mailbox's
    # ceiling only, and are pruned within a day.
    op.add_column("email_sends", sa.Column("network_hash", sa.String(64), nullable=True))
    op.add_column(
        "email_sends",
        sa.Column("failed", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade():
    with op.batch_alter_table("email_sends") as batch:
        batch.drop_column("failed")
        batch.drop_column("network_hash")
