"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from app.routes import ApiBlueprint
from app.schemas import HealthSchema, ReadinessSchema
from app.services import health

health_bp = ApiBlueprint(
    "health", __name__, description="Probes for load balancers and orchestrators."
)


@health_bp.route("/health", methods=["GET"])
@health_bp.response(200, HealthSchema)
def liveness() -> dict[str, Any]:
    """The process is up and serving requests."""
    return {"status": "success", "message": "ok"}


@health_bp.route("/ready", methods=["GET"])
@health_bp.response(200, ReadinessSchema)
@health_bp.alt_response(503, schema=ReadinessSchema, description="A dependency is unavailable")
def readiness() -> tuple[dict[str, Any], int]:
    """Whether every dependency answers; 503 names the ones that do not, and why."""
    result = health.readiness()
    body = {
        "status": "success" if result.ready else "error",
        "message": "ready" if result.ready else "not ready",
        "checks": result.checks,
        "reasons": result.reasons,
        "last_orphan_sweep_at": result.last_orphan_sweep_at,
    }
    return body, 200 if result.ready else 503
