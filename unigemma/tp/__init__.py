"""Tensor parallelism over torch.distributed: one model split over N processes (gloo on CPU, NCCL on GPUs).

    torchrun --nproc-per-node 2 -m unigemma serve --model DIR --tp 2

group.py: the process group and its collectives; shard.py: what each rank holds and the
parallel layers; load.py: loading a rank's shard and the ranks' roles; mirror.py: rank 0
driving the others. Nothing is imported here: cache/ imports tp/mirror.py's `mirrored`, and
tp/load.py imports the loader, which imports cache/.
"""
