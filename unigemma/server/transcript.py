"""A transcription's answer, from its segments' replies: the joined text and OpenAI's bodies.

json (`text`, token `usage`, `logprobs` on request), text, srt, vtt, verbose_json (segments
with their start and end, avg_logprob, compression_ratio, no_speech_prob as Whisper defines
them, or their nearest analogue), and the stream's `transcript.text.delta` ...
`transcript.text.done` events, with segments that ran side by side put back in order. The
types are the openai SDK's (`openai/types/audio/`). Nothing here decodes or submits.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import respond
from .convert import finite
from .sse import sse

if TYPE_CHECKING:
    from .transcribe import Job, Task

_ENGLISH_MARK = re.compile(r"(?:^|\n)\s*English:[ \t]*")  # speech translation: the answer follows it


@dataclass
class Segment:
    """What one segment's request produced."""
    start: float
    end: float
    audio_tokens: int
    pieces: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every sampled token, the stop token included
    logprobs: list[dict] = field(default_factory=list)
    finish: str | None = None

    def absorb(self, delta) -> None:
        self.pieces.append(delta.content)
        self.ids += delta.token_ids
        self.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason


def answer_text(reply: str, translate: bool) -> str:
    """A segment's text from its reply; a speech translation's is what follows 'English: '
    (the model card's format puts the transcription before it), or the whole reply without it."""
    return (_ENGLISH_MARK.split(reply)[-1] if translate else reply).strip()


class Joiner:
    """Segment texts, fed piece by piece, out as deltas that add up to
    " ".join(each segment's text stripped, the empty ones left out)."""

    def __init__(self):
        self.any = self.open = False
        self.held = ""  # whitespace that shows only if more text follows in the segment

    def feed(self, piece: str) -> str:
        if not self.open:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.open, piece = True, (" " if self.any else "") + piece
        text = self.held + piece
        out = text.rstrip()
        self.held = text[len(out):]
        self.any |= bool(out)
        return out

    def end(self) -> None:
        self.open, self.held = False, ""


class InOrder:
    """Deltas of segments running side by side, released in segment order."""

    def __init__(self, n: int):
        self.waiting: list[list] = [[] for _ in range(n)]
        self.ended = [False] * n
        self.at = 0

    def push(self, i: int, delta) -> list:
        """What may go out now: deltas, and None where a segment ends."""
        self.waiting[i].append(delta)
        self.ended[i] |= delta.finish_reason is not None
        out = []
        while self.at < len(self.waiting):
            out += self.waiting[self.at]
            self.waiting[self.at] = []
            if not self.ended[self.at]:
                break
            out.append(None)
            self.at += 1
        return out

    def rest(self) -> list:
        out = []
        for i in range(self.at, len(self.waiting)):
            out += self.waiting[i] + [None]
        self.at = len(self.waiting)
        return out


