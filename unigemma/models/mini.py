"""unigemma-mini (`unigemma_mini`): Gemma 3's text decoder with Gemma 4 unified's encoder-free embedders.

    image: 48×48 patch → LayerNorm → Dense → LayerNorm → + x/y position rows → LayerNorm
           → scale-free RMSNorm → Linear → the decoder's width             (embed/vision.py)
    audio: 640 raw 16 kHz samples → scale-free RMSNorm → Linear → the decoder's width  (embed/audio.py)
    soft tokens scattered into their placeholders, then Gemma 3's blocks (models/gemma3.py), with
    each image / video frame bidirectional on sliding layers (models/masks.py "sliding").

Nothing here is new math: the decoder's layer and norm are Gemma 3's, the embedders and the
media seam (`embed`: placeholders → soft tokens) are Gemma 4 unified's, reused as they are so
the two families cannot drift apart. This file holds what is the mini model's own: the module
tree (`model.language_model`, `model.embed_vision`, `model.embed_audio`, as Gemma 4's, so on-disk
names are ours), the config.json layout, and the norm convention on disk (Gemma 3's 1 + w on the
decoder's RMSNorms only; the vision LayerNorms store their weight as it is).

config.json: `{"model_type": "unigemma_mini", "text_config": {Gemma 3 text keys},
"vision_config": {Gemma 4 keys}, "audio_config": {Gemma 4 keys}, <Gemma 4's media token ids>}`.
The media token ids are Gemma 4's (image 258880, boi 255999, ...): the mini checkpoint's
tokenizer is Gemma 3's vocabulary with Gemma 4's marker strings written over those ids (all
`<unusedN>` slots or Gemma 3's image / turn markers; weights/mini.py), so Gemma 4's chat template
and processor run unchanged. A checkpoint is built from the Gemma 3 270M GGUF by weights/mini.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AudioConfig, ModelConfig, VisionConfig, check, from_keys, stored_dtype
from ..errors import ConfigError
from . import gemma3, gemma4
from .base import CausalLM, Family
from .text import TextModel


@dataclass
class MiniTextConfig(gemma3.Gemma3TextConfig):
    """Gemma 3's text config whose image / video blocks attend bidirectionally ("vision", as
    Gemma 4's): the only decoder difference, and only in the masks (models/base.py `masks`)."""
    WHERE = "text_config (unigemma_mini)"

    use_bidirectional_attention: str | None = "vision"

    def __post_init__(self):
        check(self.use_bidirectional_attention in (None, "vision"), self.WHERE,
              f"use_bidirectional_attention={self.use_bidirectional_attention!r}: expected \"vision\" or null")
        # Gemma 3's checks reject bidirectional attention (EmbeddingGemma's, over every token);
        # this one is Gemma 4's media-block kind, so run them without it.
        mode, self.use_bidirectional_attention = self.use_bidirectional_attention, None
        super().__post_init__()
        self.use_bidirectional_attention = mode


class UnigemmaMini(CausalLM):
    def __init__(self, config: ModelConfig, block_mask: str = "sliding"):
        super().__init__(config, block_mask)
        self.model = gemma4._Backbone(config, layer=gemma3.DecoderLayer, norm=gemma3.Norm)  # Gemma 4's tree
        self.add_head()

    @property
    def text(self) -> TextModel:
        return self.model.language_model

    @property
    def dtype(self) -> torch.dtype:
        # Gemma 3's norms are float32 whatever the model dtype: read the embedding's (as gemma3.py)
        e = self.text.embed_tokens
        return getattr(e, "dtype", None) or e.weight.dtype

    # Gemma 4 unified's media seam, unchanged: it reads only config's token ids, self.text.embed,
    # self.model.embed_vision / embed_audio and self.device, which this tree has under the same names.
    embed = gemma4.Gemma4Unified.embed
    _media_features = gemma4.Gemma4Unified._media_features

    def logits(self, input_ids, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
               image_position_ids=None, input_features=None, input_features_mask=None,
               pixel_values_videos=None, video_position_ids=None, *, block_mask: str | None = None) -> torch.Tensor:
        """`CausalLM.logits` with the processor's tensors named in transformers' order (as Gemma 4's)."""
        return super().logits(input_ids, attention_mask, mm_token_type_ids, block_mask=block_mask,
                              pixel_values=pixel_values, image_position_ids=image_position_ids,
                              input_features=input_features, input_features_mask=input_features_mask,
                              pixel_values_videos=pixel_values_videos, video_position_ids=video_position_ids)


