"""The training engine: ``pretrain(config)`` and the pieces it is made of."""

from dinocli.train.config import PretrainConfig, resolve_config
from dinocli.train.loop import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "resolve_config"]
