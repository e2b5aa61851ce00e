"""Knowledge bases, their documents (upload, delete) and chunks (list, edit)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, BinaryIO

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from serve import jobs
from serve.routes.common import ApiError, errors, key_user
from serve.routes.deps import Auth, Caller, DocPath, JobPath, KBPath, OrdPath, Svc
from serve.routes.schemas import ChunkEditRequest
from serve.service import Service
from serve.uploads import NoSuchDocument

log = logging.getLogger(__name__)
router = APIRouter(tags=["knowledge bases"])

UPLOAD_FORM = {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 100},
    "replace": {"type": "string", "minLength": 1, "maxLength": 64,
                "description": "the doc_id of a document this (single) file replaces once it is ingested"}}}

UPLOAD_LINKS = {
    "ListDocuments": {"operationRef": "#/paths/~1v1~1kbs~1{kb}~1documents/get",
                      "parameters": {"kb": "$request.path.kb"}},
    "DeleteDocument": {"operationRef": "#/paths/~1v1~1kbs~1{kb}~1documents~1{doc_id}/delete",
                       "parameters": {"kb": "$request.path.kb", "doc_id": "$response.body#/doc_ids/0"}},
}
"""OpenAPI links from an upload to its KB's documents and to deleting what it added."""
JOB_BODY = {"type": "object", "required": ["job"], "properties": {"job": {
    "type": "object", "required": ["job_id", "kb", "state"],
    "properties": {"job_id": {"type": "string"}, "kb": {"type": "string"},
                   "state": {"enum": ["queued", "running", "done", "failed"]}, "attempts": {"type": "integer"},
                   "error": {"type": ["string", "null"]}, "result": {"type": ["object", "null"]},
                   "created_at": {"type": ["string", "null"]}, "started_at": {"type": ["string", "null"]},
                   "finished_at": {"type": ["string", "null"]}}}}}
"""The JSON of an upload's ingest job (202 from an upload, GET /v1/jobs/{job_id})."""
UPLOAD_RESPONSES = {200: {"description": "the `kb ingest` JSON", "links": UPLOAD_LINKS},
                    202: {"description": "with a shared store: the upload is queued and its ingest job (`job`) "
                                         "not finished within serve.upload_wait_s; poll GET /v1/jobs/{job_id}",
                          "content": {"application/json": {"schema": JOB_BODY}}},
                    **errors(400, 401, 403, 404, 413, 422)}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": UPLOAD_FORM}}}}


@router.get("/v1/kbs", responses=errors(401))
def kbs(g: Auth, svc: Svc) -> dict:
    """The knowledge bases the caller may read, with their document and chunk counts."""
    return {"kbs": [k for k in svc.kbs() if g.can_read(k["name"])]}


@router.get("/v1/kbs/{kb}/documents", responses=errors(401, 403, 404, 422))
def documents(kb: KBPath, caller: Caller, svc: Svc) -> dict:
    """A knowledge base's documents (without their server paths)."""
    docs = svc.kb(caller.readable(kb)).documents()
    return {"kb": kb, "documents": [{k: v for k, v in d.items() if k != "path"} for d in docs]}


@router.post("/v1/kbs/{kb}/documents", responses=UPLOAD_RESPONSES, openapi_extra=UPLOAD_BODY)
async def upload(kb: KBPath, request: Request, caller: Caller, svc: Svc) -> dict:
    """Upload one or more files (multipart field `files` or `file`); returns the `kb ingest` JSON.

    A document is identified by its content: an identical re-upload is skipped, two different
    files of the same name are two documents. With the form field `replace` (a doc_id) and one
    file, that document is removed once the new one was ingested (`replaced` in the result);
    a file that cannot be read leaves everything as it was.
    """
    caller.writable(kb)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(422, "invalid_request", "send the files as multipart/form-data (field 'files')")
    form = await request.form(max_files=100, max_fields=20)
    try:
        files, replace = upload_fields(form)
        if svc.settings.store.shared:  # queued for `kb worker`: no API replica parses documents
            job = await run_in_threadpool(svc.enqueue, kb, files, replace)
            out = await wait_for_job(svc, job, kb)
            if out["state"] == "failed":
                raise ApiError(422, "ingest_failed", out["error"] or "the ingest failed")
            if out["state"] != "done":  # still queued or running: the caller polls the job
                return JSONResponse({"job": job_json(out)}, status_code=202, headers={"Location": f"/v1/jobs/{job}"})
            out = {**out["result"], "job_id": job}
        else:
            out = await run_in_threadpool(svc.upload, kb, files, replace=replace)
    finally:
        await form.close()
    if out["failed"] and not out["ingested"] and not out["skipped"]:
        reasons = "; ".join(f"{f['path']}: {f['error']}" for f in out["failed"])
        raise ApiError(422, "unreadable_document", reasons)
    return out


