"""/v1/responses (OpenAI's Responses API) against a real uvicorn server on loopback with the tiny random
real-vocabulary model, driven by the clients people use: the openai SDK (create, parse, stream),
LangChain's ChatOpenAI(use_responses_api=True) and the OpenAI Agents SDK in its default mode.
Random weights produce gibberish: these check the protocol and the constraints, not the content."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_helpers import Running, png_data_url, tiny_gemma, wav_base64

from unigemma.server import ServerConfig, create_app
from unigemma.server.convert import Limits

KEY = "test-key"
# integer / enum / boolean parameters: forced calls finish under every tool grammar (a free string
# argument needs the closing <|"|> token, which random weights almost never sample)
ROLL = {"type": "object", "properties": {"sides": {"type": "integer", "minimum": 2, "maximum": 99},
                                         "unit": {"type": "string", "enum": ["c", "f"]},
                                         "loud": {"type": "boolean"}},
        "required": ["sides", "unit", "loud"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "roll", "description": "roll a die", "parameters": ROLL, "strict": True}]


class Answer(BaseModel):
    ok: bool
    n: int
    mood: Literal["calm", "loud"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return tiny_gemma(tmp_path_factory.mktemp("responses"))


@pytest.fixture(scope="module")
def server(gemma):
    config = ServerConfig(model_name="tiny", api_key=KEY, max_seqs=4, max_len=1024, max_queue=8,
                          limits=Limits(max_media_bytes=512 << 10))
    with Running(create_app(gemma, config)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, body, path="/v1/responses", **kw):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


def check_args(call) -> dict:
    """A forced call's arguments: JSON valid under the tool's schema (the grammar holds it to it)."""
    args = json.loads(call.arguments)
    jsonschema.validate(args, ROLL)
    return args


def test_text_input_usage_and_incomplete(client):
    r = client.responses.create(model="tiny", input="Hello", max_output_tokens=6, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "incomplete"
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    assert r.output_text == msg.content[0].text != ""
    u = r.usage
    assert u.output_tokens == 6 and u.input_tokens > 3 and u.total_tokens == u.input_tokens + 6
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0
    again = client.responses.create(model="tiny", input=[{"role": "user", "content": "Hello"}],
                                    max_output_tokens=6, temperature=0)
    assert again.output_text == r.output_text  # a string input is one user message
    told = client.responses.create(model="tiny", input="Hello", instructions="Answer in French.",
                                   max_output_tokens=2, temperature=0.7, top_p=0.9, metadata={"k": "v"})
    assert told.usage.input_tokens > r.usage.input_tokens + 3  # the system turn is in the prompt
    assert told.instructions == "Answer in French." and told.temperature == 0.7 and told.top_p == 0.9
    assert told.metadata == {"k": "v"} and told.tools == [] and told.tool_choice == "auto"


def test_item_input_with_image_and_audio(client):
    text = client.responses.create(model="tiny", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What?"}]}], max_output_tokens=2)
    media = client.responses.create(model="tiny", max_output_tokens=2, input=[
        {"type": "message", "role": "developer", "content": "Look closely."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": png_data_url(), "detail": "auto"},
            {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
            {"type": "input_text", "text": "What?"}]}])
    # the image's soft tokens and 0.5 s of audio (13 tokens) are in the prompt, and the developer turn
    assert media.usage.input_tokens > text.usage.input_tokens + 13 + 64
    assert media.output[0].type == "message"


def test_json_schema_with_parse_and_stream(client):
    r = client.responses.parse(model="tiny", input="Answer in JSON", text_format=Answer, max_output_tokens=80,
                               temperature=0)
    assert r.status == "completed" and isinstance(r.output_parsed, Answer)
    assert r.text.format.type == "json_schema" and r.text.format.strict is True
    # sampled: up to 61 tokens seen in 40 runs (an integer may take 18 digits), so room to spare
    with client.responses.stream(model="tiny", input="JSON please", text_format=Answer, max_output_tokens=160,
                                 temperature=0.9) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, Answer) and "".join(deltas) == final.output_text
    obj = client.responses.create(model="tiny", input="JSON", max_output_tokens=40, temperature=0.8,
                                  text={"format": {"type": "json_object"}})
    assert obj.output_text.startswith("{")
    if obj.status == "completed":  # a sampled object may still be open at max_output_tokens
        assert isinstance(json.loads(obj.output_text), dict)


def test_stream_event_sequence(server, client):
    events = list(client.responses.create(model="tiny", input="Hi", max_output_tokens=5, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                                     "response.output_text.done", "response.content_part.done",
                                     "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == final.output_text and final.usage.output_tokens == 5
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    # on the wire: SSE with an event: line naming each event's type, no [DONE]
    with httpx.stream("POST", server.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                      json={"input": "Hi", "max_output_tokens": 2, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[-1] == "response.incomplete"
    assert not any("[DONE]" in line for line in lines)


@pytest.mark.parametrize("body", [
    {"input": "Hi", "max_output_tokens": 3, "include": ["message.output_text.logprobs"], "top_logprobs": 2},
    {"input": "Roll", "tools": TOOLS, "tool_choice": "required", "max_output_tokens": 60, "temperature": 0.8},
    {"input": "JSON", "text": {"format": {"type": "json_schema", "name": "roll", "schema": ROLL, "strict": True}},
     "max_output_tokens": 60},
])
def test_wire_format_validates_as_the_sdk_types(server, body):
    # the SDK builds its objects without validating them: check our JSON against its types strictly
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    r = Response.model_validate(post(server, body).json())
    assert r.output and r.usage.output_tokens > 0
    if "include" in body:
        lps = r.output[0].content[0].logprobs
        assert len(lps) == 3 and all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in lps)
    with httpx.stream("POST", server.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                      json={**body, "stream": True}, timeout=60) as stream:
        lines = [line for line in stream.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [TypeAdapter(ResponseStreamEvent).validate_json(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [e.type for e in events] and events[-1].type in ("response.completed", "response.incomplete")


def test_forced_function_call_then_its_output(client):
    # one call: with parallel calls allowed, random weights often open another and run out of tokens
    r = client.responses.create(model="tiny", input="Roll a die", tools=TOOLS, tool_choice="required",
                                max_output_tokens=60, temperature=0.8, parallel_tool_calls=False)
    assert r.status == "completed" and r.tools[0].name == "roll" and r.tool_choice == "required"
    assert r.parallel_tool_calls is False
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and all(c.name == "roll" and c.call_id and c.id.startswith("fc_") and c.status == "completed"
                         for c in calls)
    for c in calls:
        check_args(c)
    # the call and its result sent back as items: it renders, and the model answers
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": "4"} for c in calls]
    follow = client.responses.create(model="tiny", tools=TOOLS, max_output_tokens=3, input=[
        {"role": "user", "content": "Roll a die"}, *[o.model_dump(exclude_none=True) for o in r.output], *results])
    assert follow.usage.input_tokens > r.usage.input_tokens
    # the same through previous_response_id: only the results are new
    chained = client.responses.create(model="tiny", tools=TOOLS, max_output_tokens=3, input=results,
                                      previous_response_id=r.id)
    assert chained.usage.input_tokens == follow.usage.input_tokens and chained.previous_response_id == r.id
    named = client.responses.create(model="tiny", input="Roll", tools=TOOLS, max_output_tokens=60,
                                    tool_choice={"type": "function", "name": "roll"})
    assert [o.name for o in named.output if o.type == "function_call"][:1] == ["roll"]


def test_streamed_function_call_events(client):
    events = list(client.responses.create(model="tiny", input="Roll", tools=TOOLS, tool_choice="required",
                                          max_output_tokens=60, temperature=0.8, stream=True,
                                          parallel_tool_calls=False))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call")
    k = events.index(added)
    assert kinds[k:k + 4] == ["response.output_item.added", "response.function_call_arguments.delta",
                              "response.function_call_arguments.done", "response.output_item.done"]
    assert added.item.arguments == "" and events[k + 1].delta == events[k + 2].arguments == events[k + 3].item.arguments
    check_args(events[k + 3].item)
    assert events[-1].response.output[-1].call_id == events[k + 3].item.call_id


def test_previous_response_id_store_get_delete_and_cap(server, client):
    first = client.responses.create(model="tiny", input="Hi", max_output_tokens=3)
    second = client.responses.create(model="tiny", input="Again", max_output_tokens=3, previous_response_id=first.id)
    alone = client.responses.create(model="tiny", input="Again", max_output_tokens=3)
    # the first turn (input and output) is in the second's prompt
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    unstored = client.responses.create(model="tiny", input="Hi", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match=first.id):
        client.responses.create(model="tiny", input="x", max_output_tokens=1, previous_response_id=first.id)
    store = server.server.config.app.state.responses
    cap = store.max_entries
    store.max_entries = 2
    try:
        ids = [client.responses.create(model="tiny", input="x", max_output_tokens=1).id for _ in range(3)]
        assert len(store) == 2 and store.get(ids[0]) is None and store.get(ids[2]) is not None
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="tiny", input="x", max_output_tokens=1, previous_response_id=ids[0])
        assert e.value.body["param"] == "previous_response_id"
    finally:
        store.max_entries = cap
    small = store.max_bytes
    store.max_bytes = 5_000
    try:  # a byte cap too: a long conversation (~4.6 kB with its response; the others ~1.1 kB) pushes out the entries before it
        client.responses.create(model="tiny", input="word " * 700, max_output_tokens=1)
        assert store.get(ids[2]) is None and len(store) == 1 and store._bytes <= 5_000
    finally:
        store.max_bytes = small


def test_reasoning_item_from_the_thought_channel(server, client, gemma):
    # A random model does not think on its own: a grammar scripts the thinking channel (as in
    # test_server), so this checks the server's side: the thinking prompt, the reasoning item, its events.
    app = server.server.config.app
    scheduler, grammars = app.state.scheduler, app.state.grammars
    import llguidance

    tok = gemma.tokenizer
    open_, close = tok.token_to_id("<|channel>"), tok.token_to_id("<channel|>")
    lark = f'start: <[{open_}]> "thought\\n" /[a-z]{{3,8}}/ <[{close}]> /[a-z]{{3,8}}/'
    original = scheduler.submit
    scheduler.submit = lambda inputs, params, constraint=None: original(
        inputs, params, constraint=grammars._constraint(llguidance.LLMatcher.grammar_from_lark(lark)))
    try:
        r = client.responses.create(model="tiny", input="Think", max_output_tokens=40, reasoning={"effort": "high"})
        events = list(client.responses.create(model="tiny", input="Think", max_output_tokens=40, stream=True,
                                              reasoning={"effort": "medium", "summary": "auto"}))
    finally:
        scheduler.submit = original
    thought, msg = r.output
    assert thought.type == "reasoning" and thought.content[0].text.isalpha() and thought.summary == []
    assert msg.type == "message" and msg.content[0].text.isalpha() and r.usage.output_tokens_details.reasoning_tokens > 0
    kinds = [e.type for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    final = events[-1].response
    assert streamed.isalpha() and final.output[0].content[0].text == final.output[0].summary[0].text == streamed
    assert "response.reasoning_summary_text.done" in kinds and final.output[1].type == "message"


@pytest.mark.parametrize("body, where", [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f", "detail": "auto"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": ["x"], "output": "1"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "roll", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": 7}]}, "input[1].output"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": 3, "arguments": "{}"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a": "\\ud800"}'}]},
     "input[0].arguments"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input[0].arguments"),
    ({"input": [{"role": "user", "content": ["text"]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "roll", "arguments": "{oops"}]},
     "input[0].arguments"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
     "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include[0]"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "reasoning": {"effort": "maximal"}}, "reasoning.effort"),
    ({"input": "x", "metadata": {"k": "v" * 600}}, "metadata"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),  # no message left to answer
    ({}, "input"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,!!"}]}]},
     "input"),
    ({"input": "word " * 1100}, "input"),  # longer than the context
    ({"input": "x", "tools": [{"type": "function", "name": "n" * 65}]}, "tools"),
    ('{"input": "x", "max_output_tokens": 1, "user": "\\ud800"}', "user"),  # JSON text: a lone surrogate
])
def test_bad_requests_are_400_naming_the_field(server, body, where):
    if isinstance(body, str):
        r = httpx.post(server.url + "/v1/responses", content=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    else:
        r = post(server, {"max_output_tokens": 1, **body})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["type"] == "invalid_request_error" and where in (e["param"] or e["message"]), e


def test_unknown_ids_model_and_auth(server):
    assert httpx.get(server.url + "/v1/responses/resp_x", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.delete(server.url + "/v1/responses/resp_x",
                        headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    # any name is answered by the one model unless --strict-model-name (server/names.py)
    assert post(server, {"model": "gpt-9", "input": "x", "max_output_tokens": 1}).json()["model"] == "tiny"
    assert httpx.post(server.url + "/v1/responses", json={"input": "x"}).status_code == 401


def test_stream_disconnect_cancels(server):
    scheduler = server.server.config.app.state.scheduler
    before = scheduler.tokens_out
    with httpx.stream("POST", server.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                      json={"input": "x", "max_output_tokens": 400, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: response.output_text.delta"):
                break  # the first real token: hang up
    deadline = time.time() + 10
    while (scheduler.running or scheduler.waiting) and time.time() < deadline:
        time.sleep(0.01)
    assert not scheduler.running and not scheduler.waiting and scheduler.cache.n == 0
    assert scheduler.tokens_out - before < 100  # it stopped long before max_output_tokens


def test_langchain_chat_openai_with_the_responses_api(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key=KEY, use_responses_api=True,
                     max_tokens=4, max_retries=0)
    msg = llm.invoke("Hello")
    assert msg.text and msg.usage_metadata["output_tokens"] == 4
    assert msg.response_metadata.get("id", "").startswith("resp_")


def test_agents_sdk_default_mode_calls_the_function_tool(server):
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    called = []

    # one integer parameter: the tool grammar holds the call to it, and no free string needs closing
    @function_tool
    def lucky(count: int) -> str:
        """Say a lucky number."""
        called.append(count)
        return f"lucky {count}"

    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0))
    agent = Agent(name="a", instructions="Call the tool.", model="tiny", tools=[lucky],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=60, temperature=0),
                  tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(Runner.run(agent, "Go"))
    assert len(called) == 1 and isinstance(called[0], int) and result.final_output == f"lucky {called[0]}"
