"""Tests for unigemma.processing.parse: thinking split, tool-call parsing, rendering.

Rendering is checked against the checkpoint chat templates in shared/fixtures, rendered
with jinja2 the way transformers does; round trips and stream/whole agreement are
property tests (hypothesis).
"""
import functools
import itertools
import json
import re
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from unigemma.processing.parse import (  # noqa: E402
    ParsedOutput, StreamParser, parse_output, parse_tool_call, render_tool_call,
    render_tool_response,
)

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "shared/fixtures/chat-templates"
TEMPLATES = sorted(TEMPLATE_DIR.glob("*.jinja"))
needs_templates = pytest.mark.skipif(
    not (TEMPLATE_DIR / "google-gemma-4-31B-it.jinja").exists(), reason="chat-template fixtures not found")
# database=None: no .hypothesis/ directory left in the repo
PROPS = settings(max_examples=200, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def canon(x) -> str:
    # Type-strict equality: 1 != 1.0 != True once dumped.
    return json.dumps(x, sort_keys=True, ensure_ascii=False)


def calls_of(out: ParsedOutput) -> list:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls]


def stream(text: str, cuts) -> ParsedOutput:
    parser, out = StreamParser(make_id=ids()), ParsedOutput()
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        out.extend(parser.feed(text[a:b]))
    out.extend(parser.finish())
    return out


@functools.lru_cache(maxsize=None)
def template(path: Path):
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    # transformers' tojson: no HTML escaping
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(path.read_text())


def model_turn(path: Path, assistant: dict, tool_messages=()) -> str:
    text = template(path).render(
        messages=[{"role": "user", "content": "hi"}, assistant, *tool_messages], bos_token="<bos>")
    return text.split("<|turn>model\n", 1)[1]


def assistant_with_calls(calls, **extra) -> dict:
    return {"role": "assistant", "content": "", **extra, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
        for i, (n, a) in enumerate(calls)]}


# ---- strategies: delimiter fragments mixed with arbitrary unicode
FRAGMENTS = ['<|"|>', "<|", "|>", '"|>', "<|\"", "{", "}", "[", "]", ",", ":", "<tool_call|>",
             "<|tool_call>", "<|channel>", "<channel|>", "thought\n", "\n", " ", "None", "true",
             "1e5", "call:", "é", "🙂", "\\", "'", '"']
texts = st.lists(st.sampled_from(FRAGMENTS) | st.characters(exclude_categories=("Cs",)),
                 max_size=10).map("".join)
# The two documented limits of the format (see parse.py docstring).
strings = texts.filter(lambda s: not re.search(r'<\|"\|>[,}\]]', s))
keys = (st.text(st.characters(exclude_characters="{}[],:<>", exclude_categories=("Cs",)), max_size=8)
        | st.sampled_from(["location", "unit", "A", "a", "_x", "Z9"])).filter(lambda k: k == k.strip())
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | strings)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4),
                      max_leaves=12)
arguments = st.dictionaries(keys, values, max_size=5)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,15}", fullmatch=True)
thoughts = st.builds(lambda r, label, closed: "<|channel>" + ("thought\n" if label else "") + r
                     + ("\n<channel|>" if closed else ""), texts, st.booleans(), st.booleans())
broken = st.sampled_from(["<|tool_call>call:f{a:}<tool_call|>", "<|tool_call>call:f{a:1", "<|tool_call>",
                          '<|tool_call>call:f{a:<|"|>x<|"|> }<tool_call|>', "<|tool_call>cal{}<tool_call|>",
                          "<|tool_call>call:f{a:1}x<tool_call|>", "<|tool_call>call:f{a<tool_call|>"])
outputs = st.lists(texts | thoughts | broken | st.builds(render_tool_call, names, arguments),
                   max_size=6).map("".join)


# ---- thinking
@pytest.mark.parametrize("text, reasoning, content", [
    ("Hello there.", "", "Hello there."),
    ("<|channel>thought\nLet me think.\n<channel|>The answer is 4.", "Let me think.", "The answer is 4."),
    ("<|channel>thought\n<channel|>Hi", "", "Hi"),                   # thinking off: empty block
    ("<|channel>thought\nstill going", "still going", ""),           # max tokens mid-thought
    ("<|channel>thought\nkeep\n\n<channel|>x", "keep\n", "x"),       # only one framing newline goes
    ("<|channel>no label<channel|>x", "no label", "x"),
    ("<|channel>thou", "thou", ""),
    ("a<channel|>b", "", "a<channel|>b"),                            # stray close is content
])
def test_thinking_split(text, reasoning, content):
    for out in (parse_output(text), stream(text, range(1, len(text)))):
        assert (out.reasoning, out.content, out.tool_calls, out.errors) == (reasoning, content, [], [])


