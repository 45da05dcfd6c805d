"""Errors the backend answers with.

Every failure an annotator can cause or fix (a bad request, an unreachable image, a label that
matches nothing) is a ``BackendError``: the app renders it as a JSON body with a readable message
and the right HTTP status, and logs one line. Label Studio shows the message in its UI, so messages
say what to fix, not where the code failed.
"""

from __future__ import annotations


class BackendError(Exception):
    """A failure with an HTTP status and a message meant for the annotator."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # For the log line only, never the answer: what the caller must not learn (which ports are open).
        self.detail = detail
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, object]:
        return {"error": type(self).__name__, "message": self.message, "status": self.status}


class BadRequest(BackendError):
    """The request body is malformed or asks for something impossible (400)."""

    status = 400


class LimitExceeded(BackendError):
    """The request asks for more work than a limit of ``backend.request_limits`` allows (413); the message names
    the setting that raises it."""

    status = 413


class Unauthorized(BackendError):
    """Basic auth is configured and the request did not pass it (401)."""

    status = 401


class LabelConfigError(BackendError):
    """The project's label config lacks what the backend needs (422)."""

    status = 422


class ImageError(BackendError):
    """The task image could not be fetched or decoded (422: the task, not the server, must change)."""

    status = 422


class ImageAccessError(ImageError):
    """The image source refused or could not be reached (502: an upstream failed).

    ``upstream_status`` is the HTTP status the requested URL answered, when it answered at all (not
    set for failures on the way, such as refreshing an access token): callers that page through Label
    Studio's API tell "past the last page" (404) from a failure by it, not by the wording of the message.
    """

    status = 502

    def __init__(self, message: str, status: int | None = None, upstream_status: int | None = None) -> None:
        super().__init__(message, status)
        self.upstream_status = upstream_status


class ModelError(BackendError):
    """The model could not be loaded or run (503)."""

    status = 503
