"""The HTTP listener for the OpenAI Images API, on the gRPC server's event loop.

``HttpServer.start`` binds (port 0 picks a free one) and serves at once; requests that arrive before
warm-up ends get 503 from the shared serving gate, as gRPC calls get UNAVAILABLE. TLS, when configured,
uses the gRPC door's certificate and key. ``stop`` closes the listener and gives requests still running
``grace_seconds`` to send their response (the drain has already waited for the accepted work).
"""

from __future__ import annotations

import ssl

from aiohttp import web

from sdxl_server.service.grpc_server import BindError
from sdxl_server.service.http.images_api import ImagesApi


class HttpServer:
    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    @classmethod
    async def start(
        cls,
        api: ImagesApi,
        host: str,
        port: int,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        grace_seconds: float = 2.0,
    ) -> HttpServer:
        # handler_cancellation: a caller that disconnects cancels its handler, hence its engine request.
        runner = web.AppRunner(
            api.application(), handler_cancellation=True, access_log=None, shutdown_timeout=grace_seconds
        )
        await runner.setup()
        context = _tls_context(tls_cert_file, tls_key_file)
        # reuse_port off: a second server must not silently share a fixed port with a running one.
        site = web.TCPSite(runner, host, port, ssl_context=context, reuse_port=False)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise BindError(f"cannot listen on {host}:{port} for HTTP ({e.strerror or e})") from None
        return cls(runner, int(runner.addresses[0][1]))

    async def stop(self) -> None:
        await self._runner.cleanup()


def _tls_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    if not (cert_file and key_file):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