def test_tool_call_inside_thought_is_reasoning():
    text = "<|channel>thought\nmaybe <|tool_call>call:f{}<tool_call|>\n<channel|>ok"
    out = parse_output(text)
    assert out.reasoning == "maybe <|tool_call>call:f{}<tool_call|>" and out.tool_calls == []


# ---- tool calls
def test_tool_calls_openai_shape_and_surrounding_text():
    text = ('<|channel>thought\nneed weather\n<channel|>Checking. '
            '<|tool_call>call:get_weather{location:<|"|>Paris, FR<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
            '<|tool_call>call:get_time{tz:<|"|>CET<|"|>}<tool_call|> done')
    out = parse_output(text)
    assert out.reasoning == "need weather" and out.content == "Checking.  done" and out.errors == []
    assert [c["type"] for c in out.tool_calls] == ["function", "function"]
    assert all(c["id"].startswith("call_") for c in out.tool_calls)
    assert out.tool_calls[0]["id"] != out.tool_calls[1]["id"]
    assert calls_of(out) == [("get_weather", {"location": "Paris, FR", "unit": "celsius"}),
                             ("get_time", {"tz": "CET"})]


def test_value_types():
    body = ('i:42,n:-7,f:-2.5e-07,e:1e+16,E:3E2,t:true,F:false,z:None,nul:null,word:celsius,'
            'nest:{a:[1,[2,{}],[]],b:{c:<|"|>d<|"|>}},s:<|"|>has <tool_call|>, {x}:y <|channel><|"|>,'
            '<|"|>quoted key<|"|>:1, sp : [ 1 , 2 ] ')
    (name, args), = calls_of(parse_output(f"<|tool_call>call:ns.tool-1{{{body}}}<tool_call|>"))
    assert name == "ns.tool-1"
    assert canon(args) == canon({
        "i": 42, "n": -7, "f": -2.5e-07, "e": 1e16, "E": 300.0, "t": True, "F": False, "z": None,
        "nul": None, "word": "celsius", "nest": {"a": [1, [2, {}], []], "b": {"c": "d"}},
        "s": "has <tool_call|>, {x}:y <|channel>", "quoted key": 1, "sp": [1, 2]})


@pytest.mark.parametrize("bad, why", [
    ("<|tool_call>call:f{a:}<tool_call|>", "missing value"),
    ("<|tool_call>call:f{a:1,}<tool_call|>", "unexpected"),
    ("<|tool_call>call:f{a:1}x<tool_call|>", "expected <tool_call|>"),
    ("<|tool_call>nope{}<tool_call|>", "expected 'call:'"),
    ("<|tool_call>call:{}<tool_call|>", "function name"),
    ("<|tool_call>call:f{a:<|\"|>never closed", "unterminated"),        # max tokens mid-call
    ("<|tool_call>call:f{a:" + "[" * 100 + "]" * 100 + "}<tool_call|>", "too deep"),
])
def test_malformed_call_kept_as_content_with_error(bad, why):
    text = f"before {bad} after <|tool_call>call:ok{{}}<tool_call|>"
    for out in (parse_output(text, make_id=ids()), stream(text, range(1, len(text), 3))):
        assert len(out.errors) == 1 and why in out.errors[0].message
        assert out.errors[0].text in out.content and out.content.startswith("before <|tool_call>")
        if "never closed" not in bad:  # a later good call is still found
            assert calls_of(out) == [("ok", {})] and out.content.endswith(" after ")


def test_string_with_quote_followed_by_structure_is_the_documented_limit():
    # '<|"|>' then ',' inside a string reads as the string's end; the call is reported, not raised.
    text = render_tool_call("f", {"x": 'a<|"|>,b'})
    with pytest.raises(ValueError):
        parse_tool_call(text)
    assert parse_output(text).errors and parse_tool_call(render_tool_call("f", {"x": 'a<|"|>b'})) \
        == ("f", {"x": 'a<|"|>b'})


