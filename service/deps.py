"""Dependencies of the routes: the service state on ``app.state``, readiness, API keys.

Routes declare what they need with the ``Annotated`` aliases at the bottom
(``State``, ``ReadyState``) and guard themselves with ``ReadAccess`` /
``WriteAccess``; nothing in a route reaches into ``request.app`` directly.

Every dependency is ``async def``: they never block, and FastAPI runs a plain ``def``
dependency on its thread pool, a thread hop (two per search) that costs more than the check.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.state import ServiceState


def _state(request: Request) -> ServiceState:
    return request.app.state.xmodal  # type: ignore[no-any-return]


async def get_state(request: Request) -> ServiceState:
    """The service state (present from start-up, maybe not ready yet)."""
    return _state(request)


async def get_ready_state(request: Request) -> ServiceState:
    """The service state, or 503 while the model and index are still loading."""
    state = _state(request)
    if not state.ready:
        # the cause (maybe a file path) is in the log, never in the answer
        detail = "not ready: start-up failed" if state.error else "not ready: still loading"
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": "5"}
        )
    return state


def _presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _matches(key: str, keys: list[str]) -> bool:
    # compare against every key so timing does not reveal which prefix matched
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _check_key(
    state: ServiceState, authorization: str | None, x_api_key: str | None, write: bool
) -> None:
    auth = state.settings.auth
    if not auth.read_keys and not auth.write_keys:
        return  # no keys configured: the API is open
    allowed = auth.write_keys if write else auth.read_keys + auth.write_keys
    if not write and not auth.read_keys:
        return  # only write keys configured: reading stays open
    key = _presented_key(authorization, x_api_key)
    if key is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key (Authorization: Bearer <key> or X-API-Key)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches(key, allowed):
        if write and _matches(key, auth.read_keys):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this API key may not write")
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


# Declared as security schemes, so the OpenAPI lists them and /docs can send a key.
_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")


def _bearer(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return f"Bearer {credentials.credentials}" if credentials is not None else None


async def require_read(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    x_api_key: Annotated[str | None, Security(_API_KEY)] = None,
) -> None:
    """A read or write key, when read keys are configured."""
    _check_key(_state(request), _bearer(bearer), x_api_key, write=False)


async def require_write(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    x_api_key: Annotated[str | None, Security(_API_KEY)] = None,
) -> None:
    """A write key, when any keys are configured."""
    _check_key(_state(request), _bearer(bearer), x_api_key, write=True)


async def require_metrics(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
    x_api_key: Annotated[str | None, Security(_API_KEY)] = None,
) -> None:
    """With ``auth.protect_metrics``: any configured key (read or write) may scrape."""
    state = _state(request)
    auth = state.settings.auth
    if auth.protect_metrics and (auth.read_keys or auth.write_keys):
        key = _presented_key(_bearer(bearer), x_api_key)
        if key is None or not _matches(key, auth.read_keys + auth.write_keys):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "/metrics needs an API key (auth.protect_metrics)",
                headers={"WWW-Authenticate": "Bearer"},
            )


State = Annotated[ServiceState, Depends(get_state)]
ReadyState = Annotated[ServiceState, Depends(get_ready_state)]
ReadAccess = Depends(require_read)
WriteAccess = Depends(require_write)
MetricsAccess = Depends(require_metrics)
