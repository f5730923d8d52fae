"""Helpers shared by the neural rewards: finding weights, strict loading, freezing, dtype, checkpointing."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from rlr_cli.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype; anything else is a UserError."""
    if name not in DTYPES:
        raise UserError(f"reward dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _looks_local(source: str) -> bool:
    """A path rather than a hub id: absolute, ./ or ~ prefixed, or its first part exists here."""
    return source.startswith(("/", ".", "~")) or os.path.exists(source.split("/")[0])


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _missing(what: str, source: str, key: str, reason: str, kind: str, patterns: list[str] | None = None) -> UserError:
    download = "hf download " + (source if kind == "folder" else " ".join(_hub_parts(source)))
    download += "".join(f" --include '{pattern}'" for pattern in patterns or [])
    return UserError(
        f"{what}: cannot get hub {kind} {source!r} ({reason}); download it (`{download}`) "
        f"and pass the local {kind} with reward.{key}=/local/{kind}"
    )


def _hub_parts(source: str) -> tuple[str, str]:
    parts = source.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_folder(
    source: str, *, cache_dir: str | None, key: str, what: str, patterns: list[str], weights: bool = False
) -> str:
    """A local folder, or a hub repo id fetched into `cache_dir` -> local folder. Only `patterns` files
    are fetched, plus with `weights` the repo's *.safetensors (or *.bin where it has no safetensors)."""
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        return source
    if _looks_local(source):
        raise UserError(f"{what}: {source!r} is not an existing folder; set reward.{key}= to a local folder")
    from huggingface_hub import HfApi, snapshot_download

    offline = _offline()
    try:
        if offline:
            wanted = patterns + (["*.safetensors", "*.bin"] if weights else [])
            return snapshot_download(source, cache_dir=cache_dir, allow_patterns=wanted, local_files_only=True)
        info = HfApi().repo_info(source, timeout=10)  # one request, no retries: fails at once without a hub
        files = [sibling.rfilename for sibling in getattr(info, "siblings", None) or []]  # a model repo's files
        if weights:
            patterns = patterns + ["*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"]
        return snapshot_download(source, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as error:  # any failure to fetch means the same thing to the user: no weights
        reason = "offline (HF_HUB_OFFLINE) and not in the hub cache" if offline else _reason(error)
        hint = patterns + (["*.safetensors"] if weights else [])
        raise _missing(what, source, key, reason, "folder", hint) from None


def resolve_file(source: str, *, cache_dir: str | None, key: str, what: str) -> str:
    """A local file, or 'owner/repo/path/in/repo' on the hub fetched into `cache_dir` -> local file."""
    source = os.path.expanduser(source)
    if os.path.isfile(source):
        return source
    if _looks_local(source) or source.count("/") < 2:
        raise UserError(f"{what}: {source!r} is not an existing file; set reward.{key}= to a local file")
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    repo_id, filename = _hub_parts(source)
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    if isinstance(cached, str):
        return cached
    offline = _offline()
    try:
        if offline:
            raise FileNotFoundError(source)
        HfApi().repo_info(repo_id, timeout=10)  # fails at once without a hub; the download would retry for ~25 s
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir)
    except Exception as error:  # any failure to fetch means the same thing to the user: no weights
        reason = "offline (HF_HUB_OFFLINE) and not in the hub cache" if offline else _reason(error)
        raise _missing(what, source, key, reason, "file") from None


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """A `.safetensors` file, or a torch file read with weights_only=True -> state dict (on CPU)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{what}: cannot read weights file {path!r}: {_reason(error)}") from None


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                file_key: Callable[[str], str] | None = None) -> None:
    """load_state_dict(strict=True), with missing / unexpected / mis-shaped keys in one clear UserError.

    file_key: a module key -> its name in the weights file, when the loader renamed them (the message
    names keys as the user's file has them).
    """
    named = file_key or (lambda key: key)
    expected = module.state_dict()
    missing = sorted(named(k) for k in set(expected) - set(state))
    unexpected = sorted(named(k) for k in set(state) - set(expected))
    mismatched = sorted(
        f"{named(k)} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
        if keys
    ]
    if problems:
        raise UserError(f"{what}: weights do not match the architecture; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def check_loading_info(info: Mapping[str, list], what: str) -> None:
    """Raise a UserError when transformers' from_pretrained(output_loading_info=True) left keys unmatched."""
    listed = {name: sorted(map(str, info.get(name) or [])) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = [
        f"{label}: {', '.join(listed[name][:5])}{' ...' if len(listed[name]) > 5 else ''} ({len(listed[name])})"
        for name, label in (
            ("missing_keys", "missing keys"),
            ("unexpected_keys", "unexpected keys"),
            ("mismatched_keys", "wrong shapes"),
        )
        if listed[name]
    ]
    if problems:
        raise UserError(f"{what}: weights do not match the architecture; " + "; ".join(problems))


def freeze(module: Any, dtype: torch.dtype) -> Any:
    """eval(), requires_grad_(False), cast to dtype; gradients still flow to the inputs.

    Any in, Any out: the rewards reach into their models' submodules (vision_model.encoder.layers, ...),
    which nn.Module's __getattr__ types as Tensor | Module.
    """
    return module.to(dtype).eval().requires_grad_(False)


def checkpoint_layers(layers: Iterable[nn.Module]) -> None:
    """Recompute each layer's activations in backward (works in eval mode, unlike transformers' own switch)."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


def follow_device(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Move the reward's modules to the images' device (a no-op once they are there)."""
    for module in modules:
        if next(module.parameters()).device != device:
            module.to(device)


class MLPHead(nn.Module):
    """The 5-Linear head of the LAION aesthetic predictor and ImageReward: (B,in) -> (B,).

    in-1024-128-64-16-1, dropout 0.2/0.2/0.1 between (inactive in eval), no activations; keys
    `layers.{0,2,4,6,7}`.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)
