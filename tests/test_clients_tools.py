"""Tool calls and logit_bias through a real server with the real clients: the openai SDK
(`chat.completions.parse` with strict `pydantic_function_tool`), LangChain (`with_structured_output`
both ways, typed `bind_tools`), instructor's TOOLS mode, tool_choice "auto", tools beside
response_format, parallel calls streamed and not; logit_bias honoured and checked on chat and
completions.

The model has random weights, so it almost never samples the closing `<|"|>` of a free string
among 262k tokens on its own: the grammar keeps such a string open until max_tokens. These tests
therefore send `logit_bias` boosting the `<|"|>` token (clients pass it as `logit_bias`,
`extra_body` or a model field): every string the grammar lets close, closes at once (an empty
string, valid wherever no minLength says otherwise). Integers, enums and booleans need no help.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_helpers import Running, tiny_gemma

from unigemma.processing.parse import CALL_OPEN, QUOTE
from unigemma.server import ServerConfig, create_app

KEY = "test-key"


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)
    note: Optional[str] = None


class Order(BaseModel):
    item: Literal["tea", "coffee"]
    qty: int = Field(ge=1, le=3)
    gift: bool


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return tiny_gemma(tmp_path_factory.mktemp("clients-tools"))


@pytest.fixture(scope="module")
def server(gemma):
    config = ServerConfig(model_name="tiny", api_key=KEY, max_seqs=4, max_len=1024, max_queue=8)
    with Running(create_app(gemma, config)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ids(gemma):
    tok = gemma.tokenizer

    def one(text):
        (i,) = tok.encode(text, add_special_tokens=False)
        return i
    return {"quote": one(QUOTE), "call": one(CALL_OPEN), "Paris": one("Paris"), "London": one("London"),
            "json_quote": one('"')}


@pytest.fixture(scope="module")
def close_strings(ids):
    return {str(ids["quote"]): 100}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def tool(model: type[BaseModel]) -> dict:
    return openai.pydantic_function_tool(model)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"})


# -- the openai SDK -------------------------------------------------------------------------------
def test_openai_parse_with_strict_pydantic_tool_required(client, close_strings):
    r = client.chat.completions.parse(model="tiny", messages=ask("Weather in Paris for 3 days?"), max_tokens=200,
                                      tools=[tool(Weather)], tool_choice="required", parallel_tool_calls=False,
                                      logit_bias=close_strings)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.function.name == "Weather" and isinstance(call.function.parsed_arguments, Weather)


def test_auto_with_a_bias_toward_calling_opens_a_call_held_to_the_schema(client, ids, close_strings):
    r = client.chat.completions.create(model="tiny", messages=ask("Order tea"), max_tokens=200, temperature=0.8,
                                       seed=3, tools=[tool(Order), tool(Weather)], tool_choice="auto",
                                       parallel_tool_calls=False,
                                       logit_bias={**close_strings, str(ids["call"]): 100})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    {"Order": Order, "Weather": Weather}[call.function.name].model_validate_json(call.function.arguments)


def test_auto_without_bias_may_answer_in_text(client):
    r = client.chat.completions.create(model="tiny", messages=ask("Hi"), max_tokens=8, temperature=0,
                                       tools=[tool(Order)])
    c = r.choices[0]
    for call in c.message.tool_calls or []:  # if the random model did call, the call is schema-true
        Order.model_validate_json(call.function.arguments)
    assert c.message.content or c.message.tool_calls


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_tools_beside_response_format(client, ids, close_strings, choice):
    # closed (no free keys): a free JSON key is a string the random model would never end
    schema = {**Order.model_json_schema(), "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}
    kinds = set()
    for bias in ({}, {str(ids["call"]): 100}):
        r = client.chat.completions.create(model="tiny", messages=ask("Order"), max_tokens=200, temperature=0,
                                           tools=[tool(Weather)], tool_choice=choice, response_format=fmt,
                                           parallel_tool_calls=False, logit_bias={**close_strings, **bias})
        m = r.choices[0].message
        if m.tool_calls:
            Weather.model_validate_json(m.tool_calls[0].function.arguments)
            kinds.add("call")
        else:
            Order.model_validate_json(m.content)
            kinds.add("json")
    assert "call" in kinds  # the bias toward <|tool_call> makes the second one a call


# -- parallel calls, streamed and not ---------------------------------------------------------
def test_parallel_calls_each_have_an_index_id_and_json_arguments(server, ids, close_strings):
    # a strong bias toward <|tool_call> makes the model open call after call until max_tokens
    body = {"messages": ask("Order"), "max_tokens": 120, "temperature": 0, "tools": [tool(Order)],
            "tool_choice": "required", "logit_bias": {**close_strings, str(ids["call"]): 100}}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    calls = whole["message"]["tool_calls"]
    assert len(calls) > 1 and len({c["id"] for c in calls}) == len(calls)
    for c in calls:
        Order.model_validate_json(c["function"]["arguments"])

    streamed: dict[int, dict] = {}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"model": "tiny", "stream": True, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                for d in choice["delta"].get("tool_calls") or []:
                    assert d["index"] not in streamed  # each call comes whole, once, at its own index
                    streamed[d["index"]] = d
    assert sorted(streamed) == list(range(len(calls)))
    assert len({d["id"] for d in streamed.values()}) == len(calls)
    assert [json.loads(d["function"]["arguments"]) for d in streamed.values()] == \
        [json.loads(c["function"]["arguments"]) for c in calls]  # greedy: the same calls


def test_parallel_false_is_exactly_one_call(server, ids, close_strings):
    body = {"messages": ask("Order"), "max_tokens": 120, "temperature": 0, "tools": [tool(Order)],
            "tool_choice": "required", "parallel_tool_calls": False,
            "logit_bias": {**close_strings, str(ids["call"]): 100}}
    choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1


# -- LangChain and instructor -----------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(server, close_strings):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key=KEY, max_retries=0, max_tokens=200,
                      temperature=0, logit_bias=close_strings)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(chat_model, ids, method):
    if method == "json_schema":  # a JSON string ends at '"', not at <|"|>
        chat_model = chat_model.model_copy(update={"logit_bias": {ids["json_quote"]: 100}})
    out = chat_model.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
    assert isinstance(out, Weather)


def test_langchain_bind_tools_with_tool_choice(chat_model):
    msg = chat_model.bind_tools([Order, Weather], tool_choice="Order", parallel_tool_calls=False).invoke("Tea")
    assert [c["name"] for c in msg.tool_calls] == ["Order"]
    Order.model_validate(msg.tool_calls[0]["args"])


def test_instructor_tools_mode(client, close_strings):
    import instructor

    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    out = patched.chat.completions.create(model="tiny", response_model=Weather, messages=ask("Weather?"),
                                          max_tokens=200, max_retries=0, logit_bias=close_strings)
    assert isinstance(out, Weather)


# -- logit_bias ---------------------------------------------------------------------------------
def _first(server, path: str, bias: dict, **kw) -> str:
    body = {"max_tokens": 1, "temperature": 0, "logit_bias": {str(k): v for k, v in bias.items()}, **kw}
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


@pytest.mark.parametrize("path, kw", [("/v1/chat/completions", {"messages": ask("Say a city")}),
                                      ("/v1/completions", {"prompt": "The capital is"})])
def test_logit_bias_forces_and_bans(server, ids, path, kw):
    paris, london = ids["Paris"], ids["London"]
    assert _first(server, path, {paris: 100}, **kw) == "Paris"  # +100 forces a token
    both = {paris: 100, london: 100}
    top = _first(server, path, both, **kw)  # greedy picks one of the two
    assert top in ("Paris", "London")
    banned = {**both, (paris if top == "Paris" else london): -100}  # -100 bans the token greedy picked
    assert _first(server, path, banned, **kw) == ("London" if top == "Paris" else "Paris")


@pytest.mark.parametrize("bias, why", [
    ({"262144": 1}, "vocabulary"),
    ({"abc": 1}, "token id"),
    ({"5": 101}, "-100, 100"),
    ({str(i): 1 for i in range(301)}, "300"),
    ({"-1": 1}, "token id"),
])
@pytest.mark.parametrize("path, kw", [("/v1/chat/completions", {"messages": ask("x")}),
                                      ("/v1/completions", {"prompt": "x"})])
def test_bad_logit_bias_is_400_naming_it(server, bias, why, path, kw):
    r = post(server, path, {"max_tokens": 1, "logit_bias": bias, **kw})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["param"].startswith("logit_bias") and why in e["message"]


def test_schema_of_every_tool_is_checked_before_work(server):
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}
    r = post(server, "/v1/chat/completions", {"messages": ask("x"), "max_tokens": 1, "tools": [bad]})
    assert r.status_code == 400 and "uniqueItems" in r.json()["error"]["message"]
    jsonschema.Draft202012Validator.check_schema(bad["function"]["parameters"])  # a valid schema, refused


def test_n_choices_each_follow_their_own_copy_of_the_grammar(client, close_strings):
    r = client.chat.completions.create(model="tiny", messages=ask("Order"), max_tokens=200, n=3, seed=1,
                                       temperature=1.0, tools=[tool(Order)], tool_choice="required",
                                       parallel_tool_calls=False, logit_bias=close_strings)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        Order.model_validate_json(c.message.tool_calls[0].function.arguments)
