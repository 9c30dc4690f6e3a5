"""The short way to the operation endpoints: matched and answered ahead of FastAPI's router.

Between the app's middleware and a handler, Starlette and FastAPI put an exception
middleware, FastAPI's exit-stack middleware, the router and the route's request/response
wrapper: about 10 us of a 64x64 request's 150 in process on the 2-core CPU machine
(``docs/benchmarks.md``). ``POST /add`` and ``POST /v1/ops/{op}`` need none of it: their
handlers read the request themselves and have no dependencies. :class:`OperationLane` sits
innermost among the app's middleware (inside metrics and CORS), matches those requests with
their routes' own ``matches`` and turns their errors into answers with the app's own exception
handlers, looked up as Starlette looks them up, so every answer is the one the router would
give. Any other request, another method on those paths included, goes the usual way. The app
leaves the lane out when OpenTelemetry is on: FastAPI's router names each span's route.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

# What FastAPI keeps in app.exception_handlers: handler(request, exc) -> Response, maybe async.
ExceptionHandlers = Mapping[Any, Callable[[Request, Exception], Any]]


class OperationLane:
    """ASGI middleware answering requests that fully match one of ``routes`` (plain Starlette
    routes whose endpoints take a :class:`Request` and return a :class:`Response`)."""

    def __init__(
        self, app: ASGIApp, routes: Sequence[Route], exception_handlers: ExceptionHandlers
    ) -> None:
        self.app = app
        self.routes = list(routes)
        # The app's own dict: handlers registered after the middleware was added count too.
        self.exception_handlers = exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            for route in self.routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    await self._answer(route.endpoint, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(
        self, endpoint: Callable[[Request], Any], scope: Scope, receive: Receive, send: Send
    ) -> None:
        request = Request(scope, receive, send)
        try:
            response: Response = await endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # a bug: the server-error middleware logs it and answers 500
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:  # as Starlette runs a plain function: on a worker thread
                response = await run_in_threadpool(handler, request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[[Request, Exception], Any] | None:
        """The handler Starlette's exception middleware would pick: one for an HTTP error's
        status code, else the nearest class in the exception's MRO. Handlers for 500 and for
        ``Exception`` are the server-error middleware's, as Starlette assigns them."""
        handlers = self.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code != 500:
            handler = handlers.get(exc.status_code)
            if handler is not None:
                return handler
        for cls in type(exc).__mro__:
            handler = handlers.get(cls) if cls is not Exception else None
            if handler is not None:
                return handler
        return None
