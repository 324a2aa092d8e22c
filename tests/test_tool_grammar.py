"""Tool calls true to their schema: tool_grammar.py's rules driven by a random sampler over the
grammar's allowed-token mask (the real Gemma 4 vocabulary, no model), the text read back with
processing/parse.py and the arguments validated with jsonschema; hand-written calls accepted or
rejected by the matcher; unsupported and hostile schemas refused with InputError."""

from __future__ import annotations

import enum
import itertools
import json
import time
from typing import Literal, Optional, Union

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

from unigemma.errors import InputError
from unigemma.generate.grammar import Grammars
from unigemma.processing.parse import CALL_CLOSE, CALL_OPEN, QUOTE, parse_output, render_tool_call
from unigemma.processing.tokenizer import Tokenizer
from unigemma.vocab import gemma4_vocab_gguf

SEEDS = range(4)


# -- schemas the client libraries generate -----------------------------------------------------
class Unit(str, enum.Enum):
    c = "celsius"
    f = "fahrenheit"


class Place(BaseModel):
    city: str = Field(description="city name")
    country: Optional[str] = None


class Query(BaseModel):
    place: Place
    unit: Unit = Unit.c
    days: int = Field(ge=1, le=14)
    tags: list[str] = []
    mode: Literal["fast", "slow"] = "fast"
    note: Optional[str] = None


class Node(BaseModel):  # recursive: $ref to itself
    name: str
    children: list["Node"] = Field(default_factory=list, max_length=2)


class Order(BaseModel):
    item: Literal["tea", "café au lait", "a/b-c_d"]
    qty: int = Field(ge=1, le=5)
    price: float = Field(gt=0, le=99.5)
    gift: bool = False
    when: Optional[Union[int, str]] = None


