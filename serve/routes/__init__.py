"""The HTTP API's routes, one `APIRouter` per area; `serve.api.create_app` includes them in this order.

Routes are plain functions: what they need (the service, the caller's key) comes through FastAPI
dependencies that read `request.app.state`; the errors they raise are turned into HTTP statuses
once, by the exception handlers in `serve.api`.
"""

from __future__ import annotations

from fastapi import APIRouter

from serve.routes.answers import router as answers
from serve.routes.kbs import router as kbs
from serve.routes.meta import router as meta
from serve.routes.openai import router as openai

ROUTERS: tuple[APIRouter, ...] = (meta, kbs, answers, openai)
"""Every router, in the order their routes are matched and listed in the OpenAPI schema."""
