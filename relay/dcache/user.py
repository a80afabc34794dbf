"""``GET /api/v1/user``: who the caller is, as dCache's frontend answers it (its UserResource):
``AUTHENTICATED`` with the user name for valid credentials, ``ANONYMOUS`` without any; wrong
credentials are refused (401). dCache's clients ask it first (SURF's ``ada`` stops unless it is
``AUTHENTICATED``). There are no Unix ids here: ``uid`` and ``gids`` are left out, as dCache's
JSON leaves out every null field (clients read them with defaults: dcache-pyclient takes
``tuple(data.get("gids", []))``, which a null breaks)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from storage_events.relay.auth import Authenticator, AuthError, bearer

NOBODY = {"status": "ANONYMOUS"}


def user_endpoint(auth: Authenticator) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        cred = bearer(request.headers.get("authorization", ""), None)
        if cred is None or not auth.enabled:
            return JSONResponse(NOBODY)
        try:
            who = auth.identify(cred)
        except AuthError as e:
            return JSONResponse(
                {"errors": [{"message": str(e), "status": str(e.status)}]},
                status_code=e.status,
                headers={"WWW-Authenticate": auth.challenge},
            )
        assert who is not None
        prefixes = who.scope.prefixes
        return JSONResponse(
            {
                "status": "AUTHENTICATED",
                # Where it may read: the first of its path prefixes, else everything.
                "homeDirectory": prefixes[0] if prefixes else "/",
                "rootDirectory": "/",
                "username": who.name.removeprefix("user:"),
            }
        )

    return endpoint
