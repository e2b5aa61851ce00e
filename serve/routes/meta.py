"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

from serve.routes.deps import Svc
from serve.routes.schemas import Health

router = APIRouter(tags=["meta"])


@router.get("/healthz")
def healthz(svc: Svc) -> Health:
    """Liveness, and the answer backend's kind (no model path or endpoint URL)."""
    return Health(status="ok", llm=svc.llm_kind)
