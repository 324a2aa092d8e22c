"""Chat messages -> model inputs: render the checkpoint's chat template, expand media, tokenize.

`Processor(tokenizer)(messages, tools=..., enable_thinking=...)` returns a `ModelInputs`
(unigemma/inputs.py) holding exactly the tensors transformers'
`Gemma4UnifiedProcessor.apply_chat_template(..., tokenize=True)` returns, under the same keys:
`input_ids`, `attention_mask`, `mm_token_type_ids` (`MM_TYPE` codes) and, when present, the
image, audio and video parts. A batch of conversations is left-padded. Templates run in
Jinja's immutable sandbox with the globals and filters transformers gives them. Pixels and samples come from `image.py`, `audio.py` and `video.py`
(imported on first use); this file only decides how many placeholder tokens each item gets.
Before any of that work, `cost.py` prices the request from headers and character counts and
refuses (InputError) what cannot fit `max_len` or the per-request `Limits`.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import import_module
from typing import Any, Mapping

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from unigemma.errors import InputError, NoChatTemplate, UnigemmaError
from unigemma.inputs import MM_TYPE, AudioInputs, ImageInputs, ModelInputs, VideoInputs
from unigemma.processing import cost
from unigemma.processing.tokenizer import Tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")
# Part type -> the keys that may hold its source, in transformers' order of preference.
SOURCE_KEYS = {"image": ("image", "url", "path", "base64"), "audio": ("audio", "url", "path"),
               "video": ("video", "url", "path")}


# --- template environment ------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # Underscore attributes on a namespace are a path to CPython internals: refuse them.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _DictFactory:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '): chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox transformers uses (same globals, filters, flags)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace, dict=_DictFactory(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template does not compile: {e}") from e


# --- messages -------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaItem:
    kind: str  # "image" | "audio" | "video"
    source: Any  # whatever the loader accepts: path, URL, PIL image, array, clip...
    where: str  # "message 2, part 0", for error messages


def _plain(value: Any) -> Any:
    # Templates only see JSON-like data: media objects become "<TypeName>" (templates test
    # a key's presence, never its value), so no method of a rich object is reachable.
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, (list, tuple)):
        raise InputError(f"tools must be a list of function schemas, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type", "function") != "function":
            raise InputError(f"tool {i} is not {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"tool {i}: function has no name")
        if not isinstance(fn.get("description", ""), str):
            raise InputError(f"tool {i} ({fn['name']}): description must be a string")
        params = fn.get("parameters")
        if params is not None and not (isinstance(params, Mapping)
                                       and isinstance(params.get("properties", {}), Mapping)
                                       and all(isinstance(p, Mapping) for p in params.get("properties", {}).values())
                                       and isinstance(params.get("required", []), (list, tuple))):
            raise InputError(f"tool {i} ({fn['name']}): parameters must be a JSON schema object "
                             "with a 'properties' mapping of schemas and a 'required' list")
    return [dict(t) for t in tools]


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, (list, tuple)):
        raise InputError(f"{where}: tool_calls must be a list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"{where}, tool call {j}: needs {{'function': {{'name': ..., 'arguments': ...}}}}")
        if not isinstance(fn.get("arguments", {}), (Mapping, str)):
            raise InputError(f"{where}, tool call {j}: arguments must be a mapping or a string")


def normalize_messages(messages: Any) -> tuple[list[dict], list[MediaItem]]:
    """Validate one conversation; return it as the template will see it, plus its media in order.

    Follows transformers: keys whose value is None are dropped, OpenAI `image_url` parts
    become `image` parts, and `reasoning`/`thinking` is mirrored into `reasoning_content`.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out, media = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"message {i} is a {type(message).__name__}, not a dict")
        message = {k: v for k, v in message.items() if v is not None}
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if content is None and role in ("system", "developer", "user"):
            raise InputError(f"message {i} ({role}) has no content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise InputError(f"message {i}: content must be a string or a list of parts")
        if "tool_calls" in message:
            _check_tool_calls(message["tool_calls"], f"message {i}")
        parts = []
        for j, part in enumerate(content if isinstance(content, (list, tuple)) else ()):
            where = f"message {i}, part {j}"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image_url" and "image_url" in part:
                url = part["image_url"]
                part, kind = {"type": "image", "url": url.get("url", "") if isinstance(url, Mapping) else url}, "image"
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InputError(f"{where}: text part has no 'text' string")
            elif kind in SOURCE_KEYS:
                key = next((k for k in SOURCE_KEYS[kind] if part.get(k) is not None), None)
                if key is None:
                    raise InputError(f"{where}: {kind} part has none of {', '.join(SOURCE_KEYS[kind])}")
                media.append(MediaItem(kind, part[key], where))
            else:
                raise InputError(f"{where}: unknown part type {kind!r} (expected text, image, audio or video)")
            parts.append(part)
        if isinstance(content, (list, tuple)):
            message["content"] = parts
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(_plain(message))
    return out, media


def render(template: str, messages: list[dict], *, tools: list[dict] | None = None,
           add_generation_prompt: bool = True, special_tokens: Mapping[str, str] | None = None,
           **template_kwargs: Any) -> str:
    """Render already-normalized messages (see `normalize_messages`) with a chat template."""
    variables = {**(special_tokens or {}), **_plain(template_kwargs)}
    try:
        return compile_template(template).render(messages=messages, tools=_plain(tools), documents=None,
                                                 add_generation_prompt=add_generation_prompt, **variables)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise InputError(f"chat template failed: {type(e).__name__}: {e}") from e


# --- processor ------------------------------------------------------------------------
def _as_conversations(messages: Any) -> list:
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
        return list(messages)
    return [messages]


class Processor:
    """Messages (one conversation, or a list of them) -> the model's input tensors.

    `image_budget` is the per-image soft-token budget (70/140/280/560/1120), `video_budget`
    the per-frame one, `video_frames` the frames sampled per clip. `media` maps "image",
    "audio", "video" to modules with the interface of `unigemma.processing.image` etc.
    (the default); tests and alternative preprocessors pass their own.
    `max_len`: the context the prompt will run in (prompt + reply); a conversation whose
    prompt is sure to leave no room for a reply is refused before media are decoded or text
    tokenized (None: not checked here). `limits`: per-call media and tool limits (`cost.Limits`).
    """

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None, *, image_budget: int = 280,
                 video_budget: int = 70, video_frames: int = 32, media: Mapping[str, Any] | None = None,
                 max_len: int | None = None, limits: cost.Limits | None = None):
        self.tokenizer, self.chat_template = tokenizer, chat_template or tokenizer.chat_template
        self.image_budget, self.video_budget, self.video_frames = image_budget, video_budget, video_frames
        self.max_len, self.limits = max_len, limits or cost.Limits()
        self._media = dict(media or {})
        names = tokenizer.special_tokens_map
        self.token = {k: names.get(f"{k}_token") for k in ("image", "audio", "video", "boi", "eoi", "boa", "eoa")}
        self.type_of_id = {tokenizer.token_to_id(self.token[k]): t for k, t in MM_TYPE.items() if self.token[k]}

    def _module(self, kind: str):
        if kind not in self._media:
            self._media[kind] = import_module(f"unigemma.processing.{kind}")
        return self._media[kind]

    def render(self, messages: Any, tools: list[dict] | None = None, enable_thinking: bool = False,
               add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The prompt text of one conversation, before media expansion."""
        return self._render(normalize_messages(messages)[0], tools, enable_thinking, add_generation_prompt,
                            template_kwargs)

    def _render(self, messages, tools, enable_thinking, add_generation_prompt, template_kwargs) -> str:
        if not self.chat_template:
            raise NoChatTemplate(f"{self.tokenizer.name} has no chat template and its family publishes none: pass "
                                 "chat_template='path/to/template.jinja' to unigemma.load (--chat-template FILE on "
                                 "the command line); plain text continuation needs none (`unigemma run --raw`)")
        return render(self.chat_template, messages, tools=_check_tools(tools) if tools is not None else None,
                      add_generation_prompt=add_generation_prompt, special_tokens=self.tokenizer.special_tokens_map,
                      enable_thinking=enable_thinking, **template_kwargs)

    def __call__(self, messages: Any, tools: list[dict] | None = None, enable_thinking: bool = False,
                 add_generation_prompt: bool = True, **template_kwargs: Any) -> ModelInputs:
        cost.check_tools(tools, self.limits)  # before the template renders them
        prompts, media, costs = [], [], []
        longest = cost.longest_token_chars(self.tokenizer)
        for i, conversation in enumerate(_as_conversations(messages)):
            normalized, items = normalize_messages(conversation)
            costs.append(self.costs(items))
            cost.check_media([c for cs in costs for c in cs], self.limits)
            # user text reaches the prompt whatever the template: a 31 MB text stops here, unrendered
            cost.check_length(cost.user_text_chars(normalized), costs[-1], longest, self.max_len,
                              f"prompt of conversation {i}" if i else "prompt")
            prompts.append(self._render(normalized, tools, enable_thinking, add_generation_prompt, template_kwargs))
            media.append(items)
        return self.inputs_from_prompts(prompts, media, costs)

    def costs(self, items: list[MediaItem]) -> list[cost.MediaCost]:
        """Each item's soft tokens and decode cost, from its header (nothing is decoded)."""
        out = []
        for item in items:
            try:
                if item.kind == "image":
                    out.append(cost.image_cost(item.source, self.image_budget))
                elif item.kind == "audio":
                    out.append(cost.audio_cost(item.source))
                else:
                    out.append(cost.video_cost(item.source, self.video_frames, self.video_budget))
            except UnigemmaError as e:
                raise InputError(f"{item.where}: {e}") from e
            except (OSError, ValueError, TypeError) as e:
                raise InputError(f"{item.where}: cannot read the {item.kind}'s header: {type(e).__name__}: {e}") from e
        return out

    def _process(self, item: MediaItem):
        # Loader failures (missing file, bad bytes) are the caller's input errors.
        try:
            module = self._module(item.kind)
            if item.kind == "image":
                # preprocess_image takes the source itself (anything load_image takes) and decodes,
                # converts and resizes it band by band: no full-size RGB copy first
                return module.preprocess_image(item.source, max_soft_tokens=self.image_budget)
            if item.kind == "audio":
                return module.preprocess_audio(module.load_audio(item.source))
            clip = module.load_video(item.source, num_frames=self.video_frames, max_soft_tokens=self.video_budget)
            return module.preprocess_video(clip, max_soft_tokens=self.video_budget)
        except UnigemmaError as e:
            raise InputError(f"{item.where}: {e}") from e
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"{item.where}: cannot load {item.kind}: {type(e).__name__}: {e}") from e

    def _expansion(self, item: MediaItem, processed) -> str:
        t = self.token
        if item.kind == "image":
            return t["boi"] + t["image"] * int(processed.num_soft_tokens) + t["eoi"]
        if item.kind == "audio":
            return t["boa"] + t["audio"] * int(processed.num_soft_tokens) + t["eoa"]
        stamp = self._module("video").timestamp_text
        return " ".join(f"{stamp(s)} {t['boi']}{t['video'] * int(n)}{t['eoi']}"
                        for s, n in zip(processed.timestamps, processed.num_soft_tokens))

    def media_expansions(self, prompt: str, items: list[MediaItem]) -> tuple[dict, list[str]]:
        """For a rendered prompt whose own expansion is done elsewhere (fine-tuning labels it by
        character offsets): its placeholders checked against `items`, the items decoded →
        (the `ModelInputs` media parts, each item's soft-token text in item order)."""
        self._check_placeholders(prompt, items, 0)
        parts, done = self._decode_media([items])
        return parts, [self._expansion(item, p) for item, p in zip(items, done[0])]

    def _check_placeholders(self, prompt: str, items: list[MediaItem], index: int) -> None:
        for kind in MM_TYPE:
            found = prompt.count(self.token[kind]) if self.token[kind] else 0
            given = sum(item.kind == kind for item in items)
            if found != given:
                # Causes: a placeholder typed into text, a template that drops some message's
                # media (e.g. in a system turn), or a vocabulary without this modality.
                raise InputError(f"conversation {index}: the rendered prompt has {found} {kind} "
                                 f"placeholder(s) but {given} {kind} input(s) were given")

    def _expand(self, prompt: str, items: list[MediaItem], processed: list) -> str:
        # Placeholders are replaced in text order, each modality's items in message order.
        kinds = [k for k in MM_TYPE if self.token[k] and any(i.kind == k for i in items)]
        if not kinds:
            return prompt
        queues = {k: iter([self._expansion(i, p) for i, p in zip(items, processed) if i.kind == k]) for k in kinds}
        by_text = {self.token[k]: k for k in kinds}
        pattern = "|".join(re.escape(self.token[k]) for k in kinds)
        return re.sub(pattern, lambda m: next(queues[by_text[m.group(0)]]), prompt)

    def inputs_from_prompts(self, prompts: list[str], media: list[list[MediaItem]],
                            costs: list[list[cost.MediaCost]] | None = None) -> ModelInputs:
        """Rendered prompts + their media items (in prompt order) -> padded model inputs."""
        for i, (prompt, items) in enumerate(zip(prompts, media)):
            self._check_placeholders(prompt, items, i)  # before any media is decoded
        if costs is None:
            costs = [self.costs(items) for items in media]
            cost.check_media([c for cs in costs for c in cs], self.limits)
        longest = cost.longest_token_chars(self.tokenizer)
        for i, (prompt, cs) in enumerate(zip(prompts, costs)):
            # The rendered text without its placeholders (each becomes its item's tokens): exact
            # characters now, so this bound holds for any template.
            marks = sum(prompt.count(self.token[k]) * len(self.token[k]) for k in MM_TYPE if self.token[k])
            cost.check_length(len(prompt) - marks, cs, longest, self.max_len,
                              f"prompt of conversation {i}" if i else "prompt")
        parts, counts = self._decode_media(media)
        texts = [self._expand(p, items, done) for p, items, done in zip(prompts, media, counts)]
        bos = self.tokenizer.special_tokens_map.get("bos_token")
        # A template that writes <bos> itself must not get a second one (transformers' rule).
        ids = [self.tokenizer.encode(t, add_special_tokens=not (bos and t.startswith(bos))) for t in texts]
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_ids[0]
        length = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (length - len(x)) + x for x in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
        types = torch.zeros_like(input_ids)
        for token_id, value in self.type_of_id.items():
            types[input_ids == token_id] = value
        return ModelInputs(input_ids, mask, types, **parts)

    def _decode_media(self, media: list[list[MediaItem]]) -> tuple[dict, list[list]]:
        """The media parts of `ModelInputs`, and what `_expand` needs of each item. Image pixels
        go straight into one preallocated batch: the peak is that tensor plus one image in
        flight, not every image twice (kept, then stacked)."""
        out, done = {}, [[None] * len(items) for items in media]
        images = [(i, j) for i, items in enumerate(media) for j, item in enumerate(items) if item.kind == "image"]
        pixels = positions = None
        for k, (i, j) in enumerate(images):
            p = self._process(media[i][j])
            if pixels is None:
                pixels = p.pixel_values.new_empty((len(images), *p.pixel_values.shape))
                positions = p.position_ids.new_empty((len(images), *p.position_ids.shape))
            elif p.pixel_values.shape != pixels.shape[1:]:
                raise InputError("images of one request must share a soft-token budget")
            pixels[k], positions[k] = p.pixel_values, p.position_ids
            done[i][j] = _Counted(p.num_soft_tokens)  # the expansion needs the count only
            del p
        if images:
            out["image"] = ImageInputs(pixels, positions)
        for i, items in enumerate(media):
            for j, item in enumerate(items):
                if item.kind != "image":
                    done[i][j] = self._process(item)
        flat = [(item, p) for items, ps in zip(media, done) for item, p in zip(items, ps)]
        audios = [p for item, p in flat if item.kind == "audio"]
        videos = [p for item, p in flat if item.kind == "video"]
        if audios:
            out["audio"] = AudioInputs(*self._module("audio").batch_audio(audios))
        if videos:
            # Frames of all clips are concatenated; num_frames_per_video splits them again.
            # (one clip is taken as it is: cat would copy it)
            join = (lambda ts: torch.cat(ts)) if len(videos) > 1 else (lambda ts: ts[0])
            out["video"] = VideoInputs(join([torch.as_tensor(v.pixel_values) for v in videos]),
                                       join([torch.as_tensor(v.position_ids) for v in videos]),
                                       torch.tensor([len(v.num_soft_tokens) for v in videos], dtype=torch.long))
        return out, done


@dataclass(frozen=True)
class _Counted:
    num_soft_tokens: int  # what is left of a processed image once its pixels are in the batch
