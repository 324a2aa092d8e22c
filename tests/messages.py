"""Chat messages for tests: user turns with text and random pictures."""

import numpy as np
from PIL import Image


def picture(seed, w=150, h=100):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def img(seed):
    return {"type": "image", "image": picture(seed)}
