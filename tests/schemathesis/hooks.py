"""Schemathesis hooks for tests/openapi.rs.

Keeps the fuzzing on loopback: the API's SSRF guard resolves the host of
every webhook URL it is given, so a generated name would become a DNS query
leaving the machine. Every string under a `url` key is replaced, right
before the request, by one that needs no lookup: http(s) URLs by the
receiver the test admits (STEVEDORE_WEBHOOK_ALLOW_HOSTS), anything else by
a string that is no URL at all. Whether a value matches the documented
pattern (`^https?://`) stays as it was, so positive cases stay positive and
negative ones negative.
"""

import schemathesis

ADMITTED = "http://127.0.0.1:9/hook"
NOT_A_URL = "not-a-url"


def _local(value):
    if isinstance(value, dict):
        return {
            k: (_rewrite(v) if k == "url" and isinstance(v, str) else _local(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_local(v) for v in value]
    return value


def _rewrite(url):
    return ADMITTED if url.startswith(("http://", "https://")) else NOT_A_URL


@schemathesis.hook
def before_call(context, case, kwargs):
    if isinstance(case.body, (dict, list)):
        case.body = _local(case.body)
