"""The base class of errors whose message is fit for the caller as it is (bad input, a missing
thing): the CLI prints the message and exits 2, the HTTP API answers `status` with `code`.
Each subclass states its status once; nothing else maps them."""

from __future__ import annotations


class KBError(Exception):
    """An error the caller caused or can act on; `status` and `code` are the HTTP answer."""

    status: int = 400
    code: str = "bad_request"

    @property
    def public_message(self) -> str:
        """What an API caller is told: the message itself, unless the class says otherwise."""
        return str(self)


class Unavailable(KBError):
    """A backend the platform needs is down or did not answer (503: try again). Its message (for
    operators: the CLI and the logs) may name hosts and paths; API callers get `public_message`."""

    status, code = 503, "unavailable"
    public = "a backend service is unavailable; try again shortly"

    @property
    def public_message(self) -> str:
        return self.public


class InvalidRequest(KBError):
    """Input that cannot be used as given (422 invalid_request)."""

    status, code = 422, "invalid_request"


class NotFound(KBError):
    """A knowledge base, document or chunk that does not exist (404 not_found)."""

    status, code = 404, "not_found"
