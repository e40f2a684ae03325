"""Verification sends record whether the mail server accepted the message.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    # Every send recorded before this revision was recorded after the server accepted it.
    op.add_column(
        "email_sends",
        sa.Column("delivered", sa.Boolean(), server_default=sa.true(), nullable=False),
    )


def downgrade():
    with op.batch_alter_table("email_sends") as batch:
        batch.drop_column("delivered")
