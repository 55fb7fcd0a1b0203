"""A one-shot migration: writes the schema version and seed data into kv, then exits 0."""

import json
import os
import urllib.request

kv = os.environ["CORRAL_KV_ADDR"]


def put(key: str, value: str) -> None:
    req = urllib.request.Request(f"http://{kv}/kv/{key}", data=value.encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.load(r)["ok"]


put("schema_version", "2")
for sku, stock in {"apple": 10, "pear": 4, "plum": 7}.items():
    put(f"stock:{sku}", str(stock))
print(f"migrated kv at {kv} to schema 2", flush=True)
