"""The routes' dependencies: each reads what it needs from `request.app.state` (set up by
`serve.api.create_app`), and the path parameters the routes share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import State

from kb.paths import KB_NAME_PATTERN, check_kb_name
from serve.auth import Grant
from serve.routes.common import ApiError
from serve.service import Service

bearer = HTTPBearer(auto_error=False, description="an API key from serve.api_keys / KB_API_KEYS")


async def service(request: Request) -> Service:
    """The app's service: open knowledge bases and their answer chains."""
    return request.app.state.service


def grant(request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Grant:
    """The rights of the request's API key; 401 without a valid one."""
    g = request.app.state.keys.grant(cred.credentials if cred else None)
    if g is None:
        raise ApiError(401, "unauthorized", "missing or invalid API key (send 'Authorization: Bearer KEY')")
    return g


@dataclass(frozen=True)
class Access:
    """The caller: its key and grant, and the request state where the KB it uses is noted (the
    exception handlers name that KB in a 404)."""

    key: str
    grant: Grant
    state: State

    def readable(self, kb: str) -> str:
        """`kb` if its name is valid (else BadKBName) and the key may read it (else 403)."""
        return self.permitted(kb, write=False)

    def writable(self, kb: str) -> str:
        """`kb` if its name is valid (else BadKBName) and the key may change it (else 403)."""
        return self.permitted(kb, write=True)

    def permitted(self, kb: str, write: bool) -> str:
        """`kb` if its name is valid and the key may read it (`write`: change it); notes it for the 404."""
        check_kb_name(kb)
        self.state.kb = kb
        if not (self.grant.can_write(kb) if write else self.grant.can_read(kb)):
            raise ApiError(403, "forbidden", f"this key may not {'change' if write else 'read'} knowledge base {kb!r}")
        return kb


async def access(request: Request, g: Annotated[Grant, Depends(grant)],
                 cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Access:
    """The caller, once its key is known to be valid."""
    return Access(cred.credentials if cred else "", g, request.state)


Auth = Annotated[Grant, Depends(grant)]
Caller = Annotated[Access, Depends(access)]
Svc = Annotated[Service, Depends(service)]
KBPath = Annotated[str, PathParam(min_length=1, max_length=64, pattern=KB_NAME_PATTERN, examples=["policies"],
                                  description="the knowledge base's name")]
DocPath = Annotated[str, PathParam(min_length=1, max_length=128, description="the document's id")]
OrdPath = Annotated[int, PathParam(ge=0, le=10**9, description="the chunk's ord, as GET .../chunks lists it")]
JobPath = Annotated[str, PathParam(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$",
                                   description="the ingest job's id, as an upload answered it")]
