"""`kb worker`: takes ingest jobs from the shared store's queue (serve/jobs.py) and runs them.

Any number of workers, on any hosts, share the queue; each job runs as an upload through the
API does on one host (`Service.upload`: the KB's write lock, content-addressed documents, the
index sync, `replace`). A killed worker's job is taken again once its lease has run out; the
ingest is idempotent (an identical file is skipped, each document is written in one transaction).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kb.errors import KBError
from kb.settings import Settings
from kb.writelock import WriteLockTimeout
from serve import jobs
from serve.service import Service
from serve.uploads import NoSuchDocument, upload_doc_id

log = logging.getLogger(__name__)


def worker_id() -> str:
    """This worker's name in the queue: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@contextmanager
def heartbeat(settings: Settings, job_id: str, worker: str) -> Iterator[None]:
    """Renew the job's lease every third of `serve.job_lease_s` while the block runs."""
    stop = threading.Event()
    lease = settings.serve.job_lease_s

    def beat() -> None:
        while not stop.wait(lease / 3):
            try:
                if not jobs.renew(settings.store, job_id, worker, lease):
                    log.warning("job %s: the lease was lost (another worker may take it again)", job_id)
            except Exception as e:  # noqa: BLE001 (PostgreSQL briefly away: the next beat tries again)
                log.warning("job %s: renewing the lease failed: %s", job_id, e)

    thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_job(svc: Service, job: jobs.Job, worker: str) -> dict:
    """Ingest one job's files and record the outcome in the queue: done; failed for the caller's
    or the files' own errors (the message is the caller's to read); for a passing one (the store,
    the index or the write lock unavailable, or anything unexpected) queued again after a pause."""
    settings = svc.settings
    result, error, passing = None, None, None
    with heartbeat(settings, job.job_id, worker):
        try:
            result = upload(svc, job)
        except WriteLockTimeout:
            passing = "the knowledge base was being written by another process for too long"
        except KBError as e:
            if e.status >= 500:  # StoreUnavailable, MilvusUnavailable
                log.warning("job %s: %s", job.job_id, e)
                passing = e.public_message
            else:
                error = e.public_message
        except Exception:  # noqa: BLE001 (one bad job never stops the worker)
            log.exception("job %s failed", job.job_id)
            passing = "the ingest failed on the worker (its log has the details)"
    if passing is not None:
        state = jobs.release(settings.store, job.job_id, worker, passing, settings.serve.job_retry_s)
        return {"job_id": job.job_id, "kb": job.kb, "state": state, "error": passing}
    jobs.finish(settings.store, job.job_id, worker, result, error)
    return {"job_id": job.job_id, "kb": job.kb, "state": "failed" if error else "done", "error": error}


def upload(svc: Service, job: jobs.Job) -> dict:
    """The job's upload. Taken again after a run that replaced its document but could not record
    that (PostgreSQL away at the end), the replaced document is gone: the upload is then done as
    it stands, with `replaced` as the first run left it."""
    files = [(name, io.BytesIO(data)) for name, data in job.files]
    try:
        return svc.upload(job.kb, files, replace=job.replace)
    except NoSuchDocument:
        new = [upload_doc_id(hashlib.sha256(data).hexdigest()) for _, data in job.files]
        if job.replace is None or not all(svc.kb(job.kb).document(d) is not None for d in new):
            raise  # not a retake of a run that replaced the document: the caller's error
    out = svc.upload(job.kb, [(name, io.BytesIO(data)) for name, data in job.files])
    return {**out, "replaced": job.replace}


def run_worker(settings: Settings, once: bool = False, stop: threading.Event | None = None) -> int:
    """Take and run jobs until `stop` is set (or, `once`, until the queue is empty); jobs run."""
    if not settings.store.shared:
        raise KBError("kb worker takes jobs from a shared store: set store.url to postgresql://… (and "
                      "retrieval.backend: milvus); with the embedded store, uploads are ingested by the API itself")
    from ingest.pgstore import pool_for

    pool_for(settings.store)  # fail at the start when PostgreSQL cannot be reached at all
    stop = stop or threading.Event()
    svc = Service(settings, llm=None)
    me, done, pruned_at = worker_id(), 0, float("-inf")
    log.info("worker %s: waiting for jobs", me)
    while not stop.is_set():
        try:
            if time.monotonic() - pruned_at > 3600:  # old job records, once an hour
                jobs.prune(settings.store)
                pruned_at = time.monotonic()
            job = jobs.claim(settings.store, me, settings.serve.job_lease_s, settings.serve.job_attempts)
            if job is None:
                if once:
                    break
                stop.wait(settings.serve.worker_poll_s)
                continue
            out = run_job(svc, job, me)
        except Exception as e:  # noqa: BLE001 (PostgreSQL away: wait, then try again)
            log.warning("worker %s: the queue is unavailable (%s); trying again", me, e)
            if once:
                raise
            stop.wait(settings.serve.worker_poll_s)
            continue
        done += 1
        log.info("job %s (%s, %d files): %s%s", job.job_id, job.kb, len(job.files), out["state"],
                 f": {out['error']}" if out["error"] else "")
    return done
