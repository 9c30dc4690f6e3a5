"""Optional bearer-token authentication for the compute endpoints (``GMS_API_TOKENS``).

Tokens are compared in constant time against every configured token, so neither a token's
content nor which token matched shows in the timing. Tokens are ``SecretStr``: they never
appear in logs or reprs.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from gpu_matrix_service.errors import Unauthorized
from gpu_matrix_service.routes.state import settings_of

bearer = HTTPBearer(
    auto_error=False,
    description="A token from GMS_API_TOKENS, when the service sets any.",
)


def token_accepted(presented: str, tokens: list[SecretStr]) -> bool:
    """Whether ``presented`` equals one of ``tokens``, compared in constant time."""
    # Digests first: compare_digest's time still depends on the lengths, a digest's does not.
    given = hashlib.sha256(presented.encode()).digest()
    matches = [
        hmac.compare_digest(given, hashlib.sha256(token.get_secret_value().encode()).digest())
        for token in tokens
    ]  # all of them, without stopping at the first match
    return any(matches)


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Let the request through when no tokens are configured or it carries a valid one."""
    tokens = settings_of(request).api_tokens
    if not tokens:
        return
    if credentials is None:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if not token_accepted(credentials.credentials, tokens):
        raise Unauthorized("invalid bearer token", invalid=True)
