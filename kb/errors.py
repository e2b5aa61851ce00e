"""The base class of errors whose message is fit for the caller as it is (bad input, a missing
thing): the CLI prints the message and exits 2, the HTTP API answers `status` with `code`.
Each subclass states its status once; nothing else maps them."""

from __future__ import annotations


class KBError(Exception):
    """An error the caller caused or can act on; `status` and `code` are the HTTP answer."""

    status: int = 400
    code: str = "bad_request"


class InvalidRequest(KBError):
    """Input that cannot be used as given (422 invalid_request)."""

    status, code = 422, "invalid_request"


class NotFound(KBError):
    """A knowledge base, document or chunk that does not exist (404 not_found)."""

    status, code = 404, "not_found"
