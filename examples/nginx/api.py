"""One replica of the API nginx balances over (standard library only): GET / answers which
instance served it; GET /health answers 503 while the file named by $SICK_FILE exists."""

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        sick = os.environ.get("SICK_FILE", "").replace("{instance}", os.environ["CORRAL_INSTANCE"])
        if self.path == "/health" and sick and os.path.exists(sick):
            code, body = 503, b"sick\n"
        else:
            code, body = 200, os.environ["CORRAL_INSTANCE"].encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
