r"""JSON schema of a tool's `parameters` -> llguidance lark rules for Gemma 4's argument object.

    rules = ToolRules(quote_id)                       # quote_id: the `<|"|>` token
    call = rules.function("get_weather", params, "tools[0].function")   # a rule name
    lark = f"start: <[open]> {call} <[close]>\n" + rules.text()

A call is `call:NAME{key:VALUE,...}` (processing/parse.py reads it back): strings are raw
between two `<|"|>` special tokens (no escapes; a string may not contain the text `<|"|>`,
which would end it), objects are `{k:v,...}` with bare keys in Jinja `dictsort` order (keys
that cannot be bare are `<|"|>`-quoted), arrays `[v,...]`, `true`/`false`, `null` or `None`,
numbers as JSON writes them (bounded ones through llguidance's `%json`, whose number syntax is
Gemma's). Every generated call parses back to arguments valid under the schema, except as noted.

Supported: type (one or a list), properties / required (optional keys in O(n) rules),
additionalProperties (false or absent beside properties: only declared keys; true, a schema,
or an object without properties: free bare keys too, after the declared ones), items /
prefixItems / minItems / maxItems, enum / const (any JSON values), anyOf, oneOf (as anyOf: a
value matching two branches is possible), allOf and $ref with siblings (simple merges only:
keys that differ between parts must be properties/required/bounds/types), $ref to `#`,
`#/$defs/...`, `#/definitions/...` (recursion allowed; parse.py refuses nesting past 64),
minLength / maxLength / pattern (Rust regex syntax, lookarounds refused), format (date, time,
date-time, uuid, ipv4, email enforced; other formats ignored: they are annotations in draft
2020-12, and pydantic emits uri, binary, password, ...), minimum / maximum / exclusive* /
multipleOf (via %json; an open side is closed at +-1e15, +-1e18 for integers, so the number
reads back finite).

Other keywords are refused (400 naming the keyword and where it is) or ignored as
llguidance's own JSON-schema compiler does: annotations (title, description, default,
examples, $schema, $id, $comment, readOnly, writeOnly, deprecated, content*) and keys that are
no JSON-schema keyword (x-*, discriminator, nullable) are ignored; the JSON-schema keywords it
refuses (not, if/then/else, uniqueItems, contains, propertyNames, dependent*, unevaluated*,
dynamic refs) are refused, and so are patternProperties and min/maxProperties, which it
supports only in part (see `REFUSED`).

A client's schema is hostile: nesting, visited nodes, rules, repetition counts, string
lengths and the grammar's size are capped (InputError, a 400) before llguidance sees it; a
maxItems / maxLength above the caps is not enforced (the reply's max_tokens bounds it).

Known gaps: a recursive schema can nest past parse.py's limit of 64 (read back as a malformed
call); oneOf is anyOf; a required recursive object with no way out compiles but cannot finish.
A JSON reply beside tools (`tool_or_json`) is llguidance's JSON: its strings could spell a call.
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import unquote

import llguidance

from ..errors import InputError
from ..processing.parse import MAX_DEPTH as PARSE_DEPTH
from ..processing.parse import QUOTE

MAX_DEPTH = 24  # schema nesting below one tool's parameters
MAX_NODES = 20_000  # schema nodes and enum values visited, all tools together
MAX_RULES = 4_000  # lark rules and terminals, all tools together
MAX_REPEAT = 10_000  # minItems / maxItems enforced (a repeat count: cheap in llguidance)
MAX_LENGTH = 100_000  # minLength / maxLength enforced (a counted regex: cheap too)
MAX_PREFIX = 256  # prefixItems, each its own expression
MAX_GRAMMAR = 2 << 20  # characters of lark text
FREE_DEPTH = 3  # nesting of the values a schema leaves free (`{}`, `true`, additionalProperties)

ANNOTATIONS = {"$schema", "$id", "id", "$anchor", "$comment", "$defs", "definitions", "title", "description",
               "default", "examples", "readOnly", "writeOnly", "deprecated", "contentMediaType",
               "contentEncoding", "contentSchema", "$vocabulary"}
REFUSED = {"not", "if", "then", "else", "uniqueItems", "contains", "minContains", "maxContains",
           "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired",
           "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef",
           "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor"}
_VALUE_KEYS = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
               "additionalProperties", "items", "prefixItems", "additionalItems", "minItems", "maxItems",
               "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
               "exclusiveMaximum", "multipleOf"}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")

# strings never contain the text of the quote token: parse.py would end the string there
_NO_QUOTE = r'~/(?s:.*)<\|"\|>(?s:.*)/'
_INTEGER = r"/-?(0|[1-9][0-9]{0,17})/"
_NUMBER = r"/-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,16})?([eE][-+]?[0-9]{1,2})?/"
_BARE_KEY = r"/[A-Za-z_][A-Za-z0-9_]{0,63}/"  # a free key the model writes
_FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "date-time": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                 r"(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    "email": r"[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(\.[A-Za-z0-9\-]{1,63}){0,8}",
}
_NOT_BARE = re.compile(r"[{}\[\],:<>]")
_NAME = re.compile(r"[^{}\[\],<>\s\"]+")  # what parse.py reads as a function name
_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")
_CONTROL = re.compile("[\x7f-\x9f\u2028\u2029]")


def _lit(text: str) -> str:
    """A lark string literal (JSON's escapes are lark's; lark's lexer refuses a raw DEL)."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


def regex_escape(text: str) -> str:
    """`text` matched literally inside a lark /.../ regex."""
    return "".join("\\" + c if c in _REGEX_META else f"\\x{{{ord(c):X}}}" if c < " " or _CONTROL.match(c) else c
                   for c in text)


def _regex_body(pattern: str) -> str:
    """A JSON-schema pattern as the inside of a lark /.../: `/` and raw newlines escaped."""
    out, escaped = [], False
    for c in pattern:
        if escaped:
            out.append(c)
            escaped = False
        elif c == "\\":
            out.append(c)
            escaped = True
        else:
            out.append({"/": r"\/", "\n": r"\n", "\r": r"\r"}.get(c, c))
    if escaped:
        out.append("\\")
    return "".join(out)


def is_bare_key(key: str) -> bool:
    """A key parse.py reads back unchanged when written bare."""
    return bool(key) and key == key.strip() and not _NOT_BARE.search(key)


def check_name(name, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or QUOTE in name:
        raise InputError(f"{where}.name {name!r} cannot be written in a Gemma tool call "
                         "(no whitespace, quotes or any of {}[],<>)")
    return name


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _alt(alts: list[str]) -> str | None:
    alts = list(dict.fromkeys(alts))
    if not alts:
        return None
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


class ToolRules:
    """Lark rules for the arguments of one request's tools; `text()` is all of them."""

    def __init__(self, quote_id: int):
        self.q = f"<[{quote_id}]>"
        self.lines: list[str] = []
        self.nodes = self.chars = 0
        self.root, self.root_id = {}, 0
        self.refs: dict[tuple, str] = {}
        self.terminals: dict[str, str] = {}
        self.free: dict[int, str] = {}
        self.free_objects: dict[int, str] = {}
        self.names = 0

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def function(self, name: str, parameters, where: str) -> str:
        """A rule for `call:NAME{...}` with arguments valid under `parameters` (None: no arguments)."""
        check_name(name, where)
        self.root_id += 1
        self.root = parameters if parameters is not None else {}
        where = f"{where}.parameters"
        if parameters is None:
            body = '"{}"'
        else:
            body = self.value(parameters, where, 0, only_object=True)
            if body is None:
                raise InputError(f"{where}: no object matches this schema")
        return self._rule(f"{_lit('call:' + name)} {body}")

    # -- bookkeeping ----------------------------------------------------------------------
    def _tick(self, where: str, depth: int, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise InputError(f"{where}: the tools' schemas are too large to constrain (over {MAX_NODES} nodes)")
        if depth > MAX_DEPTH:
            raise InputError(f"{where}: the schema nests deeper than {MAX_DEPTH} levels")

    def _emit(self, name: str, body: str) -> None:
        self.lines.append(f"{name}: {body}")
        self.chars += len(name) + len(body) + 3
        if len(self.lines) > MAX_RULES or self.chars > MAX_GRAMMAR:
            raise InputError(f"the tools' schemas need a grammar over {MAX_RULES} rules or {MAX_GRAMMAR} "
                             "characters; simplify them")

    def _name(self, kind: str) -> str:
        self.names += 1
        return f"{kind}{self.names}"

    def _rule(self, body: str) -> str:
        name = self._name("r")
        self._emit(name, body)
        return name

    def _terminal(self, body: str) -> str:
        if body not in self.terminals:
            self.terminals[body] = name = self._name("T")
            self._emit(name, body)
        return self.terminals[body]

    # -- schemas --------------------------------------------------------------------------
    def value(self, s, where: str, depth: int, only_object: bool = False) -> str | None:
        """A lark expression for one value valid under schema `s`; None when nothing is."""
        self._tick(where, depth)
        if s is False:
            return None
        if s is not True and not isinstance(s, dict):
            raise InputError(f"{where}: a schema must be an object or a boolean, got {type(s).__name__}")
        for k in s if s is not True else ():
            if k in REFUSED:
                raise InputError(f"{where}.{k}: the JSON-schema keyword {k!r} is not supported in tool parameters")
        if s is True or not any(k in _VALUE_KEYS for k in s):  # only annotations: any value
            return self._free_object(FREE_DEPTH) if only_object else self._free(FREE_DEPTH)
        if "$ref" in s:
            rest = {k: v for k, v in s.items() if k != "$ref"}
            if not any(k in _VALUE_KEYS for k in rest):
                return self._ref(s["$ref"], where, depth, only_object)
            return self.value(self._merge([self._resolve(s["$ref"], where), rest], where, depth),
                              where, depth + 1, only_object)
        if "allOf" in s:
            parts = s["allOf"]
            if not isinstance(parts, list) or not parts:
                raise InputError(f"{where}.allOf must be a non-empty array")
            rest = {k: v for k, v in s.items() if k != "allOf"}
            return self.value(self._merge([rest, *parts], f"{where}.allOf", depth), where, depth + 1, only_object)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self._any_of(s, key, where, depth, only_object)
        types = self._types(s, where)
        if only_object:
            types = [t for t in types if t == "object"]
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list):
                raise InputError(f"{where}.enum must be an array")
            self._tick(where, depth, len(values))
            ok = [v for v in values if _json_type(v) in types or (_json_type(v) == "integer" and "number" in types)]
            return _alt([self.literal(v, f"{where}.enum") for v in ok])
        return _alt([a for t in types if (a := self._typed(t, s, f"{where}", depth)) is not None])

    def _types(self, s: dict, where: str) -> list[str]:
        t = s.get("type")
        if t is None:  # no type: any, narrowed by the keywords present (a valid choice for each)
            if any(k in s for k in ("properties", "required", "additionalProperties")):
                return ["object"]
            if any(k in s for k in ("items", "prefixItems", "minItems", "maxItems")):
                return ["array"]
            if any(k in s for k in ("minLength", "maxLength", "pattern", "format")):
                return ["string"]
            if any(k in s for k in _BOUNDS):
                return ["number"]
            return list(_TYPES)
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not all(isinstance(x, str) for x in types):
            raise InputError(f"{where}.type must be a string or an array of strings")
        for x in types:
            if x not in _TYPES:
                raise InputError(f"{where}.type: unknown type {x!r}")
        if "integer" in types and "number" in types:
            types = [x for x in types if x != "integer"]
        return list(dict.fromkeys(types))

    def _typed(self, t: str, s: dict, where: str, depth: int) -> str | None:
        if t == "string":
            return self._string(s, where)
        if t in ("integer", "number"):
            return self._number(t, s, where)
        if t == "boolean":
            return '("true" | "false")'
        if t == "null":
            return '("null" | "None")'
        if t == "array":
            return self._array(s, where, depth)
        return self._object(s, where, depth)

    def _any_of(self, s: dict, key: str, where: str, depth: int, only_object: bool) -> str | None:
        branches = s[key]
        if not isinstance(branches, list) or not branches:
            raise InputError(f"{where}.{key} must be a non-empty array")
        rest = {k: v for k, v in s.items() if k != key}
        constrained = any(k in _VALUE_KEYS for k in rest)
        alts = []
        for i, b in enumerate(branches):
            w = f"{where}.{key}[{i}]"
            a = self.value(self._merge([rest, b], w, depth) if constrained else b, w, depth + 1, only_object)
            if a is not None:
                alts.append(a)
        return _alt(alts)

    # -- $ref and merges ------------------------------------------------------------------
    def _resolve(self, ref, where: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise InputError(f"{where}.$ref: only local references ('#/$defs/...') are supported, got {ref!r}")
        node = self.root
        for part in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise InputError(f"{where}.$ref: {ref!r} points at nothing")
        return node

    def _ref(self, ref, where: str, depth: int, only_object: bool) -> str | None:
        key = (self.root_id, ref, only_object)
        if key not in self.refs:
            target = self._resolve(ref, where)
            self.refs[key] = name = self._name("d")
            body = self.value(target, f"{where}.$ref({ref})", depth + 1, only_object)
            if body is None or body == name:  # `d: d` derives no value
                raise InputError(f"{where}.$ref: nothing matches {ref!r}")
            self._emit(name, body)
        return self.refs[key]

    def _merge(self, parts: list, where: str, depth: int):
        """allOf / $ref with siblings: one schema that the parts' intersection is, for simple parts."""
        out: dict = {}
        for p in parts:
            self._tick(where, depth)
            if p is True:
                continue
            if p is False:
                return False
            if not isinstance(p, dict):
                raise InputError(f"{where}: a schema must be an object or a boolean")
            if "$ref" in p:
                p = self._merge([self._resolve(p["$ref"], where), {k: v for k, v in p.items() if k != "$ref"}],
                                where, depth + 1)
            if isinstance(p, dict) and "allOf" in p:
                p = self._merge([{k: v for k, v in p.items() if k != "allOf"}, *p["allOf"]], where, depth + 1)
            if p is False:
                return False
            for k, v in p.items():
                if k in ANNOTATIONS or k not in _VALUE_KEYS:
                    continue
                if k not in out:
                    out[k] = v
                elif out[k] == v:
                    continue
                elif k == "properties" and isinstance(v, dict) and isinstance(out[k], dict):
                    merged = dict(out[k])
                    for name, sub in v.items():
                        merged[name] = {"allOf": [merged[name], sub]} if name in merged else sub
                    out[k] = merged
                elif k == "required" and isinstance(v, list) and isinstance(out[k], list):
                    out[k] = list(dict.fromkeys(out[k] + v))
                elif k == "type":
                    a, b = self._types({"type": out[k]}, where), self._types({"type": v}, where)
                    both = [t for t in a if t in b or (t == "integer" and "number" in b)]
                    both += [t for t in b if t == "integer" and "number" in a and t not in both]
                    if not both:
                        return False
                    out[k] = both
                elif k in ("minimum", "minLength", "minItems", "exclusiveMinimum") and not isinstance(v, bool):
                    out[k] = max(out[k], v)
                elif k in ("maximum", "maxLength", "maxItems", "exclusiveMaximum") and not isinstance(v, bool):
                    out[k] = min(out[k], v)
                elif k in ("items", "additionalProperties") and isinstance(v, dict) and isinstance(out[k], dict):
                    out[k] = {"allOf": [out[k], v]}
                else:
                    raise InputError(f"{where}: cannot combine two different {k!r} (allOf / $ref siblings)")
        return out

    # -- literals and scalars -------------------------------------------------------------
    def literal(self, v, where: str) -> str:
        """The exact text `v` renders to (parse.py's `render_value`), as a lark expression."""
        if isinstance(v, str):
            if QUOTE in v:
                raise InputError(f"{where}: a string containing {QUOTE!r} cannot be written in a Gemma tool call")
            return f"{self.q} {_lit(v)} {self.q}" if v else f"{self.q} {self.q}"
        if v is None:
            return '"null"'
        if isinstance(v, bool):
            return '"true"' if v else '"false"'
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"{where}: {v} is not a JSON number")
            return _lit(str(v))
        if isinstance(v, list):
            items = [self.literal(x, where) for x in v]
            return '"[" ' + ' "," '.join(items) + ' "]"' if items else '"[]"'
        if isinstance(v, dict):
            pairs = [f"{self._key(k, where)} {self.literal(x, where)}"
                     for k, x in sorted(v.items(), key=lambda kv: kv[0].lower())]  # dictsort
            return '"{" ' + ' "," '.join(pairs) + ' "}"' if pairs else '"{}"'
        raise InputError(f"{where}: {type(v).__name__} is not a JSON value")

    def _key(self, key: str, where: str) -> str:
        """`key:` written bare when parse.py reads it back unchanged, else between quotes."""
        if is_bare_key(key):
            return _lit(key + ":")
        if QUOTE in key:
            raise InputError(f"{where}: the key {key!r} contains {QUOTE!r} and cannot be written in a Gemma tool call")
        return f"{self.q} {_lit(key)} {self.q} \":\"" if key else f'{self.q} {self.q} ":"'

    def _string(self, s: dict, where: str) -> str | None:
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        for name, v in (("minLength", lo), ("maxLength", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(f"{where}.{name} must be a non-negative integer")
        if lo > MAX_LENGTH:
            raise InputError(f"{where}.minLength: at most {MAX_LENGTH} can be enforced")
        if hi is not None and hi < lo:
            return None
        hi = None if hi is not None and hi > MAX_LENGTH else hi
        parts = [f"/(?s:.{{{lo},{'' if hi is None else hi}}})/" if lo or hi is not None else "/(?s:.*)/"]
        if "pattern" in s:
            parts.append(f"/{self._pattern(s['pattern'], where)}/")
        fmt = s.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise InputError(f"{where}.format must be a string")
        if fmt in _FORMATS:
            parts.append(f"/{_FORMATS[fmt]}/")
        parts.append(_NO_QUOTE)
        text = self._terminal(" & ".join(parts))
        return f"{self.q} {text} {self.q}"

    def _pattern(self, p, where: str) -> str:
        if not isinstance(p, str):
            raise InputError(f"{where}.pattern must be a string")
        body = p[1:] if p.startswith("^") else p
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        regex = ("" if p.startswith("^") else "(?s:.*)") + f"({_regex_body(body)})" + \
            ("" if len(body) < len(p) - p.startswith("^") else "(?s:.*)")
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(f"start: /{regex}/\n"))
        if error:
            raise InputError(f"{where}.pattern {p[:80]!r} is not a usable regex: {error.splitlines()[0][:200]}")
        return regex

    def _number(self, t: str, s: dict, where: str) -> str:
        bounds = {k: s[k] for k in _BOUNDS if k in s}
        for k, v in bounds.items():
            draft4 = k.startswith("exclusive") and isinstance(v, bool)
            if not draft4 and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise InputError(f"{where}.{k} must be a finite number")
        if not bounds:
            return self._terminal(_INTEGER if t == "integer" else _NUMBER)
        # close an open side so the number reads back finite (and as an int, not a long string)
        big = 10 ** 18 if t == "integer" else 1e15
        if not any(isinstance(bounds.get(k), (int, float)) and not isinstance(bounds.get(k), bool)
                   for k in ("minimum", "exclusiveMinimum")):
            bounds["minimum"] = -big
        if not any(isinstance(bounds.get(k), (int, float)) and not isinstance(bounds.get(k), bool)
                   for k in ("maximum", "exclusiveMaximum")):
            bounds["maximum"] = big
        return "%json " + json.dumps({"type": t, **bounds})

    # -- containers -----------------------------------------------------------------------
    def _array(self, s: dict, where: str, depth: int) -> str | None:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        for name, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(f"{where}.{name} must be a non-negative integer")
        if lo > MAX_REPEAT:
            raise InputError(f"{where}.minItems: at most {MAX_REPEAT} can be enforced")
        hi = None if hi is not None and hi > MAX_REPEAT else hi
        if hi is not None and hi < lo:
            return None
        if hi == 0:
            return '"[]"'
        items, prefix = s.get("items", True), s.get("prefixItems", [])
        if isinstance(items, list):  # draft 4-7 tuple form
            items, prefix = s.get("additionalItems", True), items
        if not isinstance(prefix, list):
            raise InputError(f"{where}.prefixItems must be an array")
        if len(prefix) > MAX_PREFIX:
            raise InputError(f"{where}.prefixItems: at most {MAX_PREFIX} items")
        firsts = []
        for i, p in enumerate(prefix[:hi] if hi is not None else prefix):
            firsts.append(self.value(p, f"{where}.prefixItems[{i}]", depth + 1))
        rest = self.value(items, f"{where}.items", depth + 1)
        # the items after the prefix: how many more are needed and allowed
        k = len(firsts)
        more_lo = max(0, lo - k)
        more_hi = None if hi is None else max(0, hi - k)
        if rest is None or more_hi == 0:
            if more_lo:
                return None
            tail = ""
        else:
            if more_lo and any(f is None for f in firsts):
                return None
            tail = f'("," {rest}){{{more_lo},{"" if more_hi is None else more_hi}}}'
        # prefix items i >= lo are optional, each only after the one before it
        seq = tail
        for i in range(k - 1, -1, -1):
            sep = '"," ' if i else ""
            if firsts[i] is None:
                if i < lo:
                    return None
                seq = ""
                continue
            step = f"{sep}{firsts[i]} {seq}".strip()
            seq = step if i < lo else f"({step})?"
        if k == 0:  # no prefix: the first item has no comma before it
            if rest is None:
                return '"[]"' if lo == 0 else None
            first_lo, first_hi = max(0, lo - 1), None if hi is None else hi - 1
            body = f'{rest} ("," {rest}){{{first_lo},{"" if first_hi is None else first_hi}}}'
            return self._rule(f'"[" {body} "]"' if lo else f'"[" ({body})? "]"')
        return self._rule(f'"[" {seq} "]"')

    def _object(self, s: dict, where: str, depth: int) -> str | None:
        props = s.get("properties", {})
        required = s.get("required", [])
        extra = s.get("additionalProperties", None if props else True)
        if not isinstance(props, dict):
            raise InputError(f"{where}.properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise InputError(f"{where}.required must be an array of strings")
        keys = dict(props)
        for r in required:  # required but not declared: a value valid under additionalProperties
            if r not in keys:
                if extra is False:
                    return None
                keys[r] = extra if isinstance(extra, dict) else True
        # (key text, value expr, required), in the order Jinja's dictsort writes them
        entries = []
        for key in sorted(keys, key=str.lower):
            w = f"{where}.properties.{key}"
            v = self.value(keys[key], w, depth + 1)
            if v is None:
                if key in required:
                    return None
                continue
            entries.append((f"{self._key(key, w)} {v}", key in required))
        free = None
        if extra not in (None, False):
            v = self.value(extra, f"{where}.additionalProperties", depth + 1)
            if v is not None:
                free = self._free_pair(v, [k for k in keys if is_bare_key(k)])
        return self._rule('"{" ' + self._pairs(entries, free) + ' "}"')

    def _pairs(self, entries: list[tuple[str, bool]], free: str | None) -> str:
        """Key/value pairs in order, optional ones skippable, a comma between any two, in O(n)
        rules: after = the pairs from i on once one was written (each after a comma), first =
        the pairs from i on when none was yet. "" stands for the empty sequence."""
        after = f'("," {free})*' if free else ""
        first = f"({free} {after})?" if free else ""
        for pair, needed in reversed(entries):
            with_comma, alone = f'"," {pair} {after}'.strip(), f"{pair} {after}".strip()
            if needed:
                after, first = self._rule(with_comma), self._rule(alone)
            else:  # skipping this key leaves the later ones as they were
                after = self._rule(f"({with_comma} | {after})" if after else f"({with_comma})?")
                first = self._rule(f"({alone} | {first})" if first else f"({alone})?")
        return first

    def _free_pair(self, value: str, declared: list[str]) -> str:
        key = _BARE_KEY
        if declared:
            key += " & ~/(" + "|".join(regex_escape(k) for k in declared) + ")/"
        return f'{self._terminal(key)} ":" {value}'

    # -- values a schema leaves free ------------------------------------------------------
    def _free(self, depth: int) -> str:
        """Any value, nested at most `depth` more levels (parse.py's limit is far above)."""
        assert depth < PARSE_DEPTH
        if depth not in self.free:
            scalars = [self._string({}, "free"), self._terminal(_NUMBER), '"true"', '"false"', '"null"']
            alts = scalars
            if depth > 0:
                inner = self._free(depth - 1)
                alts = scalars + [f'"[" ({inner} ("," {inner})*)? "]"', self._free_object(depth)]
            self.free[depth] = self._rule(" | ".join(alts))
        return self.free[depth]

    def _free_object(self, depth: int) -> str:
        if depth not in self.free_objects:
            pair = self._free_pair(self._free(max(depth - 1, 0)), [])
            self.free_objects[depth] = self._rule(f'"{{" ({pair} ("," {pair})*)? "}}"')
        return self.free_objects[depth]
