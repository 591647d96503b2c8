"""What Client and AsyncClient share: settings, the default deadline, retry hooks. No I/O here."""

from __future__ import annotations

from collections.abc import Callable

from sdxl_client._channel import DEFAULT_TARGET, ChannelSettings
from sdxl_client._errors import SdxlError
from sdxl_client._retry import ATTEMPT_METADATA_KEY, CallsInProgress, RetryPolicy, RetryState

RetryHook = Callable[[SdxlError, int, float], None]
"""Called before each retry with the error, the number of the attempt that failed, and the wait."""

DEFAULT_TIMEOUT_SECONDS = 300.0

_USE_DEFAULT: float = -1.0  # sentinel: "the client's default timeout" (None already means "no deadline")


class ClientBase:
    """Constructor and helpers shared by both clients."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        retry: RetryPolicy | None = None,
        keepalive_seconds: float = 300.0,
        load_balancing: str = "round_robin",
        on_retry: RetryHook | None = None,
    ) -> None:
        """Creates a client; the connection is made on the first call.

        Args:
            target: Server address: ``host:port``, ``dns:///host:port`` (balances over every address the
                name resolves to, e.g. a Kubernetes headless Service), or ``ipv4:h1:p1,h2:p2``.
            token: Bearer token for servers started with an auth token.
            tls: Connect with TLS.
            root_certificates: PEM root certificates to verify the server (TLS only); None for system roots.
            tls_server_name: Name to check the server certificate against when it differs from the target.
            timeout: Default overall deadline of a call in seconds, retries included; None for none.
            retry: Retry policy for UNAVAILABLE and RESOURCE_EXHAUSTED; ``RetryPolicy(max_attempts=1)``
                disables retries. Defaults to ``RetryPolicy()``, whose retry budget this client's calls
                share.
            keepalive_seconds: Interval of keepalive pings during calls (see ChannelSettings: a server
                must allow pings that often).
            load_balancing: ``round_robin`` (default) or ``pick_first``.
            on_retry: Optional hook called before every retry (for logging or counting).
        """
        self.settings = ChannelSettings(
            target=target,
            tls=tls,
            root_certificates=root_certificates,
            tls_server_name=tls_server_name,
            token=token,
            keepalive_seconds=keepalive_seconds,
            load_balancing=load_balancing,
        )
        self.default_timeout = timeout
        self.retry_policy = retry if retry is not None else RetryPolicy()
        self._metadata = self.settings.call_metadata()
        self._on_retry = on_retry
        self._calls = CallsInProgress()
        self._open()

    def _open(self) -> None:
        """Creates the channel and stubs (each client's own kind)."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target this client calls."""
        return self.settings.target

    @property
    def retries_refused_by_budget(self) -> int:
        """Overload answers not retried because the retry budget was spent (see ``RetryBudget``)."""
        return self._calls.refused

    def _retry_state(self, timeout: float | None) -> RetryState:
        return RetryState(
            self.retry_policy,
            self.default_timeout if timeout == _USE_DEFAULT else timeout,
            calls=self._calls,
        )

    def _attempt_metadata(self, state: RetryState) -> tuple[tuple[str, str], ...]:
        """The call's metadata with the number of the attempt being made (the server counts first
        attempts alone as arriving work)."""
        return (*self._metadata, (ATTEMPT_METADATA_KEY, str(state.attempts)))

    def _single_timeout(self, timeout: float | None) -> float | None:
        return self.default_timeout if timeout == _USE_DEFAULT else timeout

    def _retry_delay(self, state: RetryState, error: SdxlError) -> float | None:
        delay = state.delay_before_retry(error)
        if state.refused_by_budget:
            error.message += " (not retried: the client's retry budget for overload is spent)"
        if delay is not None and self._on_retry is not None:
            self._on_retry(error, state.attempts, delay)
        return delay

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.settings.target!r}, tls={self.settings.tls})"
