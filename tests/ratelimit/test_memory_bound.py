"""The memory backend under 100,000 distinct users in one minute, measured in a fresh
interpreter (its RSS is then the limiter's and nothing else's).

The run goes through the same Limiter and MemoryStore a gunicorn worker uses, with the
default settings and the clock stopped, so nothing expires: the worst case. The end-to-end
flood against a real worker is in tests/e2e/test_hostile.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmproxy.config import DEFAULT_MAX_COUNTERS

USERS = 100_000
# ~0.7 KB of RSS per single-bucket counter, plus the limits cache (<= 1024 scopes, ~1 KB each)
RSS_BUDGET_MIB = DEFAULT_MAX_COUNTERS * 0.9 / 1024 + 4

SCRIPT = """
import json, sys
from llmproxy.config import load_settings
from llmproxy.exchange import Exchange, RequestInfo
from llmproxy.ratelimit import build_store
from llmproxy.ratelimit.policy import Limiter

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

limits = {"requests_per_minute": 5, "tokens_per_minute": 100000,
          "requests_per_day": 50, "tokens_per_day": 1000000}
settings = load_settings({"features": {"rate_limiting": {
    "enabled": True, "scope_limits": {"user": limits}}}}, environ={}).ratelimit
evicted = []
store = build_store(settings, on_evicted=evicted.append)
store.clock = lambda: 1_700_000_000.0  # one instant: nothing leaves its window
limiter = Limiter(settings, store)

def call(user):
    ex = Exchange("r", "POST", "/openai/v1/chat/completions", provider="openai",
                  dialect="openai", user=user, request_info=RequestInfo(max_output_tokens=8))
    assert limiter.reserve(ex) is not None

for i in range(1000):  # warm-up: the interpreter's own first allocations
    call(f"warm-{i}")
before = rss_kib()
for i in range(int(sys.argv[1])):
    call(f"user-{i}")
print(json.dumps({"before": before, "after": rss_kib(), "counters": len(store),
                  "evicted": sum(evicted), "cap": store.max_counters}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_memory_store_stays_bounded_under_100k_users() -> None:
    """Four counters a user: 400,000 without the cap (~270 MB); the default keeps 50,000."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(USERS)], check=True,
                         capture_output=True, text=True, timeout=600)
    figures = json.loads(out.stdout)
    grown_mib = (figures["after"] - figures["before"]) / 1024
    print(f"{USERS} users: {figures['counters']} counters kept, {figures['evicted']} evicted, "
          f"RSS +{grown_mib:.1f} MiB")
    assert figures["cap"] == DEFAULT_MAX_COUNTERS
    assert figures["counters"] == DEFAULT_MAX_COUNTERS
    assert figures["evicted"] == 4 * (USERS + 1000) - DEFAULT_MAX_COUNTERS
    assert grown_mib < RSS_BUDGET_MIB, f"RSS grew {grown_mib:.1f} MiB"