# ---- rendering
def test_render_matches_template_conventions():
    assert render_tool_call("f", {"b": None, "a": 1e-5, "B": [True, -0.0], "c": {"y": "s"}}) == \
        '<|tool_call>call:f{a:1e-05,b:None,B:[true,-0.0],c:{y:<|"|>s<|"|>}}<tool_call|>'
    assert render_tool_call("f", '{"q": 1}') == render_tool_call("f", {"q": 1}) == \
        "<|tool_call>call:f{q:1}<tool_call|>"
    assert render_tool_response("f", "ok") == '<|tool_response>response:f{value:<|"|>ok<|"|>}<tool_response|>'


@needs_templates
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_render_equals_template_legacy_tool_responses(path):
    calls = [("get_weather", {"location": "Paris", "days": 3,
                              "opts": {"Units": "C", "alerts": [True, None]}}),
             ("noop", {})]
    responses = [{"name": "get_weather", "response": {"temp": 21.5, "sky": "clear"}},
                 {"name": "noop", "response": "done"}]
    turn = model_turn(path, assistant_with_calls(calls, tool_responses=responses))
    expected = "".join(render_tool_call(n, a) for n, a in calls) + \
        "".join(render_tool_response(r["name"], r["response"]) for r in responses)
    assert turn.startswith(expected)


@needs_templates
def test_render_equals_template_openai_tool_messages():
    path = TEMPLATE_DIR / "google-gemma-4-31B-it.jinja"
    tools = [{"role": "tool", "tool_call_id": "c0", "content": "sunny, 21°C"},
             {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": '{"t": 1}'}]}]
    turn = model_turn(path, assistant_with_calls([("a", {"x": 1}), ("b", {})]), tools)
    assert turn == render_tool_call("a", {"x": 1}) + render_tool_call("b", {}) + \
        render_tool_response("a", "sunny, 21°C") + render_tool_response("b", '{"t": 1}')


@needs_templates
def test_template_model_turn_parses_back():
    # A model turn written by the template (reasoning + calls) is exactly what we parse.
    path = TEMPLATE_DIR / "google-gemma-4-31B-it.jinja"
    calls = [("search", {"query": "gemma 4, unified", "k": 5}), ("open", {"url": "https://x.y/{z}"})]
    turn = model_turn(path, assistant_with_calls(calls, reasoning_content="Two steps.\nFirst search."))
    out = parse_output(turn.removesuffix("<|tool_response>"))
    assert out.reasoning == "Two steps.\nFirst search." and out.content == "" and out.errors == []
    assert canon(calls_of(out)) == canon(calls)


@needs_templates
@settings(PROPS, max_examples=80)
@given(names, arguments)
def test_render_equals_template_property(name, args):
    path = TEMPLATE_DIR / "google-gemma-4-31B-it.jinja"
    assert model_turn(path, assistant_with_calls([(name, args)])).startswith(render_tool_call(name, args))


# ---- round trip and streaming properties
@PROPS
@given(names, arguments)
def test_render_then_parse_is_identity(name, args):
    text = render_tool_call(name, args)
    got_name, got_args = parse_tool_call(text)
    assert got_name == name and canon(got_args) == canon(args)
    out = parse_output("x" + text + "y")
    assert out.content == "xy" and canon(calls_of(out)) == canon([(name, args)])


@PROPS
@given(outputs, st.data())
def test_stream_equals_whole_text(text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert stream(text, cuts) == parse_output(text, make_id=ids())


@PROPS
@given(outputs)
def test_stream_char_by_char_equals_whole_text(text):
    assert stream(text, range(1, len(text))) == parse_output(text, make_id=ids())


def test_stream_holds_split_delimiters():
    parser = StreamParser(make_id=ids())
    deltas = ["Hi <|cha", "nnel>thou", "ght\nhmm\n", "<chan", "nel|>ok <|tool", "_call>call:f{a:",
              "1}<tool_", "call|>"]
    d = [parser.feed(x) for x in deltas]
    assert [(x.reasoning, x.content) for x in d] == [
        ("", "Hi "), ("", ""), ("hmm", ""), ("", ""), ("", "ok "), ("", ""), ("", ""), ("", "")]
    assert calls_of(d[-1]) == [("f", {"a": 1})] and parser.finish() == ParsedOutput()
