"""Shared by the server tests: a tiny real-vocabulary checkpoint and a real uvicorn server on a free port."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import uvicorn
from PIL import Image

TINY = {
    "model_type": "gemma4_unified",
    "text_config": {
        "model_type": "gemma4_unified_text", "vocab_size": 262144, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "global_head_dim": 64, "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 16,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 2048,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "vision_config": {"model_type": "gemma4_unified_vision", "mm_embed_dim": 64, "output_proj_dims": 64,
                      "mm_posemb_size": 1120},
    "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640},
}


def tiny_checkpoint(root):
    from unigemma.weights.random import write_random_checkpoint

    path = root / "tiny-server-ckpt"
    if not (path / "config.json").exists():
        write_random_checkpoint(TINY, path, seed=0)
    return path


def tiny_gemma(root):
    import unigemma
    from unigemma.vocab import gemma4_vocab_gguf

    return unigemma.load(tiny_checkpoint(root), dtype="float32", tokenizer=gemma4_vocab_gguf())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """uvicorn serving `app` on 127.0.0.1 in a thread, for the duration of a `with`."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def png_data_url(w=96, h=64, seed=0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(seconds=0.5, rate=16000) -> str:
    import soundfile

    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(frames=4, w=64, h=48) -> str:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()
