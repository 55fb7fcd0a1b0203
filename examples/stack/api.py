"""The shop API: one of several replicas, each reading and writing through kv.

GET /health (ready when kv answers), GET /live, GET /stock/<sku>, POST /order/<sku>.
"""

import argparse
import json
import os
import signal
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()
KV = os.environ["CORRAL_KV_ADDR"]
ME = os.environ.get("CORRAL_INSTANCE", "api")


def kv(method: str, key: str, value: str | None = None) -> dict[str, object]:
    req = urllib.request.Request(f"http://{KV}/kv/{key}", data=value.encode() if value is not None else None,
                                 method=method)
    with urllib.request.urlopen(req, timeout=2) as r:
        return json.load(r)  # type: ignore[no-any-return]


class Handler(BaseHTTPRequestHandler):
    def reply(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps({**body, "served_by": ME}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/live":
            return self.reply(200, {"ok": True})
        try:
            if self.path == "/health":
                return self.reply(200, {"schema": kv("GET", "schema_version")["value"]})
            if self.path.startswith("/stock/"):
                return self.reply(200, {"stock": int(str(kv("GET", "stock:" + self.path[7:])["value"]))})
        except urllib.error.HTTPError as e:
            return self.reply(e.code, {"error": e.reason})
        except OSError as e:
            return self.reply(503, {"error": f"kv unavailable: {e}"})
        self.reply(404, {"error": "no such path"})

    def do_POST(self) -> None:
        if not self.path.startswith("/order/"):
            return self.reply(404, {"error": "no such path"})
        sku = self.path[7:]
        try:
            stock = int(str(kv("GET", "stock:" + sku)["value"]))
            if stock <= 0:
                return self.reply(409, {"error": f"{sku} sold out"})
            kv("PUT", "stock:" + sku, str(stock - 1))
        except urllib.error.HTTPError as e:
            return self.reply(e.code, {"error": e.reason})
        except OSError as e:
            return self.reply(503, {"error": f"kv unavailable: {e}"})
        self.reply(200, {"ordered": sku, "left": stock - 1})

    def log_message(self, fmt: str, *a: object) -> None:
        pass


server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
print(f"{ME} listening on 127.0.0.1:{args.port}, kv at {KV}", flush=True)
server.serve_forever()
print(f"{ME} stopped", flush=True)
