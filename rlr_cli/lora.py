"""LoRA adapters of a denoiser: the trainable one, frozen extra ones, and the one reader/writer of files.

Files are diffusers LoRA files (`pytorch_lora_weights.safetensors` written by the pipeline's
`save_lora_weights`, read by `load_lora_weights`) with peft's lora_A / lora_B key names, which
diffusers reads natively for every layer type (attention, projections, convolutions).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Annotated, Iterator, Literal

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.interfaces import LoraFormat

WEIGHTS = "pytorch_lora_weights.safetensors"
TRAINABLE = "default"  # peft's name for the adapter that add_adapter(config) creates


@dataclass(frozen=True)
class LoraOptions:
    """The `model.lora` node: rank, alpha, init (default: lora_B = 0 | gaussian), target_modules, dropout."""

    rank: Annotated[int, Field(ge=1)]
    alpha: Annotated[int, Field(ge=1)]
    init: Literal["default", "gaussian"]
    target_modules: list[str]
    dropout: Annotated[float, Field(ge=0, lt=1)]

    def metadata(self) -> dict:
        return metadata(self.rank, self.alpha, self.target_modules)


def metadata(rank: int, alpha: int, target_modules: list[str]) -> dict:
    """The adapter metadata diffusers stores beside a LoRA's weights (peft's LoraConfig fields)."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules)}


def add_trainable(network: torch.nn.Module, options: LoraOptions) -> None:
    """Attach the trainable LoRA to network (its other weights stay frozen)."""
    from peft import LoraConfig

    network.add_adapter(LoraConfig(  # type: ignore[operator]  (diffusers' PeftAdapterMixin)
        r=options.rank, lora_alpha=options.alpha, init_lora_weights=True if options.init == "default" else options.init,
        target_modules=list(options.target_modules), lora_dropout=options.dropout,
    ))


def layers(network: torch.nn.Module, adapter: str = TRAINABLE) -> dict[str, Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(network, adapter_name=adapter)


def write(directory: str | os.PathLike, network: torch.nn.Module, fmt: LoraFormat, metadata: dict,
          adapter: str = TRAINABLE) -> None:
    """Adapter `adapter` of network as a diffusers LoRA file in directory."""
    os.makedirs(directory, exist_ok=True)
    fmt.save(str(directory), layers(network, adapter), metadata)


def read(directory: str | os.PathLike, fmt: LoraFormat) -> dict[str, Tensor]:
    """The denoiser's layers of a LoRA file that `write` (or diffusers) wrote, keys without the prefix."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(os.path.join(directory, WEIGHTS))
    prefix = f"{fmt.prefix}."
    state = {key.removeprefix(prefix): value for key, value in state.items()}
    return convert_unet_state_dict_to_peft(state)  # files of older runs used diffusers' own key names


def load_into(network: torch.nn.Module, state: dict[str, Tensor], where: str, adapter: str = TRAINABLE) -> None:
    """Set adapter `adapter` of network from state, tensor for tensor; a file of another model is a UserError."""
    from peft.utils import set_peft_model_state_dict

    mismatch = difference(state, layers(network, adapter))
    if mismatch:
        raise UserError(f"adapter in {where} does not fit this model: {mismatch}")
    set_peft_model_state_dict(network, state, adapter)


def _layer(key: str) -> str:
    """The layer name LoRA wraps (to_q, to_out.0) in a peft key `<path>.<layer>.lora_A.weight`."""
    path = key.split(".lora_")[0].split(".")
    return ".".join(path[-2:]) if path[-1].isdigit() else path[-1]


def difference(file: dict[str, Tensor], model: dict[str, Tensor]) -> str:
    """What differs between a LoRA file's layers and the model's, with the config key to change ('' if none)."""
    if file.keys() != model.keys():
        theirs, ours = sorted({_layer(k) for k in file}), sorted({_layer(k) for k in model})
        if theirs != ours:
            return (f"it adapts [{', '.join(theirs)}], this model [{', '.join(ours)}] "
                    f"(set model.lora.target_modules=[{','.join(theirs)}])")
        odd = sorted(file.keys() ^ model.keys())
        return f"{len(odd)} layers differ (e.g. {odd[0]}): it was trained on another model (model=)"
    for key, tensor in file.items():
        if key.endswith("lora_A.weight") and tensor.shape[0] != model[key].shape[0]:
            return (f"its LoRA rank is {tensor.shape[0]}, this model's {model[key].shape[0]} "
                    f"(set model.lora.rank={tensor.shape[0]})")
        if tensor.shape != model[key].shape:
            return (f"{key} is {tuple(tensor.shape)} there, {tuple(model[key].shape)} here: it was trained on another "
                    f"model (model=)")
    return ""


class AdapterSet:
    """The trainable adapter plus frozen extra ones (never trained, never saved with the run's adapter).

    `activate(frozen)` makes the trainable adapter and `frozen` the active ones; it runs inside every
    denoiser call, so a call recomputed in backward (gradient checkpointing) sees its own adapters.
    """

    def __init__(self, network: torch.nn.Module, fmt: LoraFormat):
        self.network, self.format = network, fmt
        self.frozen: dict[str, float] = {}  # name -> scale
        self.trainable_names = {name for name, p in network.named_parameters() if p.requires_grad}
        self.active: tuple[str, ...] = (TRAINABLE,)

    def add(self, name: str, state: dict, alphas: dict | None, metadata: dict | None, scale: float) -> None:
        if name == TRAINABLE:
            raise ValueError(f"adapter name {name!r} is the trainable adapter's")
        if name in self.frozen:  # attaching again replaces it
            self.network.delete_adapters(name)  # type: ignore[operator]  (diffusers' PeftAdapterMixin)
            del self.frozen[name]
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.format.load_into(self.network, state, alphas, metadata, name)
        self.frozen[name] = scale
        self.active = ()
        self.activate(())

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Every adapter off for the block (the base model: the KL reference), as they were after it."""
        self.network.disable_adapters()  # type: ignore[operator]  (diffusers' PeftAdapterMixin)
        try:
            yield
        finally:
            self.network.enable_adapters()  # type: ignore[operator]
            self._restore_trainable()

    def _restore_trainable(self) -> None:
        for name, parameter in self.network.named_parameters():  # peft's set_adapter flips requires_grad
            parameter.requires_grad_(name in self.trainable_names)

    def activate(self, frozen: tuple[str, ...]) -> None:
        names = (TRAINABLE, *frozen)
        if names == self.active or not self.frozen:
            return
        scales = [1.0] + [self.frozen[name] for name in frozen]
        self.network.set_adapters(list(names), weights=scales)  # type: ignore[operator]
        self._restore_trainable()
        self.active = names

