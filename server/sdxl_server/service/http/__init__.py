"""The HTTP front door: the OpenAI Images API, served by the same process and path as gRPC.

``images_request`` (an OpenAI body -> GenerateRequest), ``images_api`` (the routes, auth and metrics),
``error_responses`` (gRPC status -> HTTP status and OpenAI's error JSON), ``server`` (the listener).
"""