def _library_schemas() -> dict[str, dict]:
    import openai
    from agents import function_tool
    from instructor import openai_schema
    from langchain_core.utils.function_calling import convert_to_openai_tool

    @function_tool
    def lookup(place: Place, days: int, unit: Unit = Unit.c) -> str:
        """Look up the weather."""
        return ""

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first
            b: second
        """
        return a + b

    out = {}
    for model in (Query, Node, Order):
        out[f"openai-strict-{model.__name__}"] = openai.pydantic_function_tool(model)["function"]["parameters"]
        out[f"langchain-{model.__name__}"] = convert_to_openai_tool(model)["function"]["parameters"]
        out[f"instructor-{model.__name__}"] = openai_schema(model).openai_schema["parameters"]
    out["langchain-function"] = convert_to_openai_tool(add)["function"]["parameters"]
    out["agents-function_tool"] = lookup.params_json_schema
    return out


def obj(props: dict, required=(), **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(required), **kw}


HAND = {
    "empty": {"type": "object", "properties": {}},
    "free-object": {"type": "object"},
    "free-additional": obj({"id": {"type": "integer"}, "del\x7f": {"type": "null"}}, ["id"],
                           additionalProperties={"type": "boolean"}),
    "only-optional": obj({"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "null"}}),
    "mixed-required": obj({"Zeta": {"type": "integer"}, "alpha": {"type": "string", "maxLength": 3},
                           "Beta": {"type": "boolean"}, "gamma": {"type": "number"}}, ["Zeta", "gamma"],
                          additionalProperties=False),
    "strings-accents": obj({"s": {"enum": ["é/è", "a-b_c", "line\nbreak", "", "x,y}z", "ctl\x00\x7f\x85"]},
                            "t": {"const": "tab\there"}}, ["s", "t"]),
    "string-bounds": obj({"s": {"type": "string", "minLength": 2, "maxLength": 4}}, ["s"]),
    "string-pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                           "loose": {"type": "string", "pattern": "ab"}}, ["code", "loose"]),
    "string-formats": obj({"d": {"type": "string", "format": "date"}, "u": {"type": "string", "format": "uuid"},
                           "t": {"type": "string", "format": "date-time"}, "w": {"type": "string", "format": "uri"}},
                          ["d", "u", "t"]),
    "numbers": obj({"i": {"type": "integer"}, "n": {"type": "number"}, "pos": {"type": "integer", "minimum": 0},
                    "neg": {"type": "number", "exclusiveMaximum": 0}, "m": {"type": "integer", "multipleOf": 5,
                                                                           "minimum": 0, "maximum": 100}},
                   ["i", "n", "pos", "neg", "m"]),
    "type-list": obj({"v": {"type": ["string", "integer", "null"]}}, ["v"]),
    "enum-any-json": obj({"e": {"enum": [1, 2.5, None, True, [1, "x"], {"k": "v", "A": [None]}]}}, ["e"]),
    "const-object": obj({"c": {"const": {"b": 1, "a": "é"}}}, ["c"]),
    "array-bounds": obj({"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}}, ["xs"]),
    "array-empty-only": obj({"xs": {"type": "array", "maxItems": 0}}, ["xs"]),
    "prefix-items": obj({"p": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                               "items": False, "minItems": 1}}, ["p"]),
    "nested": obj({"a": obj({"b": obj({"c": {"type": "array", "items": obj({"d": {"type": "boolean"}}, ["d"])}},
                                      ["c"])}, ["b"])}, ["a"]),
    "anyof-null": obj({"x": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
                       "y": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}}, ["x", "y"]),
    "allof-merge": obj({"m": {"allOf": [obj({"a": {"type": "integer"}}, ["a"]),
                                        obj({"b": {"type": "string"}}, ["b"])]}}, ["m"]),
    "definitions-ref": {"type": "object", "definitions": {"P": obj({"q": {"type": "integer"}}, ["q"])},
                        "properties": {"p": {"$ref": "#/definitions/P"}, "r": {"$ref": "#/definitions/P"}},
                        "required": ["p"]},
    "ref-with-siblings": {"type": "object", "$defs": {"S": {"type": "string"}},
                          "properties": {"s": {"$ref": "#/$defs/S", "maxLength": 3, "description": "short"}},
                          "required": ["s"]},
    "odd-keys": obj({"a b": {"type": "integer"}, "x:y": {"type": "boolean"}, " pad ": {"type": "null"},
                     "{}": {"type": "integer"}, "fs/path": {"type": "string", "maxLength": 2}},
                    ["a b", "x:y", " pad ", "{}", "fs/path"]),
    "required-undeclared": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]},
    "annotations-ignored": obj({"a": {"type": "integer", "title": "A", "x-extra": 1, "nullable": True,
                                      "examples": [1], "deprecated": True}}, ["a"], discriminator={"x": 1}),
}

SCHEMAS = {**_library_schemas(), **HAND}


# -- the driver ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.from_gguf(gemma4_vocab_gguf())
    stops = set(tok.eos_ids) | {tok.token_to_id(t) for t in ("<turn|>", "<|tool_response>")}
    grammars = Grammars(tok, stops, tok.vocab_size)
    # a random sampler that favours what ends values (quotes, brackets, commas, digits), so
    # strings and arrays close within a few hundred tokens
    w = np.ones(tok.vocab_size)
    for t in (QUOTE, CALL_CLOSE, "<channel|>"):
        w[tok.token_to_id(t)] = 3e4
    for ch in ',}]{[:0123456789.-tnNe':
        ids = tok.encode(ch, add_special_tokens=False)
        if len(ids) == 1:
            w[ids[0]] = 3e3
    w[list(stops)] = 3e4
    return tok, grammars, w, stops


def drive(setup, constraint, seed: int, steps: int = 600, boost: dict | None = None) -> str:
    tok, _, w, stops = setup
    if boost:
        w = w.copy()
        for t, f in boost.items():
            w[tok.token_to_id(t)] *= f
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        allowed = np.flatnonzero(constraint.allowed().numpy())
        cdf = np.cumsum(w[allowed])
        t = int(allowed[np.searchsorted(cdf, rng.random() * cdf[-1], side="right")])
        if t in stops:
            assert constraint.complete
            return tok.decode(out, skip_special_tokens=False)
        constraint.advance(t)
        out.append(t)
    pytest.fail(f"seed {seed}: no end after {steps} tokens: {tok.decode(out, skip_special_tokens=False)[:300]!r}")


def tool(name: str, parameters) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def check_calls(text: str, tools: list[dict], want: int | None = 1) -> list[dict]:
    out = parse_output(text)
    assert not out.errors, (text, out.errors)
    if want is not None:
        assert len(out.tool_calls) == want, text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in out.tool_calls:
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, schemas[call["function"]["name"]])
    return out.tool_calls


# -- generated calls validate -------------------------------------------------------------------
def test_at_least_30_schemas():
    assert len(SCHEMAS) >= 30


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_calls_parse_and_validate(setup, name):
    tools = [tool("fs:read", SCHEMAS[name])]
    for seed in SEEDS:
        text = drive(setup, setup[1].tool_call(tools), seed)
        check_calls(text, tools)


def test_parallel_calls_each_validate_with_own_ids(setup):
    tools = [tool("order", SCHEMAS["openai-strict-Order"]), tool("weather", SCHEMAS["instructor-Query"])]
    counts = set()
    for seed in range(6):
        text = drive(setup, setup[1].tool_call(tools, parallel=True), seed, steps=1500,
                     boost={CALL_OPEN: 1e5})  # after a call, often open another
        calls = check_calls(text, tools, want=None)
        assert calls and len({c["id"] for c in calls}) == len(calls)
        counts.add(len(calls))
    assert max(counts) > 1  # one or more: some seed wrote several
    one = setup[1].tool_call(tools, parallel=False)
    assert len(check_calls(drive(setup, one, 0), tools)) == 1


# -- hand-written calls: accepted or rejected by the matcher -------------------------------------
def accepts(setup, constraint, text: str) -> bool:
    tok = setup[0]
    for t in tok.encode(text, add_special_tokens=False):
        if not constraint.allowed()[t]:
            return False
        constraint.advance(t)
    return constraint.complete


MIXED = HAND["mixed-required"]  # Beta?, alpha?, gamma (required), Zeta (required): dictsort order


def test_every_optional_subset_in_dictsort_order_is_accepted(setup):
    tools = [tool("f", MIXED)]
    for beta, alpha in itertools.product([None, True], [None, "ab"]):
        args = {"Zeta": -3, "gamma": 2.5}
        if beta is not None:
            args["Beta"] = beta
        if alpha is not None:
            args["alpha"] = alpha
        text = render_tool_call("f", args)
        assert accepts(setup, setup[1].tool_call(tools), text), text
    assert accepts(setup, setup[1].tool_call(tools), f"{CALL_OPEN}call:f{{gamma:1e-05,Zeta:None}}{CALL_CLOSE}") is False
    assert accepts(setup, setup[1].tool_call(tools), f"{CALL_OPEN}call:f{{gamma:0.5,Zeta:7}}{CALL_CLOSE}")


@pytest.mark.parametrize("body", [
    "{Zeta:1,gamma:2}",  # out of dictsort order
    "{gamma:2}",  # required Zeta missing
    "{gamma:2,Zeta:1,extra:1}",  # undeclared key with additionalProperties false
    "{gamma:2,gamma:2,Zeta:1}",  # duplicate key
    "{gamma:2,Zeta:1,}",  # trailing comma
    "{,gamma:2,Zeta:1}",  # leading comma
    "{alpha:abc,gamma:2,Zeta:1}",  # unquoted string
    '{alpha:<|"|>abcd<|"|>,gamma:2,Zeta:1}',  # maxLength 3
    "{gamma: 2,Zeta:1}",  # whitespace
    '{gamma:<|"|>2<|"|>,Zeta:1}',  # a string for a number
    "{gamma:2,Zeta:1.5}",  # a float for an integer
    "{Beta:yes,gamma:2,Zeta:1}",  # not a boolean
])
def test_invalid_calls_are_rejected(setup, body):
    text = f"{CALL_OPEN}call:f{body}{CALL_CLOSE}"
    assert not accepts(setup, setup[1].tool_call([tool("f", MIXED)]), text)


def test_null_reads_back_as_none_either_way(setup):
    tools = [tool("f", HAND["only-optional"])]
    for word in ("null", "None"):
        text = f"{CALL_OPEN}call:f{{c:{word}}}{CALL_CLOSE}"
        assert accepts(setup, setup[1].tool_call(tools), text)
        assert json.loads(parse_output(text).tool_calls[0]["function"]["arguments"]) == {"c": None}


def test_wrong_function_name_is_rejected(setup):
    tools = [tool("fs:read", HAND["empty"])]
    assert accepts(setup, setup[1].tool_call(tools), f"{CALL_OPEN}call:fs:read{{}}{CALL_CLOSE}")
    assert not accepts(setup, setup[1].tool_call(tools), f"{CALL_OPEN}call:fs:write{{}}{CALL_CLOSE}")


# -- auto: text, thinking, then held calls; tools beside a response format --------------------
@pytest.mark.parametrize("thinking", [False, True])
def test_tool_or_text_holds_calls_to_the_schema(setup, thinking):
    tools = [tool("order", SCHEMAS["openai-strict-Order"])]
    saw_call = saw_text = False
    for seed in range(6):
        c = setup[1].tool_or_text(tools, thinking=thinking)
        # push the sampler to open a call (random text would otherwise rarely meet <|tool_call>)
        text = drive(setup, c, seed, steps=1500, boost={CALL_OPEN: 3e5 if seed % 2 else 1})
        calls = check_calls(text, tools, want=None)
        saw_call |= bool(calls)
        saw_text |= not calls
        out = parse_output(text)
        assert bool(out.reasoning) <= thinking
    assert saw_call and saw_text


def test_tool_or_text_refuses_a_spelled_out_call_opener(setup):
    c = setup[1].tool_or_text([tool("f", HAND["empty"])])
    assert not accepts(setup, c, "hello <|tool_call" + ">")  # tokenizes as the special token, so:
    tok = setup[0]
    c = setup[1].tool_or_text([tool("f", HAND["empty"])])
    for piece in ["hi", "<", "|", "tool", "_", "call"]:
        (t,) = tok.encode(piece, add_special_tokens=False)
        c.advance(t)
    (gt,) = tok.encode(">", add_special_tokens=False)
    assert not c.allowed()[gt]
    # nor can a thought spell its own end (the text after it would be free of the grammar)
    c = setup[1].tool_or_text([tool("f", HAND["empty"])], thinking=True)
    c.advance(tok.token_to_id("<|channel>"))
    for piece in ["hi", "<", "channel", "|"]:
        (t,) = tok.encode(piece, add_special_tokens=False)
        c.advance(t)
    assert not c.allowed()[gt]


def test_tools_or_json_reply(setup):
    fmt = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
           "additionalProperties": False}
    tools = [tool("order", SCHEMAS["openai-strict-Order"])]
    kinds = set()
    for seed in range(8):
        text = drive(setup, setup[1].tool_or_json(tools, fmt), seed, boost={CALL_OPEN: 3e4})
        out = parse_output(text)
        if out.tool_calls:
            check_calls(text, tools)
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(text), fmt)
            kinds.add("json")
    assert kinds == {"call", "json"}


# -- refused, ignored, hostile ------------------------------------------------------------------
@pytest.mark.parametrize("keyword, schema", [
    ("not", {"not": {"type": "string"}}),
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("if", {"if": {"type": "string"}, "then": {"minLength": 1}}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {}}}),
    ("minProperties", {"type": "object", "minProperties": 1}),
    ("contains", {"type": "array", "contains": {"type": "integer"}}),
    ("$ref", {"$ref": "https://example.com/schema.json"}),
    ("$ref", {"$ref": "#/$defs/missing"}),
    ("pattern", {"type": "string", "pattern": "(?<=a)b"}),
    ("type", {"type": "decimal"}),
])
def test_unsupported_keywords_are_refused_by_name(setup, keyword, schema):
    with pytest.raises(InputError, match=f"properties.x.*{keyword}".replace("$", r"\$")):
        setup[1].tool_call([tool("f", obj({"x": schema}, ["x"]))])


@pytest.mark.parametrize("name", ["two words", "a{b", "", "x<y", 'q"'])
def test_unwritable_function_names_are_refused(setup, name):
    with pytest.raises(InputError, match="name"):
        setup[1].tool_call([tool(name, HAND["empty"])])


def test_unwritable_strings_and_keys_are_refused(setup):
    with pytest.raises(InputError, match="enum"):
        setup[1].tool_call([tool("f", obj({"x": {"enum": [f"a{QUOTE}b"]}}))])
    with pytest.raises(InputError, match="key"):
        setup[1].tool_call([tool("f", obj({f"k{QUOTE}": {"type": "integer"}}))])


def _deep(n: int) -> dict:
    s = {"type": "integer"}
    for _ in range(n):
        s = obj({"a": s}, ["a"])
    return s


@pytest.mark.parametrize("schema, message", [
    (_deep(60), "deeper"),
    (obj({"e": {"enum": list(range(30_000))}}), "too large"),
    (obj({f"k{i}": {"type": "string", "maxLength": i % 7} for i in range(5_000)}), "too large|rules"),
    (obj({"xs": {"type": "array", "minItems": 10**9}}), "minItems"),
    (obj({"s": {"type": "string", "minLength": 10**9}}), "minLength"),
    (obj({"x": {"allOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "uuid"}]}}), "combine"),
    ({"$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}]}}, **obj({"a": {"$ref": "#/$defs/A"}})}, "deeper"),
    (obj({"a": {"anyOf": [{"$ref": "#/properties/a"}]}}, ["a"]), "nothing matches"),
    ({"$ref": "#"}, "nothing matches"),
])
def test_hostile_schemas_are_refused_quickly(setup, schema, message):
    t0 = time.monotonic()
    with pytest.raises(InputError, match=message):
        setup[1].tool_call([tool("f", schema)])
    assert time.monotonic() - t0 < 10


def test_wide_but_reasonable_schema_compiles(setup):
    schema = obj({f"k{i:03}": {"type": ["integer", "null"]} for i in range(300)},
                 [f"k{i:03}" for i in range(0, 300, 7)])
    t0 = time.monotonic()
    c = setup[1].tool_call([tool("f", schema)])
    assert time.monotonic() - t0 < 10
    args = {f"k{i:03}": i for i in range(0, 300, 7)}
    assert accepts(setup, c, render_tool_call("f", args))