class Result:
    """The segments' replies turned into OpenAI's pieces."""

    def __init__(self, served, task: Task, job: Job, segments: list[Segment], requests: list):
        self.task, self.job, self.segments = task, job, segments
        self.tokenizer, self.stops = served.gemma.tokenizer, served.gemma.engine.base_stop_ids
        self.prompt_tokens = sum(r.prompt_tokens for r in requests)

    def text_of(self, s: Segment) -> str:
        return answer_text("".join(s.pieces), self.task.translate)

    def text(self) -> str:
        return " ".join(t for t in map(self.text_of, self.segments) if t)

    def usage(self) -> dict:
        audio = sum(s.audio_tokens for s in self.segments)
        out = sum(len(s.ids) for s in self.segments)
        return {"type": "tokens", "input_tokens": self.prompt_tokens, "output_tokens": out,
                "total_tokens": self.prompt_tokens + out,
                "input_token_details": {"audio_tokens": audio, "text_tokens": self.prompt_tokens - audio}}

    def logprobs(self, entries: list[dict]) -> list[dict]:
        out = []
        for e in entries:
            if e["token_id"] not in self.stops:
                b = self.tokenizer.token_bytes(e["token_id"])
                out.append({"token": b.decode("utf-8", "replace"), "bytes": list(b), "logprob": finite(e["logprob"])})
        return out

    def verbose(self) -> dict:
        segments = []
        for i, s in enumerate(self.segments):
            text = self.text_of(s)
            kept = [t for t in s.ids if t not in self.stops]
            if self.task.translate and text != "".join(s.pieces).strip():  # the transcription went before it
                kept = self.tokenizer.encode(text, add_special_tokens=False)
            lps = [finite(e["logprob"]) for e in s.logprobs]
            first = s.logprobs[0] if s.logprobs else None
            # Whisper's no_speech_prob is P(<|nospeech|>) at the first step; Gemma's closest is P(stop at once)
            firsts = dict(first["top"]) | {first["token_id"]: first["logprob"]} if first else {}
            data = text.encode()
            segments.append({
                "id": i, "seek": round(s.start * 100), "start": s.start, "end": s.end, "text": text, "tokens": kept,
                "temperature": self.task.temperature, "avg_logprob": sum(lps) / len(lps) if lps else 0.0,
                "compression_ratio": len(data) / len(zlib.compress(data)),
                "no_speech_prob": min(1.0, float(sum(math.exp(lp) for t, lp in firsts.items() if t in self.stops)))})
        out = {"task": "translate" if self.task.translate else "transcribe",
               "language": "english" if self.task.translate else (self.task.language or "unknown").lower(),
               "duration": self.job.duration, "text": self.text(), "segments": segments}
        if not self.task.translate:
            out["usage"] = {"type": "duration", "seconds": self.job.duration}
        return out

    def subtitles(self, vtt: bool) -> str:
        cues = [(s.start, s.end, " ".join(self.text_of(s).split()).replace("-->", "->")) for s in self.segments]
        cues = [c for c in cues if c[2]]  # an empty cue would end the file early for some readers
        if vtt:
            return "WEBVTT\n\n" + "".join(f"{stamp(a, '.')} --> {stamp(b, '.')}\n{t}\n\n" for a, b, t in cues)
        return "".join(f"{k}\n{stamp(a, ',')} --> {stamp(b, ',')}\n{t}\n\n" for k, (a, b, t) in enumerate(cues, 1))

    def response(self):
        fmt = self.task.fmt
        if fmt == "text":
            return PlainTextResponse(self.text())
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(self.subtitles(fmt == "vtt"), media_type="text/vtt" if fmt == "vtt" else None)
        if fmt == "verbose_json":
            return self.verbose()
        if self.task.translate:
            return {"text": self.text()}
        out = {"text": self.text(), "usage": self.usage()}
        if self.task.logprobs:
            out["logprobs"] = self.logprobs([e for s in self.segments for e in s.logprobs])
        return out


def stamp(seconds: float, comma: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{comma}{ms:03d}"


async def collect(request: Request, requests: list, meter, segments: list[Segment]):
    """Every segment's whole reply; an error response when one failed."""
    async with respond.pumping(request, requests, meter) as pump:
        async for i, item in respond.items(pump, len(requests)):
            if isinstance(item, BaseException):
                status, body = respond.failure(item)
                return JSONResponse(body, status_code=status)
            segments[i].absorb(item)
    return None


def stream(request: Request, requests: list, meter, segments: list[Segment], result: Result):
    async def events():
        async with respond.pumping(request, requests, meter) as pump:
            order, joiner, held = InOrder(len(requests)), Joiner(), []

            def deltas(items):
                for d in items:
                    if d is None:
                        joiner.end()
                        continue
                    held.extend(d.logprobs)
                    if text := joiner.feed(d.content):
                        event = {"type": "transcript.text.delta", "delta": text}
                        if result.task.logprobs:
                            event["logprobs"] = result.logprobs(held)
                        held.clear()
                        yield sse(event)

            async for i, item in respond.items(pump, len(requests)):
                if isinstance(item, BaseException):
                    yield respond.sse_error(item)
                    return
                segments[i].absorb(item)
                for chunk in deltas(order.push(i, item)):
                    yield chunk
            for chunk in deltas(order.rest()):
                yield chunk
            done = {"type": "transcript.text.done", "text": result.text(), "usage": result.usage()}
            if result.task.logprobs:
                done["logprobs"] = result.logprobs([e for s in segments for e in s.logprobs])
            yield sse(done)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

