"""A key-value store over HTTP with its data in SQLite (standard library only).

GET /health, GET /kv (all keys), GET /kv/<key>, PUT /kv/<key> (body = value).
Port from $PORT; data in $CORRAL_VOLUME (or ./data).
"""

import json
import os
import signal
import sqlite3
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATA = Path(os.environ.get("CORRAL_VOLUME", "data"))
DATA.mkdir(parents=True, exist_ok=True)
db = sqlite3.connect(DATA / "kv.db", check_same_thread=False, isolation_level=None)
db.execute("PRAGMA journal_mode = WAL")
db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def reply(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            with lock:
                db.execute("SELECT 1").fetchone()
            return self.reply(200, {"ok": True})
        if self.path == "/kv":
            with lock:
                keys = [r[0] for r in db.execute("SELECT key FROM kv ORDER BY key")]
            return self.reply(200, keys)
        if self.path.startswith("/kv/"):
            with lock:
                row = db.execute("SELECT value FROM kv WHERE key = ?", (self.path[4:],)).fetchone()
            return self.reply(200, {"value": row[0]}) if row else self.reply(404, {"error": "not found"})
        self.reply(404, {"error": "no such path"})

    def do_PUT(self) -> None:
        if not self.path.startswith("/kv/"):
            return self.reply(404, {"error": "no such path"})
        value = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        with lock:
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (self.path[4:], value))
        self.reply(200, {"ok": True})

    def log_message(self, fmt: str, *args: object) -> None:
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
print(f"kv listening on 127.0.0.1:{server.server_port}, data in {DATA / 'kv.db'}", flush=True)
server.serve_forever()
db.close()
print("kv stopped", flush=True)
sys.exit(0)
