"""Training ECLIP: presets (:mod:`eclip.train.config`) and the FSDP2 trainer (:mod:`eclip.train.trainer`)."""

from .config import PRESETS, TrainConfig, preset
from .trainer import check_batch, train

__all__ = ["PRESETS", "TrainConfig", "check_batch", "preset", "train"]
