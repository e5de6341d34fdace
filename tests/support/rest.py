"""A small REST client for tests that remembers every body it received, so a
test can search all of them for leaked secrets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import requests

RECEIVED_BODIES: list[bytes] = []


@dataclass
class Rest:
    base_url: str
    token: str | None = None
    api_key: str | None = None
    email: str = ""
    session: requests.Session = field(default_factory=requests.Session)

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.api_key:
            headers["X-API-KEY"] = self.api_key
        return headers

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        response = self.session.request(
            method, self.base_url + path, headers=headers, timeout=30, **kwargs
        )
        RECEIVED_BODIES.append(response.content)
        return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def login(self, email: str, password: str) -> Rest:
        response = self.post("/v1/auth/login", json={"email": email, "password": password})
        assert response.status_code == 200, response.text
        return Rest(self.base_url, token=response.json()["accessToken"])


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"
