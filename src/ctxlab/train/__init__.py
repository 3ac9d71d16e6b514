"""Training ctxlab models: one process on CPU or many under ``torchrun`` (DDP / FSDP2).

from ctxlab.train import TrainConfig, make_task, train
result = train(model_config, make_task("mqar", seq_len=128, pairs=8), TrainConfig(steps=200), "runs/x")
"""

from .config import TrainConfig
from .loop import train
from .tasks import TASKS, make_task

__all__ = ["TASKS", "TrainConfig", "make_task", "train"]
