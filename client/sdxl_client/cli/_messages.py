"""The one-line texts the `sdxl` command prints for a failed call and for a retry."""

from __future__ import annotations

from sdxl_client._errors import InvalidRequest, SdxlError, Unavailable


class UsageError(Exception):
    """A command line that cannot work (contradicting options); exit status 2."""


def unreachable(error: SdxlError) -> bool:
    """True when no server answered at all (as opposed to a server saying it is warming up or draining).

    A server's own UNAVAILABLE always carries a RetryInfo delay; gRPC's connection failures never do.
    """
    return isinstance(error, Unavailable) and error.retry_after is None


def describe(error: SdxlError, target: str) -> str:
    """``CODE: what went wrong``, naming each rejected field once, and the likely cause when unreachable."""
    if isinstance(error, InvalidRequest) and error.violations:
        return f"{error.code.name}: " + "; ".join(f"{v.field}: {v.description}" for v in error.violations)
    if unreachable(error):
        return (
            f"{error.code.name}: cannot reach {target}: is the server running at {target}? ({error.message})"
        )
    return str(error)


def retry_note(error: SdxlError, failed_attempt: int, max_attempts: int, delay: float, target: str) -> str:
    """``retrying in 1.3 s (attempt 2 of 5): RESOURCE_EXHAUSTED: the queue is full ...``."""
    reason = f"no server answers at {target}" if unreachable(error) else str(error)
    return f"retrying in {delay:.1f} s (attempt {failed_attempt + 1} of {max_attempts}): {reason}"
