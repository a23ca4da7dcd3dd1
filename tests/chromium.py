"""Headless Chromium driven over the DevTools protocol on a pipe, with the standard library only.

``--remote-debugging-pipe`` makes Chromium read commands from fd 3 and write replies to fd 4, each
message a JSON object ended by a NUL byte; that avoids a WebSocket client (and any extra package).
The page's console errors, uncaught exceptions and every network request are recorded, so tests can
assert a report is clean and self-contained.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = ("headless Chromium is needed for the browser tests: run `./dev install` (it installs the "
                "Debian package `chromium` with apt-get) or `apt-get install chromium`, or set $CHROMIUM")

# Without network every background service (updates, sync, safe browsing) would wait on timeouts.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps",
         "--no-first-run", "--no-default-browser-check", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    """Path of the Chromium binary ($CHROMIUM, else chromium / chromium-browser on $PATH)."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page.

    Example:
        >>> with Chromium() as b:
        ...     b.open(Path("report.html").resolve().as_uri())
        ...     b.evaluate("document.title"), b.errors
    """

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        exe = find_chromium()
        if exe is None:
            raise BrowserError(INSTALL_HINT)
        self.timeout, self.width, self.height = timeout, width, height
        self.profile = tempfile.TemporaryDirectory(prefix="agd-chromium-")
        self.log = open(Path(self.profile.name) / "stderr.log", "wb")
        to_chrome_r, self._w = self._pipe_high()
        self._r, from_chrome_w = self._pipe_high()
        # fds 3 and 4 are fixed by the protocol; bash moves the pipe ends there (dash cannot name fds
        # above 9, and the pipes sit above 10 so the two redirections cannot clobber each other).
        cmd = ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', exe, *FLAGS,
               f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     pass_fds=(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._next_id, self.events = b"", 0, []
        self.session = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pipe_high() -> tuple[int, int]:
        r, w = os.pipe()
        hr, hw = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r, w))
        os.close(r)
        os.close(w)
        return hr, hw

    def _stderr_tail(self) -> str:
        self.log.flush()
        return (Path(self.profile.name) / "stderr.log").read_text(errors="replace")[-3000:]

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                why = "timed out" if left <= 0 else f"exited with {self.proc.returncode}"
                raise BrowserError(f"Chromium {why}; its stderr:\n{self._stderr_tail()}")
            if select.select([self._r], [], [], min(left, 1.0))[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed the pipe; its stderr:\n{self._stderr_tail()}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to ``self.events``."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e.get("method") == method:
                    return e
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (promises awaited); page exceptions raise."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression!r} raised: {res['exceptionDetails']}")
        return res["result"].get("value")

    @property
    def errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and failed loads seen since ``open``."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                             for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')}")
        return out

    @property
    def requests(self) -> list[str]:
        """URLs the page requested since ``open`` (the page itself included)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole page height by default)."""
        if full_page:
            h = self.send("Page.getLayoutMetrics")["cssContentSize"]["height"]
            self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": int(min(h, 8000)),
                                                             "deviceScaleFactor": 1, "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page})["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.session = None
                self.send("Browser.close")
        except BrowserError:
            pass
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for fd in (self._r, self._w):
                os.close(fd)
            self.log.close()
            self.profile.cleanup()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
