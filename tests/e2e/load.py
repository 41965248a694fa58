"""A small closed-loop load for fault tests: each client thread sends its own image repeatedly and
records every outcome, so a test can account for every request it sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests


@dataclass
class Outcome:
    client: int
    status: int  # 0: no HTTP answer at all (connection error or client timeout)
    body: dict
    sent_s: float
    latency_s: float
    retry_after: str | None = None


@dataclass
class Load:
    url: str
    images: list[bytes]
    requests_per_client: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    client_timeout_s: float = 60.0
    headers: dict[str, str] = field(default_factory=dict)

    def _client(self, i: int) -> None:
        sent = 0
        with requests.Session() as s:
            while not self.stop.is_set() and (self.requests_per_client is None or sent < self.requests_per_client):
                t0 = time.monotonic()
                try:
                    resp = s.post(
                        self.url,
                        data=self.images[i],
                        headers={"Content-Type": "image/jpeg", **self.headers},
                        timeout=self.client_timeout_s,
                    )
                    status, body, ra = resp.status_code, resp.json(), resp.headers.get("Retry-After")
                except (requests.RequestException, ValueError) as exc:
                    status, body, ra = 0, {"exception": repr(exc)}, None
                self.outcomes.append(Outcome(i, status, body, t0, time.monotonic() - t0, ra))
                sent += 1
                if status in (0, 503):
                    time.sleep(0.05)  # what a polite client does on Retry-After; keeps the loop bounded

    def run_in_background(self) -> Callable[[], list[Outcome]]:
        """Start all clients; returns a function that waits for them and gives every outcome."""
        ex = ThreadPoolExecutor(len(self.images))
        futures = [ex.submit(self._client, i) for i in range(len(self.images))]

        def finish() -> list[Outcome]:
            for f in futures:
                f.result()
            ex.shutdown()
            return self.outcomes

        return finish
