"""16 kHz mono sounds: words spoken by espeak-ng, beeps and tones, with added noise.

espeak-ng is Debian's speech synthesizer (`apt-get install -y espeak-ng`); its output for a
given voice, rate, pitch and text is the same bytes on every run, so the data stays
reproducible. Its 22,050 Hz output is resampled with soxr, the resampler the engine uses.
"""

from __future__ import annotations

import io
import math
import random
import shutil
import subprocess

import numpy as np
import soundfile
import soxr

RATE = 16000
ESPEAK = "espeak-ng"


def has_espeak() -> bool:
    return shutil.which(ESPEAK) is not None


def missing_voices(wanted: tuple[str, ...]) -> list[str]:
    """The voices ("accent+variant") this espeak-ng lacks. It would silently fall back to its
    default voice for them, so the data would not have the voices the split names."""
    def column(kind: str, col: int) -> set[str]:
        lines = subprocess.run([ESPEAK, f"--voices={kind}"], capture_output=True, text=True, check=True).stdout
        return {ln.split()[col].rsplit("/", 1)[-1] for ln in lines.splitlines()[1:] if len(ln.split()) > col}

    accents, variants = column("en", 1), column("variant", 4)
    return [v for v in wanted if v.split("+")[0] not in accents or v.split("+")[1] not in variants]


def speak(text: str, voice: str, wpm: int, pitch: int) -> np.ndarray:
    """float32 samples at 16 kHz of `text` said by espeak-ng's `voice` (e.g. "en-gb+f2")."""
    if not has_espeak():
        raise FileNotFoundError("espeak-ng not found (Debian: apt-get install -y espeak-ng)")
    out = subprocess.run([ESPEAK, "-v", voice, "-s", str(wpm), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True, timeout=30)
    wave, rate = soundfile.read(io.BytesIO(out.stdout), dtype="float32")
    if wave.ndim > 1:
        wave = wave.mean(axis=1)
    wave = soxr.resample(wave, rate, RATE)
    nz = np.flatnonzero(np.abs(wave) > 1e-3)  # trim espeak's own leading / trailing silence
    return wave[nz[0]:nz[-1] + 1] if len(nz) else wave


def change_speed(wave: np.ndarray, speed: float) -> np.ndarray:
    """`wave` played `speed` times faster: resampled to 1/speed of its samples, so at the same rate
    every frequency (pitch, formants) is `speed` times higher and it lasts 1/speed as long."""
    if speed == 1.0:
        return wave
    return soxr.resample(wave, RATE, RATE / speed).astype(np.float32)


def tone(hz: float, seconds: float, rng: random.Random) -> np.ndarray:
    """A sine (or square-ish) beep with 5 ms fades so its edges do not click."""
    t = np.arange(int(seconds * RATE)) / RATE
    wave = np.sin(2 * np.pi * hz * t)
    if rng.random() < 0.3:
        wave = np.tanh(3 * wave)  # a buzzier beep
    fade = min(len(t) // 2, int(0.005 * RATE))
    env = np.ones_like(t)
    env[:fade], env[len(t) - fade:] = np.linspace(0, 1, fade), np.linspace(1, 0, fade)
    return (wave * env).astype(np.float32)


def beeps(count: int, hz: float, rng: random.Random) -> np.ndarray:
    """`count` beeps of one pitch, each 70-200 ms, separated by 100-250 ms of silence."""
    length = rng.uniform(0.07, 0.2)
    parts = []
    for k in range(count):
        if k:
            parts.append(np.zeros(int(rng.uniform(0.1, 0.25) * RATE), np.float32))
        parts.append(tone(hz, length * rng.uniform(0.9, 1.1), rng))
    return np.concatenate(parts)


def finish(wave: np.ndarray, rng: random.Random, np_rng: np.random.Generator,
           snr_db: tuple[float, float] = (10, 35)) -> np.ndarray:
    """Pad with 50-300 ms of silence each side, set a random level, add white noise at a random SNR."""
    pad = [np.zeros(int(rng.uniform(0.05, 0.3) * RATE), np.float32) for _ in range(2)]
    wave = np.concatenate([pad[0], wave, pad[1]])
    peak = float(np.abs(wave).max()) or 1.0
    wave = wave / peak * rng.uniform(0.3, 0.9)
    power = float(np.mean(wave ** 2))
    noise_power = power / (10 ** (rng.uniform(*snr_db) / 10))
    wave = wave + np_rng.standard_normal(len(wave)).astype(np.float32) * math.sqrt(noise_power)
    return np.clip(wave, -1, 1).astype(np.float32)


def write_wav(path, wave: np.ndarray) -> None:
    soundfile.write(str(path), wave, RATE, subtype="PCM_16", format="WAV")
