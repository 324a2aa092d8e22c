"""/v1/audio/transcriptions and /v1/audio/translations: OpenAI's audio API, answered by Gemma's ears.

The multipart upload (`file`: anything processing/audio.py decodes) is priced from its header
before any work, decoded on the media pool, and cut into segments of at most 30 s (less when
the context cannot hold 30 s of audio, 25 tokens a second, plus a reply), each cut at the
quietest 20 ms of its last second. Each segment is one scheduler request: the audio and the
model card's instruction (speech recognition, or speech translation into English), all
submitted together so the batcher runs them side by side; their texts are joined with spaces.
Greedy unless `temperature` says otherwise; thinking off.

The answer (transcript.py) follows the openai SDK's types: json, text, srt, vtt, verbose_json,
or with `stream` the `transcript.text.*` events. A refusal is a 400 naming the form field;
fields OpenAI has that are not implemented here (word timestamps, diarization,
chunking_strategy) are refused, not ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import numpy as np
from fastapi import Depends, FastAPI, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ContextTooLong, InputError
from ..processing import cost
from ..processing.audio import SAMPLES_PER_TOKEN, SAMPLING_RATE, load_audio
from . import transcript
from .languages import language_name
from .schema import ApiError

TOKENS_PER_SECOND = SAMPLING_RATE // SAMPLES_PER_TOKEN  # 25
SEGMENT_SECONDS = 30  # what the model was trained on per clip (the model card's limit)
CUT_WINDOW = SAMPLING_RATE  # a cut falls in the last second of a full segment...
CUT_FRAME = SAMPLING_RATE // 50  # ...at its quietest 20 ms
MAX_REPLY_TOKENS = 448  # per segment (Whisper's cap); 30 s of fast speech is ~150 tokens
NO_SPEECH_TOP = 5  # alternatives read at the first step for no_speech_prob
MAX_PROMPT_CHARS = 4096

_ASR_RULES = ("\n\nFollow these specific instructions for formatting the answer:\n"
              "* Only output the transcription, with no newlines.\n"
              "* When transcribing numbers, write the digits, i.e. write 1.7 and not one point seven, "
              "and write 3 instead of three.")


class _AudioForm(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown or unimplemented field is a 400 naming it

    file: UploadFile = Field(description="the audio: wav, mp3, flac, ogg, m4a, webm, ...")
    model: Optional[str] = None
    prompt: Optional[str] = Field(default=None, max_length=MAX_PROMPT_CHARS,
                                  description="context for the model: earlier text, names and terms to spell right")
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(default=0.0, ge=0, le=1, description="0: greedy")
    language: Optional[str] = Field(default=None, max_length=16,
                                    description="ISO-639-1 code of the spoken language (translations: extension)")


class TranscriptionForm(_AudioForm):
    stream: bool = False
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=list,
                                                                     alias="timestamp_granularities[]")
    include: list[Literal["logprobs"]] = Field(default_factory=list, alias="include[]")


class TranslationForm(_AudioForm):
    pass


@dataclass(frozen=True)
class Task:
    """What one request asks for, checked."""
    translate: bool
    fmt: str
    temperature: float
    language: str | None  # the spoken language's English name, when given
    prompt: str | None
    stream: bool = False
    logprobs: bool = False

    def instruction(self) -> str:
        """The model card's wording for speech recognition / speech translation."""
        spoken = self.language or "its original language"
        if self.translate and self.language != "English":
            text = (f"Transcribe the following speech segment in {spoken}, then translate it into English.\n"
                    f"When formatting the answer, first output the transcription in {spoken}, then one newline, "
                    "then output the string 'English: ', then the translation in English.")
        elif self.language:
            text = f"Transcribe the following speech segment in {spoken} into {spoken} text.{_ASR_RULES}"
        else:
            text = f"Transcribe the following speech segment in its original language.{_ASR_RULES}"
        if self.prompt:
            text += f"\n\nContext (earlier text, names and terms to spell as written; do not repeat it): {self.prompt}"
        return text

    def messages(self, samples: np.ndarray) -> list[dict]:
        # the audio first, then the instruction, as the model card's examples
        return [{"role": "user", "content": [{"type": "audio", "audio": samples},
                                             {"type": "text", "text": self.instruction()}]}]


@dataclass
class Job:
    """A decoded upload, cut into segments, each with its model inputs."""
    duration: float
    spans: list[tuple[int, int]]  # sample ranges at 16 kHz
    inputs: list
    reply_tokens: int


def _bad(message: str, param: str, code: str | None = None, too_long: bool = False) -> Exception:

    return ApiError(400, message, param=param, code="context_length_exceeded" if too_long else code)


def check(form: _AudioForm, translate: bool) -> Task:
    language = None
    if form.language is not None:
        language = language_name(form.language)
        if language is None:
            raise _bad(f"language: {form.language[:16]!r} is not an ISO-639-1 code (e.g. 'en', 'fr', 'zh')",
                       "language", "invalid_language")
    stream = getattr(form, "stream", False)
    granularities = set(getattr(form, "timestamp_granularities", ()))
    include = set(getattr(form, "include", ()))
    if "word" in granularities:
        raise _bad("timestamp_granularities[]: 'word' is not supported (the model gives no word timing); "
                   "'segment' is", "timestamp_granularities[]")
    if granularities and form.response_format != "verbose_json":
        raise _bad("timestamp_granularities[] needs response_format 'verbose_json'", "timestamp_granularities[]")
    if include and form.response_format != "json":
        raise _bad("include[]: logprobs come with response_format 'json' only", "include[]")
    if stream and form.response_format not in ("json", "text"):
        raise _bad(f"stream: a stream carries text events; response_format {form.response_format!r} "
                   "needs stream false", "stream")
    return Task(translate, form.response_format, form.temperature, language, form.prompt, stream, bool(include))


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise _bad(f"file: the upload is {upload.size:,} bytes; at most {max_bytes:,} are accepted", "file")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _bad(f"file: the upload is over {max_bytes:,} bytes", "file")
    if not data:
        raise _bad("file: the upload is empty", "file")
    return data


