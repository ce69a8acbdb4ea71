"""The one outbound HTTP session for places where Relay holds a secret in a request it builds itself
(the webhooks: a Discord URL's token, a raw webhook's X-API-Key). It never follows a redirect: requests
would re-send the body and every custom header (X-API-Key included) to whatever host a 301/302/307/308
names, somewhere the user never pointed. A redirect comes back as the answer, and the caller gives up on
it with a line saying where to point the config instead.

Which hosts a webhook may name is the config's rule (relay_train/config/files.py: webhook_host_problem).
The Hub client is huggingface_hub's own (httpx): it must follow the Hub's redirects to its CDN for
downloads, and httpx drops the Authorization header whenever a redirect changes the host.
"""

from __future__ import annotations

import requests


class NoRedirectSession(requests.Session):
    """A requests.Session whose every request is sent with allow_redirects=False, whatever the caller asks."""

    def request(self, method, url, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - requests' own signature
        kwargs["allow_redirects"] = False
        return super().request(method, url, *args, **kwargs)

    def rebuild_auth(self, prepared_request, response) -> None:  # noqa: ANN001
        """Never reached (redirects are not followed); if it ever is, no credential crosses a host."""
        prepared_request.headers.pop("Authorization", None)
        prepared_request.headers.pop("X-API-Key", None)


def outbound_session(verify: bool = True) -> requests.Session:
    session = NoRedirectSession()
    session.verify = verify
    return session


def is_redirect(status: int | None) -> bool:
    return status is not None and 300 <= status < 400
