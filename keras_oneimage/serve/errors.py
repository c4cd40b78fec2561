"""The error every serving front end (REST, gRPC) turns into its own status: :class:`RequestError`."""
from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the message goes into ``{"error": ...}``.

    The gRPC front end maps the same status to a gRPC code (:data:`GRPC_CODES`), so that both protocols refuse a
    request for the same reason in the same words.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


#: HTTP status → name of the ``grpc.StatusCode`` TF Serving answers for the same failure.
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
}