def parse_config(d: dict, model_type: str) -> ModelConfig:
    """config.json → ModelConfig: a Gemma 3 text_config, Gemma 4 vision / audio configs, Gemma 4's
    media token ids (defaults: the real ones, which the mini tokenizer carries)."""
    if not isinstance(d.get("text_config"), dict):
        raise ConfigError("config: model_type unigemma_mini needs a text_config object (Gemma 3 text keys)")
    text = from_keys(MiniTextConfig, d["text_config"], "text_config")
    vision = from_keys(VisionConfig, d["vision_config"], "vision_config") if d.get("vision_config") else None
    audio = from_keys(AudioConfig, d["audio_config"], "audio_config") if d.get("audio_config") else None
    ids = {k: d.get(k, getattr(ModelConfig, k)) for k in gemma4.MEDIA_TOKEN_KEYS}  # absent: Gemma 4's
    for k, v in ids.items():
        check(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < text.vocab_size, "config",
              f"{k}={v!r} is outside the vocabulary of {text.vocab_size}")
    media = [ids["image_token_id"], ids["video_token_id"], ids["audio_token_id"]]
    check(len(set(media)) == 3, "config", f"image, video and audio token ids must differ, got {media}")
    return ModelConfig(text=text, vision=vision, audio=audio, model_type=model_type,
                       eos_token_id=d.get("eos_token_id"), dtype=stored_dtype(d), **ids)


# -- checkpoint names and values, both ways -----------------------------------------------------
def checkpoint_name_to_module(name: str, config: ModelConfig) -> str | None:
    """On disk the names are ours; a tied head's copy is not stored."""
    return None if name == "lm_head.weight" and config.text.tie_word_embeddings else name


def module_name_to_checkpoint(name: str, config: ModelConfig) -> str:
    return name


def _decoder_norm(name: str) -> bool:
    # the vision embedder's pos_norm is a LayerNorm whose weight is stored as it is
    return name.startswith("model.language_model.") and name.endswith("norm.weight")


def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Gemma 3's stored w → our multiplier 1 + w, on the decoder's RMSNorms only."""
    return gemma3.transform(name, tensor) if _decoder_norm(name) else tensor


def untransform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return gemma3.untransform(name, tensor) if _decoder_norm(name) else tensor


def is_quantizable(name: str, module: nn.Module) -> bool:
    """The decoder's projections and a separate LM head; not the media embedders (as Gemma 4)."""
    return isinstance(module, nn.Linear) and ("language_model.layers." in name or name == "lm_head")


def text_config_of(gemma3_config: dict) -> dict:
    """A gemma3_text config.json (or a GGUF's, models/gemma3.py `gguf_config`) → the text_config
    of a mini config: the same keys, but model_type and Gemma 3's use_bidirectional_attention
    (false there, and EmbeddingGemma's kind when true) give way to the mini default "vision"."""
    return {k: v for k, v in gemma3_config.items() if k not in ("model_type", "use_bidirectional_attention")}


def mini_config(text_config: dict, mm_posemb_size: int = 1120, num_soft_tokens: int = 70) -> dict:
    """A unigemma_mini config.json around a Gemma 3 text config: the embedders as the 12B has
    them (48-px patches, 640-sample frames), their width the decoder's, Gemma 4's token ids.
    num_soft_tokens: the default image budget (the smallest of Gemma 4's five, 8 x 8 patches
    for a square picture: what the shipped model was trained at)."""
    width = text_config.get("hidden_size", MiniTextConfig.hidden_size)
    return {"model_type": "unigemma_mini", "text_config": dict(text_config),
            "vision_config": dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=width,
                                  output_proj_dims=width, mm_posemb_size=mm_posemb_size,
                                  num_soft_tokens=num_soft_tokens),
            "audio_config": dict(audio_embed_dim=640),
            **{k: getattr(ModelConfig, k) for k in gemma4.MEDIA_TOKEN_KEYS}}


def tiny_config(model_type: str = "unigemma_mini") -> dict:
    """A tiny mini config: Gemma 3's tiny decoder (7 layers, window 5), small media token ids."""
    text = text_config_of(gemma3.tiny_config())
    d = mini_config(text, mm_posemb_size=16)
    d["vision_config"].update(mm_embed_dim=48, output_proj_dims=48)
    return {**d, **dict(zip(gemma4.MEDIA_TOKEN_KEYS, range(500, 507)))}


FAMILY = Family(name="unigemma-mini", model_types=("unigemma_mini",), model=UnigemmaMini,
                parse_config=parse_config, to_ours=checkpoint_name_to_module, to_disk=module_name_to_checkpoint,
                is_quantizable=is_quantizable, tiny_config=tiny_config, load_transform=transform,
                save_transform=untransform, takes_media=True, chat_template="gemma4")
