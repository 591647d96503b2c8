"""Python client for the sdxl-serve gRPC image service.

Example::

    from sdxl_client import Client

    with Client("localhost:50051") as client:
        result = client.generate("a lighthouse at dusk", seed=7)
        result.images[0].save("lighthouse.png")

:class:`AsyncClient` has the same methods for asyncio. Every failure is an :class:`SdxlError` subclass
with ``.code`` and ``.retryable``. The package never imports JAX or the server.
"""

from sdxl_client._channel import DEFAULT_TARGET
from sdxl_client._errors import (
    Cancelled,
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidRequest,
    MessageTooLarge,
    Overloaded,
    PermissionDenied,
    SdxlError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from sdxl_client._retry import RetryBudget, RetryPolicy
from sdxl_client._types import (
    Done,
    GeneratedImage,
    GenerateResult,
    HealthStatus,
    ImageFormat,
    Progress,
    Queued,
    Resolution,
    ServerInfo,
    StreamEvent,
    Timings,
)
from sdxl_client.aio import AsyncClient
from sdxl_client.client import Client

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Done",
    "FieldViolation",
    "GenerateResult",
    "GeneratedImage",
    "HealthStatus",
    "ImageFormat",
    "Internal",
    "InvalidRequest",
    "MessageTooLarge",
    "Overloaded",
    "PermissionDenied",
    "Progress",
    "Queued",
    "Resolution",
    "RetryBudget",
    "RetryPolicy",
    "SdxlError",
    "ServerInfo",
    "StreamEvent",
    "Timings",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
