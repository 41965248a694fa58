"""The error family. Errors travel as data (``{"code", "message"}``), never as pickled exceptions.

Each class has a stable ``code`` (what clients match on) and the HTTP ``status`` the API answers with.
"""

from __future__ import annotations

from typing import ClassVar


class RedbatchError(Exception):
    """Base of every error the service reports to a client."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        """The ``{"code", "message"}`` form used in reply frames and HTTP bodies."""
        return {"code": self.code, "message": self.message}


class BadRequest(RedbatchError):
    code = "bad_request"
    status = 400


class InvalidImage(RedbatchError):
    code = "invalid_image"
    status = 400


class Unauthorized(RedbatchError):
    code = "unauthorized"
    status = 401


class ModelNotFound(RedbatchError):
    code = "model_not_found"
    status = 404


class PayloadTooLarge(RedbatchError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(RedbatchError):
    code = "unsupported_media_type"
    status = 415


class InferenceFailed(RedbatchError):
    code = "inference_failed"
    status = 500


class QueueFull(RedbatchError):
    code = "queue_full"
    status = 503


class Unavailable(RedbatchError):
    code = "unavailable"
    status = 503


class DeadlineExceeded(RedbatchError):
    code = "deadline_exceeded"
    status = 504


class FrameError(RedbatchError):
    """A frame that cannot be decoded. ``request_id`` is set when the frame still names a reply address."""

    code = "bad_frame"
    status = 400

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


_BY_CODE: dict[str, type[RedbatchError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        InvalidImage,
        Unauthorized,
        ModelNotFound,
        PayloadTooLarge,
        UnsupportedMediaType,
        InferenceFailed,
        QueueFull,
        Unavailable,
        DeadlineExceeded,
        FrameError,
    )
}


def error_from_wire(code: str, message: str) -> RedbatchError:
    """Rebuild the exception a worker reported; an unknown code becomes a generic 500."""
    cls = _BY_CODE.get(code, RedbatchError)
    return cls(message)
