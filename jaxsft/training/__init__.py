"""Supervised fine-tuning: batches, optimizer, the compiled train step, checkpoints, the run loop."""

from jaxsft.training.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
