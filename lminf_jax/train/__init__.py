"""Fine-tuning under any attention method: `lminf_jax.train.finetune` and the `lminf finetune` command."""

from lminf_jax.train.loop import finetune
from lminf_jax.train.step import TrainSettings, TrainState, make_train_step, optimizer, trainable_paths

__all__ = ["TrainSettings", "TrainState", "finetune", "make_train_step", "optimizer", "trainable_paths"]
