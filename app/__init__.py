"""The session service: an app factory that reads like a table of contents."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from flask import Flask

from app import cli, db_deadline, http_errors, jobs, metrics, middleware, rate_limits, scheduler
from app.extensions import api, cors, db, migrate
from app.logging_setup import configure_logging
from app.mail import transports
from app.routes.data_requests import data_requests_bp
from app.routes.docs import docs_blueprint
from app.routes.email_verification import email_verification_bp
from app.routes.files import files_bp
from app.routes.health import health_bp
from app.routes.metrics import metrics_bp
from app.routes.sessions import sessions_bp
from app.services import admin_alerts, chat_sessions, data_requests
from app.storage import backends
from config import Config

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "migrations")


def create_app(environ: Mapping[str, str] | None = None) -> Flask:
    """Build the app from ``environ`` (default: the process environment)."""
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    os.makedirs(app.instance_path, exist_ok=True)

    config = Config(os.environ if environ is None else environ, instance_path=app.instance_path)
    app.config.from_mapping(config.as_mapping())
    configure_logging(app.config["LOG_LEVEL"])
    for warning in config.warnings:
        logging.getLogger("config").warning(warning)

    _init_extensions(app)
    _register_blueprints(app)
    # After the routes: each of them starts with its series at zero.
    metrics.init_app(app, jobs=jobs.JOB_NAMES, count_sessions=chat_sessions.count_by_state)
    middleware.init_app(app)
    http_errors.register_error_handlers(app)
    cli.init_app(app)
    scheduler.init_app(app)
    return app


def _init_extensions(app: Flask) -> None:
    db.init_app(app)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        db_deadline.install(
            connect_timeout=app.config["DATABASE_CONNECT_TIMEOUT_SECONDS"],
            statement_timeout=app.config["DATABASE_STATEMENT_TIMEOUT_MS"] / 1000,
        )
    migrate.init_app(app, db, directory=MIGRATIONS_DIR, compare_type=True)
    rate_limits.init_app(app)
    cors.init_app(
        app,
        resources={r"/api/*": {"origins": app.config["CORS_ORIGINS"]}},
        allow_headers=["Content-Type", "X-Session-ID", "X-Correlation-ID", "Accept"],
        expose_headers=["X-Correlation-ID", "X-API-Version", "Retry-After"],
        methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        max_age=600,
    )
    api.init_app(app)
    # The data-request endpoints take a bearer token (docs/decisions.md).
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    backends.init_app(app)
    transports.init_app(app)
    admin_alerts.init_app(app)
    data_requests.init_app(app)


def _register_blueprints(app: Flask) -> None:
    api.register_blueprint(sessions_bp)
    api.register_blueprint(files_bp)
    api.register_blueprint(email_verification_bp)
    api.register_blueprint(data_requests_bp)
    api.register_blueprint(health_bp)
    if app.config["METRICS_ENABLED"]:
        app.register_blueprint(metrics_bp)
    if app.config["API_DOCS_ENABLED"]:
        app.register_blueprint(docs_blueprint(app.config["API_TITLE"]))
