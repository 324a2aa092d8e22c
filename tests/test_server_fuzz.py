"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI document
(valid and invalid bodies) and sends them to a real server; no answer may be a 5xx, and every
error must be OpenAI's error object. Bounded: a fixed number of examples per route."""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from server_helpers import Running, tiny_gemma

from unigemma.server import ServerConfig, create_app


@pytest.fixture(scope="module")
def fuzz_schema(tmp_path_factory):
    gemma = tiny_gemma(tmp_path_factory.mktemp("fuzz"))
    # a short context and queue: generated max_tokens and n are large, replies stay cheap
    app = create_app(gemma, ServerConfig(max_seqs=4, max_len=64, max_queue=8, max_tokens_default=8))
    with Running(app) as s:
        yield schemathesis.openapi.from_url(s.url + "/openapi.json")
        app.state.scheduler.stop()


def test_no_server_errors(fuzz_schema):
    # hypothesis drives schemathesis' strategies directly (its pytest plugin needs pytest internals
    # this pytest no longer has)
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                              "/v1/audio/transcriptions", "/v1/audio/translations"}
    statuses = collections.Counter()
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(timeout=60)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        fuzz()
    print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert statuses[200] and statuses[400]  # both accepted and refused bodies were generated