async def wait_for_job(svc: Service, job_id: str, kb: str) -> dict:
    """The job's state once it is done or failed, or when `serve.upload_wait_s` has passed. The
    job is queued already: when its state cannot be read now, it is answered as queued (202), so
    that the caller polls it rather than uploading again."""
    deadline = time.monotonic() + svc.settings.serve.upload_wait_s
    delay = 0.05
    while True:
        try:
            out = await run_in_threadpool(jobs.status, svc.settings.store, job_id)
        except Exception as e:  # noqa: BLE001 (PostgreSQL away after the commit: the job stands)
            log.warning("upload job %s queued, its state unreadable: %s", job_id, e)
            return {"job_id": job_id, "kb": kb, "state": "queued", "attempts": 0, "error": None, "result": None,
                    "created_at": None, "started_at": None, "finished_at": None}
        if out["state"] in ("done", "failed") or time.monotonic() >= deadline:
            return out
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 1.0)


def job_json(out: dict) -> dict:
    """A job's public JSON: times as ISO 8601, the error as a message."""
    from retrieval.knowledge_base import iso_time

    return {**{k: out[k] for k in ("job_id", "kb", "state", "attempts", "error", "result")},
            **{k: None if out[k] is None else iso_time(out[k]) for k in ("created_at", "started_at", "finished_at")}}


@router.get("/v1/jobs/{job_id}", responses=errors(401, 403, 404, 422))
def job(job_id: JobPath, caller: Caller, svc: Svc) -> dict:
    """An upload's ingest job (a shared store queues uploads for `kb worker`): its state
    (queued, running, done, failed), and the `kb ingest` JSON once done."""
    if not svc.settings.store.shared:
        raise jobs.NoSuchJob("no ingest jobs: uploads are ingested at once with the embedded store")
    out = jobs.status(svc.settings.store, job_id)
    caller.readable(out["kb"])
    return {"job": job_json(out)}


def upload_fields(form: FormData) -> tuple[list[tuple[str | None, BinaryIO]], str | None]:
    """The uploaded files (fields `files` and `file`) and the `replace` doc_id of an upload form."""
    ups: list[Any] = [u for u in form.getlist("files") + form.getlist("file") if hasattr(u, "read")]
    if not ups:
        raise ApiError(422, "invalid_request", "no file in the multipart field 'files'")
    replace = form.get("replace")
    if replace is not None and (not isinstance(replace, str) or not 0 < len(replace) <= 64):
        raise ApiError(422, "invalid_request", "'replace' must be a document id (1-64 characters)")
    return [(u.filename, u.file) for u in ups], replace


@router.delete("/v1/kbs/{kb}/documents/{doc_id}", responses=errors(401, 403, 404, 422))
def delete_document(kb: KBPath, doc_id: str, caller: Caller, svc: Svc) -> dict:
    """Remove a document from a knowledge base; 404 when there is none of that id."""
    if not svc.remove_document(caller.writable(kb), doc_id):
        raise NoSuchDocument(f"no document {doc_id!r} in knowledge base {kb!r}")
    return {"removed": {"kb": kb, "doc_id": doc_id}}


@router.get("/v1/kbs/{kb}/documents/{doc_id}/chunks", responses=errors(401, 403, 404, 422))
def chunks(kb: KBPath, doc_id: DocPath, caller: Caller, svc: Svc) -> dict:
    """A document's chunks with their key information (the `kb chunks --json` document)."""
    return svc.kb(caller.readable(kb)).chunks(doc_id)


@router.put("/v1/kbs/{kb}/documents/{doc_id}/chunks/{ord}", responses=errors(400, 401, 403, 404, 413, 422))
def edit_chunk(kb: KBPath, doc_id: DocPath, ord: OrdPath, body: ChunkEditRequest, caller: Caller, svc: Svc) -> dict:
    """Replace a chunk's text: its key information and index entries are rebuilt, the edit is
    audited (the user is the API key's fingerprint, with `user` when given) and survives
    re-ingesting the document (the `kb chunks edit --json` document)."""
    caller.writable(kb)
    return svc.kb(kb).edit_chunk(doc_id, ord, body.text, key_user(caller.key, body.user))
