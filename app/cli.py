"""``flask`` commands: run a background job now and print its summary."""

from __future__ import annotations

import json
import logging
import uuid

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from app import jobs
from app.errors import InvalidRequest, StorageUnavailableError
from app.schemas import DataRequestExportSchema, SessionSummarySchema
from app.services import admin_alerts, audit, data_requests
from app.services.audit import AuditContext
from app.storage import StorageUnavailable, current_storage

log = logging.getLogger(__name__)

cleanup = AppGroup("cleanup", help="Run a clean-up job now and print its summary.")
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Report what would be deleted; delete nothing."
)


def _print(report: jobs.Report | None, job: str) -> None:
    if report is None:
        raise click.ClickException(f"another {job} is running; nothing done")
    click.echo(json.dumps(report.as_dict(), indent=2))


@cleanup.command("orphans")
@dry_run_option
def orphans(dry_run: bool) -> None:
    """Delete upload folders whose session no longer exists."""
    _print(jobs.run_orphan_sweep(dry_run=dry_run), "orphan sweep")


@cleanup.command("abandoned")
@dry_run_option
def abandoned(dry_run: bool) -> None:
    """Purge pending sessions idle longer than ABANDONED_SESSION_MINUTES."""
    _print(jobs.run_abandoned_purge(dry_run=dry_run), "abandoned-session purge")


@cleanup.command("retention")
@dry_run_option
def retention(dry_run: bool) -> None:
    """Erase verified sessions and audit rows older than their retention."""
    _print(jobs.run_retention(dry_run=dry_run), "retention run")


audit_group = AppGroup("audit", help="Read the audit trail.")


@audit_group.command("show")
@click.argument("session_uuid", type=click.UUID)
def show(session_uuid: uuid.UUID) -> None:
    """Print a session's audit trail, oldest first, one event per line."""
    events = audit.trail(session_uuid)
    if not events:
        raise click.ClickException(f"no audit events for {session_uuid}")
    for event in events:
        click.echo(
            f"{event.occurred_at.isoformat()}  {event.event_type:<28} "
            f"ip={event.client_ip or '-'}  correlation={event.correlation_id or '-'}  "
            f"{json.dumps(event.details, sort_keys=True)}"
        )


storage_group = AppGroup("storage", help="Prepare the file storage.")


@storage_group.command("create")
def create_storage() -> None:
    """Create the S3 bucket (or the local directory) unless it exists."""
    try:
        created = current_storage().create()
    except StorageUnavailable as exc:
        raise click.ClickException(f"storage not ready ({exc.reason}): {exc}") from None
    click.echo("created" if created else "already exists")


@click.command("notify-admin")
@click.argument("subject")
@click.option("--signature", help="Deduplication key; defaults to the subject.")
def notify_admin(subject: str, signature: str | None) -> None:
    """Mail the admin (deduplicated like every notification); gunicorn's hooks use this."""
    delivery = admin_alerts.notify(subject, signature=signature or subject, facts={"What": subject})
    if delivery is None:
        return
    # Claiming the notification takes a database statement, sending it the mail deadline.
    config = current_app.config
    wait = (
        config["DATABASE_CONNECT_TIMEOUT_SECONDS"]
        + config["DATABASE_STATEMENT_TIMEOUT_MS"] / 1000
        + config["SMTP_TIMEOUT_SECONDS"]
    )
    try:
        delivery.result(timeout=wait)
    except TimeoutError:
        # Logged, not printed: gunicorn runs this command, and its output is JSON lines.
        log.error("admin notification not confirmed within %g s", wait)
        raise SystemExit(1) from None


gdpr = AppGroup("gdpr", help="Data requests received by letter or phone, by address.")
# Operator actions are audited as such: no client address, and this mark for a correlation id.
OPERATOR = AuditContext(client_ip=None, correlation_id="operator-cli")


def _address(email: str) -> str:
    """The typed address, checked and normalised like a request's; a usage error if not one."""
    try:
        return data_requests.operator_address(email)
    except InvalidRequest as exc:
        problems = "; ".join(str(problem) for problem in (exc.details or {}).get("email", []))
        raise click.BadParameter(problems or "not an e-mail address", param_hint="EMAIL") from None


@gdpr.command("find")
@click.argument("email")
def gdpr_find(email: str) -> None:
    """List the sessions tied to an address (no UUIDs), as JSON."""
    found = data_requests.find(_address(email), OPERATOR)
    click.echo(json.dumps(SessionSummarySchema(many=True).dump(found), indent=2))


@gdpr.command("export")
@click.argument("email")
def gdpr_export(email: str) -> None:
    """Print everything held under an address as JSON, as GET /data-requests/export would."""
    address = _address(email)
    # The files' download links are built for the address the person will use them at.
    with current_app.test_request_context(base_url=current_app.config["PUBLIC_BASE_URL"]):
        body = data_requests.export_document(address, OPERATOR, by="operator")
    click.echo(json.dumps(DataRequestExportSchema().dump(body), indent=2))


@gdpr.command("erase")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Erase without asking.")
def gdpr_erase(email: str, yes: bool) -> None:
    """Erase every session tied to an address, as DELETE /data-requests/sessions would."""
    address = _address(email)
    if not yes:
        click.confirm(f"Erase every session tied to {address}?", abort=True)
    try:
        erased = data_requests.erase_all(address, OPERATOR, by="operator")
    except StorageUnavailableError:
        raise click.ClickException(
            "storage did not answer: some sessions are not erased yet; run this again"
        ) from None
    click.echo(json.dumps({"erased": len(erased)}))


def init_app(app: Flask) -> None:
    app.cli.add_command(cleanup)
    app.cli.add_command(audit_group)
    app.cli.add_command(storage_group)
    app.cli.add_command(notify_admin)
    app.cli.add_command(gdpr)