# -- decoding and cutting (on the media pool) ---------------------------------------------------
def split(samples: np.ndarray, max_samples: int) -> list[tuple[int, int]]:
    """Sample ranges of at most max_samples covering `samples`; each cut falls in the middle of
    the quietest CUT_FRAME of the last CUT_WINDOW before the limit, so words are rarely split."""
    spans, start, n = [], 0, len(samples)
    while n - start > max_samples:
        end = start + max_samples
        lo = max(start + max_samples // 2, end - CUT_WINDOW)
        frames = samples[lo : lo + (end - lo) // CUT_FRAME * CUT_FRAME].reshape(-1, CUT_FRAME)
        quiet = int(np.argmin(np.square(frames, dtype=np.float64).sum(1))) if len(frames) else None
        cut = end if quiet is None else lo + quiet * CUT_FRAME + CUT_FRAME // 2  # mid-frame
        spans.append((start, cut))
        start = cut
    spans.append((start, n))
    return spans


def prepare(served, data: bytes, task: Task) -> Job:
    """Price, decode, cut, and build each segment's inputs (a worker thread)."""
    processor = served.processor()
    max_len, reply = served.scheduler.max_len, min(served.config.max_tokens_default, MAX_REPLY_TOKENS)
    # the prompt around the audio: the inputs for one token of audio, less that token
    around = processor(task.messages(np.zeros(SAMPLES_PER_TOKEN, np.float32)))["input_ids"].shape[1] - 1
    per_segment = min(SEGMENT_SECONDS * TOKENS_PER_SECOND, max_len - around - reply)
    if per_segment < TOKENS_PER_SECOND:
        raise _bad(f"{'prompt' if task.prompt else 'file'}: this server's context ({max_len} tokens) leaves "
                   f"room for under 1 s of audio ({around} prompt tokens, {reply} for the reply)",
                   "prompt" if task.prompt else "file", too_long=True)
    # every segment waits in the scheduler's queue at first: more would be refused each time
    max_tokens = min(cost.MAX_MEDIA_TOKENS, served.scheduler.max_queue * per_segment)
    max_seconds = max_tokens / TOKENS_PER_SECOND
    try:
        priced = cost.audio_cost(data)  # from the header; refuses formats not accepted
        if priced.tokens is not None and priced.prompt_tokens - 2 > max_tokens:
            raise ContextTooLong(f"the audio is {priced.tokens / TOKENS_PER_SECOND:.1f} s long; "
                                 f"at most {max_seconds:g} s are accepted")
        samples = load_audio(data, max_seconds=max_seconds)
    except ContextTooLong as e:
        raise _bad(f"file: {e}", "file", too_long=True) from None
    except (InputError, OSError, ValueError, TypeError) as e:
        raise _bad(f"file: {str(e)[:300]}", "file", "invalid_audio") from None
    spans = split(samples, per_segment * SAMPLES_PER_TOKEN)
    inputs = [processor(task.messages(samples[a:b])) for a, b in spans]
    return Job(len(samples) / SAMPLING_RATE, spans, inputs, reply)


def submit(served, job: Job, task: Task, model: str | None = None) -> list:
    """All segments' requests at once, or none."""
    params = dataclasses.replace(served.gemma.default_params, temperature=task.temperature,
                                 max_tokens=job.reply_tokens, logprobs=True, top_logprobs=NO_SPEECH_TOP,
                                 stop=(), ignore_eos=False, min_tokens=0)
    requests = []
    try:
        for inputs in job.inputs:
            requests += served.submit(inputs, [params], [None], model)
    except BaseException:
        for r in requests:
            r.cancel()
        raise
    return requests


def register(app: FastAPI) -> None:
    served = app.state.served

    async def answer(request: Request, form: _AudioForm, translate: bool):
        model = served.check_model(form.model)
        if served.gemma.config.audio is None:
            raise _bad(f"model: {served.config.model_name!r} has no audio input (a Gemma 4 unified checkpoint has)",
                       "model", "model_not_audio")
        task = check(form, translate)
        data = await read_upload(form.file, served.config.limits.max_media_bytes)
        job = await served.media.run(prepare, served, data, task)
        requests = submit(served, job, task, model)
        segments = [transcript.Segment(a / SAMPLING_RATE, b / SAMPLING_RATE, -(-(b - a) // SAMPLES_PER_TOKEN))
                    for a, b in job.spans]
        result = transcript.Result(served, task, job, segments, requests)
        if task.stream:
            return transcript.stream(request, requests, served.meter, segments, result)
        failed = await transcript.collect(request, requests, served.meter, segments)
        return failed or result.response()

    @app.post("/v1/audio/transcriptions", dependencies=[Depends(served.auth)])
    async def transcriptions(form: Annotated[TranscriptionForm, Form()], request: Request):
        """Speech to text in the spoken language (OpenAI's transcriptions API)."""
        return await answer(request, form, translate=False)

    @app.post("/v1/audio/translations", dependencies=[Depends(served.auth)])
    async def translations(form: Annotated[TranslationForm, Form()], request: Request):
        """Speech to English text (OpenAI's translations API)."""
        return await answer(request, form, translate=True)
