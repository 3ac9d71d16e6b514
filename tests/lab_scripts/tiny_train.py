"""Train a tiny GQA model on MQAR; used by test_train.py as a subprocess (kill/resume, torchrun).

usage: tiny_train.py OUT STEPS MICRO_BATCH [GRAD_ACCUM [STRATEGY [CHECKPOINT_EVERY]]]"""

import sys

import torch

from ctxlab import LayerSpec, ModelConfig
from ctxlab.train import TrainConfig, make_task, train

torch.set_num_threads(1)
out, steps, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
accum = int(sys.argv[4]) if len(sys.argv) > 4 else 1
strategy = sys.argv[5] if len(sys.argv) > 5 else "ddp"
every = int(sys.argv[6]) if len(sys.argv) > 6 else 1
layer = LayerSpec(num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
cfg = ModelConfig(family="ctxlab", vocab_size=256, hidden_size=32, layers=(layer, layer))
task = make_task("mqar", seq_len=32, pairs=4, eval_examples=8)
train(
    cfg,
    task,
    TrainConfig(
        steps=steps,
        micro_batch=micro,
        grad_accum=accum,
        warmup_steps=3,
        checkpoint_every=every,
        strategy=strategy,
        lr=1e-2,
    ),
    out,
    progress=False,
)
