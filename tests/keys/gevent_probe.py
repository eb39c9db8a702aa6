"""Run in a subprocess: gevent-patched, like a gunicorn gevent worker. Measures how long the
hub goes without running other greenlets while one greenlet waits on the database.

Usage: python gevent_probe.py <database_url> <blocking_call>; prints one JSON object.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from llmproxy.keys.model import hash_secret  # noqa: E402
from llmproxy.keys.store import KeyStore  # noqa: E402

TICK = 0.01


def main() -> None:
    url, call = sys.argv[1], sys.argv[2]
    store = KeyStore.from_url(url)
    key, secret = store.create("probe")
    store.lookup(hash_secret(secret))  # connect and warm up before measuring
    done: dict[str, float] = {}
    gaps: list[float] = []
    running = True

    def ticker() -> None:
        last = time.monotonic()
        while running:
            gevent.sleep(TICK)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def slow() -> None:
        if call == "pg_sleep":  # the database is slow: the same engine as every lookup
            with store.engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_sleep(1)"))
        else:  # the control: a call that blocks the whole process for a second
            monkey.get_original("time", "sleep")(1.0)
        done["slow"] = time.monotonic()

    def lookup() -> None:
        gevent.sleep(0.2)  # start while the slow call is under way
        assert store.lookup(hash_secret(secret)) == key
        done["lookup"] = time.monotonic()

    tick = gevent.spawn(ticker)
    gevent.sleep(TICK * 3)
    start = time.monotonic()
    gevent.joinall([gevent.spawn(slow), gevent.spawn(lookup)], raise_error=True)
    running = False
    tick.join()
    store.close()
    print(json.dumps({"slow": done["slow"] - start, "lookup": done["lookup"] - start,
                      "max_gap": max(gaps), "ticks": len(gaps)}))


if __name__ == "__main__":
    main()
