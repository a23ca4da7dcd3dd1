"""TEST FIXTURE: a tiny OpenAI-compatible chat-completions server with canned judge answers.

It serves ``POST /v1/chat/completions`` on 127.0.0.1 at a free port, in a background thread, and
answers each request with ``answer(request_json)`` (after ``delay`` seconds), so the SysBench judge
client is tested over real HTTP. It stands in for ``agd serve`` until that exists: the client only
needs a base URL, so the tests can switch to it by changing the URL.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def n_criteria(request: dict) -> int:
    """How many criteria the judge prompt lists (the shipped template says "[Checklist: N criteria]")."""
    return int(re.search(r"Checklist: (\d+) criteria", request["messages"][-1]["content"]).group(1))


def all_yes(request: dict) -> str:
    return json.dumps({str(i): {"reason": "ok", "verdict": "yes"} for i in range(1, n_criteria(request) + 1)})


class JudgeServer:
    """Canned OpenAI-compatible judge. ``requests`` holds every request body received.

    Example:
        >>> with JudgeServer(all_yes) as server:
        ...     judge = Judge(JudgeConfig(url=server.url, model="canned"))
    """

    def __init__(self, answer: Callable[[dict], str] = all_yes, delay: float = 0.0, models: tuple = ("canned",),
                 list_models: bool = True, fail_after: int | None = None):
        # delay: seconds before each chat answer; list_models: answer GET /v1/models;
        # fail_after: after that many chat answers, drop every connection unanswered (a judge that went down).
        self.answer, self.delay, self.models = answer, delay, models
        self.list_models, self.fail_after = list_models, fail_after
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_GET(self):
                if owner.list_models and self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in owner.models]})
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if owner.fail_after is not None and len(owner.requests) >= owner.fail_after:
                    self.close_connection = True  # no answer at all
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                owner.requests.append(body)
                if body.get("model") not in owner.models:
                    return self._send(404, {"error": {"message": f"model {body.get('model')!r} not found",
                                                      "type": "not_found_error"}})
                time.sleep(owner.delay)
                content = owner.answer(body)
                self._send(200, {"id": f"chatcmpl-{len(owner.requests)}", "object": "chat.completion",
                                 "created": int(time.time()), "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    """The URL of a free local port with nothing listening (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
