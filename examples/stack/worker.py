"""A worker pinned to an exclusive core: places an order through the API replicas in turn."""

import itertools
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
apis = os.environ["CORRAL_API_ADDRS"].split(",")
print(f"worker on CPUs {sorted(os.sched_getaffinity(0))}, {len(apis)} API replicas: {', '.join(apis)}", flush=True)
skus = itertools.cycle(["apple", "pear", "plum"])
for addr in itertools.cycle(apis):
    sku = next(skus)
    try:
        req = urllib.request.Request(f"http://{addr}/order/{sku}", method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            body = json.load(r)
        print(f"ordered {sku} via {body['served_by']}: {body['left']} left", flush=True)
    except urllib.error.HTTPError as e:
        print(f"{sku} via {addr}: {e.code} {json.load(e).get('error')}", flush=True)
    except OSError as e:
        print(f"{sku} via {addr}: {e}", flush=True)
    time.sleep(1)
