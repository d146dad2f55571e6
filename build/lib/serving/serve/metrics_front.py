"""The service's public Prometheus port. Ray exports metrics on loopback only (modeling.ray_auth
puts every Ray port there); this serves GET /metrics on the port the user opened by reading Ray's,
and answers nothing else."""
from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsFront:
    def __init__(self, host: str, port: int, upstream_port: int):
        upstream = f"http://127.0.0.1:{upstream_port}/metrics"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    with urllib.request.urlopen(upstream, timeout=30) as response:
                        body = response.read()
                except (urllib.error.URLError, OSError) as exc:
                    self.send_error(502, f"Ray's metrics agent did not answer: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not worth a log line each
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-front", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
