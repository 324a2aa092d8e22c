"""Chat messages for tests: user turns with text, random pictures and clips."""

import numpy as np
from PIL import Image


def picture(seed, w=150, h=100):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def noise_clip(path, frames, seed, w=64, h=48):
    """A lossless clip (ffv1 in Matroska) of `frames` frames of noise at 4 fps, written to `path`."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=4)
        s.height, s.width, s.pix_fmt = h, w, "yuv444p"
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def img(seed):
    return {"type": "image", "image": picture(seed)}
