"""Run a server on a background thread of this process: for tests, benchmarks and notebooks.

    with BackgroundServer(create_app(model, tokenizer)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """uvicorn serving `app` on `host`:`port` (default: a free loopback port) in a daemon thread.

    `start()` returns once the server accepts connections; `stop()` shuts it down (the app's
    lifespan ends, so its engine stops).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, startup_timeout_s: float = 60.0):
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        config = uvicorn.Config(app, host=self.host, port=self.port, access_log=False, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="polymodal-serve-http", daemon=True)

    @property
    def url(self) -> str:
        """http://host:port"""
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Start serving; raise RuntimeError if the server is not up within the startup timeout."""
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Shut the server down and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
