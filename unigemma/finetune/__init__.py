"""Fine-tuning: LoRA / QLoRA on OpenAI-style chat data (text, images, audio, video, tools).

    from unigemma.finetune import train
    train(model="path/to/model", data="train.jsonl", out="adapter/")

labels.py: what is trained in a conversation; data.py: the jsonl reader, bad-data rules,
length bucketing and padding; loss.py: the forward with gradient checkpointing and the label
loss; train.py: the loop (AdamW, schedule, accumulation, eval, checkpoints, resume).
"""

from .data import DataError, Dataset, load_jsonl
from .labels import IGNORE, encode_conversation, encode_text
from .run import Result, prepare, train
from .train import TrainArgs, Trainer

__all__ = ["IGNORE", "DataError", "Dataset", "Result", "TrainArgs", "Trainer", "encode_conversation", "encode_text",
           "load_jsonl", "prepare", "train"]
