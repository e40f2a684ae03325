"""``flask`` commands: run a background job now and print its summary."""

from __future__ import annotations

import json

import click
from flask import Flask
from flask.cli import AppGroup

from app import jobs

cleanup = AppGroup("cleanup", help="Run a clean-up job now and print its summary.")


@cleanup.command("orphans")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
def orphans(dry_run: bool) -> None:
    """Delete upload folders whose session no longer exists."""
    report = jobs.run_orphan_sweep(dry_run=dry_run)
    if report is None:
        raise click.ClickException("another orphan sweep is running; nothing done")
    click.echo(json.dumps(report.as_dict(), indent=2))


def init_app(app: Flask) -> None:
    app.cli.add_command(cleanup)
