"""Errors of the serving stage: the repository writer, the local server and the client."""


class ServingError(Exception):
    """Base class of every serving error."""


class RepositoryError(ServingError):
    """A model repository is missing, incomplete or invalid."""


class ServerError(ServingError):
    """The local tritonserver could not start, or a model failed to load."""


class ClientError(ServingError):
    """Base class of errors raised by serving.client."""


class ServerUnavailableError(ClientError):
    """The server could not be reached, or it answered UNAVAILABLE after the retries."""


class InvalidInputError(ClientError):
    """The server rejected the request as invalid (HTTP 4xx / INVALID_ARGUMENT)."""


class RequestTimeoutError(ClientError):
    """The request did not complete within the client's timeout."""


class GatewayError(ServingError):
    """The gateway cannot start (bad option, repository, key) or a request to it fails.

    ``status`` is the HTTP status a client gets and ``kind`` what went wrong, one of ``validation``,
    ``too_large``, ``auth``, ``not_found``, ``overloaded``, ``timeout``, ``backend``, ``unhealthy``.
    """

    def __init__(self, message: str, status: int = 400, kind: str = "validation") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind
