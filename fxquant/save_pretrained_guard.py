"""Refuse Hugging Face's save_pretrained on a model that holds quantized layers.

`save_pretrained` writes the model's state_dict, in which fxquant's layers keep integer codes and
scales under names `from_pretrained` does not know: it would load such a checkpoint with those
layers initialised at random (and only warn). A model fxquant installed layers into, or rebuilt
from an Ascend checkpoint, gets this object as its `save_pretrained`, which raises and names the
ways to save that do reload.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError


class SavePretrainedRefused:
    """Stands for `model.save_pretrained` (an instance attribute); calling it raises ConfigError.

    how_to_save: the ways to save this model that reload, for the message.
    """

    def __init__(self, model_name: str, how_to_save: str) -> None:
        self.model_name = model_name
        self.how_to_save = how_to_save

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            f"{self.model_name} holds fxquant's quantized layers: save_pretrained would write their integer "
            f"codes under names that from_pretrained does not know, and from_pretrained would initialise "
            f"those layers at random. {self.how_to_save}")


def refuse_save_pretrained(model: torch.nn.Module, how_to_save: str) -> None:
    """Give `model` (a Hugging Face model: it has save_pretrained) a SavePretrainedRefused."""
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = SavePretrainedRefused(type(model).__name__, how_to_save)
