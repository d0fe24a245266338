"""Errors shared by the layers; the API maps each to an HTTP status. No torch here."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_request"


class UnsupportedMedia(ServiceError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(ServiceError):
    status, code = 504, "timeout"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class RateLimited(Overloaded):
    code = "rate_limited"
