"""The composition root: checks a composed config against the classes it names, then builds them.

This is the only module that calls hydra.utils.instantiate; everything else receives objects.
"""
from __future__ import annotations

import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from rlr_cli.errors import UserError

GROUPS = ("model", "reward", "estimator", "prompts", "optimizer", "trainer", "logger")


def to_plain(cfg: DictConfig) -> dict:
    """Resolve every interpolation; missing values and broken interpolations become UserErrors."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise UserError(f"missing value for {error.full_key}: set it on the command line ({error.full_key}=...)") from None
    except InterpolationResolutionError as error:
        raise UserError(f"cannot resolve {getattr(error, 'full_key', '')}: {error.msg}") from None


def import_target(path: str, where: str):
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"{where}._target_: cannot import '{path}'") from None


def _type_hints(target) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # foreign code with unresolvable annotations: bind names, skip types
        return {}


def _matches(value: Any, annotation: Any) -> bool:
    """True when value fits annotation; annotations this checker does not understand always match."""
    if annotation is Any or isinstance(value, dict) and "_target_" in value:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple) or origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple)) and (
            not args or origin is tuple or all(_matches(item, args[0]) for item in value)
        )
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_node(node: dict, where: str) -> None:
    """Bind a `_target_` node's keys to the target's signature and check simple types; recurse."""
    target = import_target(node["_target_"], where)
    signature = inspect.signature(target)
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = _type_hints(target)
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key not in params and not takes_any:
            valid = ", ".join(name for name in params if name not in ("self", "args", "kwargs"))
            raise UserError(f"{where}.{key}: unknown option for {node['_target_']}; valid options: {valid}")
        if key in hints and not _matches(value, hints[key]):
            raise UserError(f"{where}.{key}: expected {_describe(hints[key])}, got {value!r}")
    if not node.get("_partial_"):
        missing = [
            name for name, p in params.items()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and name not in node and name != "self"
        ]
        if missing:
            raise UserError(f"{where}: missing value for {', '.join(missing)}")
    check_tree(node, where)


def check_tree(tree: Any, where: str) -> None:
    """Find `_target_` nodes below tree (not tree itself) and check each."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        here = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict) and "_target_" in value:
            check_node(value, here)
        elif isinstance(value, (dict, list)):
            check_tree(value, here)


def validate(cfg: DictConfig) -> dict:
    """Everything a run needs is present, resolvable and fits its class; returns the plain config."""
    plain = to_plain(cfg)
    for group in GROUPS:
        if not isinstance(plain.get(group), dict) or "_target_" not in plain[group]:
            raise UserError(f"config group '{group}' is not set (choose one: {group}=NAME)")
    check_tree({k: v for k, v in plain.items() if k != "hydra"}, "")
    return plain


@dataclass
class Run:
    """The built objects of one run."""

    policy: Any
    reward: Any
    estimator: Any
    prompts: Any
    optimizer: Any
    trainer: Any
    logger: Any
    seed: int
    config: dict
    metrics: dict = field(default_factory=dict)  # name -> callable(images, prompts) -> (B,) or {key: (B,)}


def _instantiate(node: dict) -> Any:
    """hydra's instantiate, with our UserErrors unwrapped from its InstantiationException."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build(cfg: DictConfig) -> Run:
    """Validate, then instantiate every group (weights load here) under the run's seed."""
    from accelerate.utils import set_seed

    plain = validate(cfg)
    set_seed(int(plain.get("seed", 0)))  # random inits (e.g. LoRA) are the same in every run and rank
    objects = {group: _instantiate(plain[group]) for group in GROUPS}
    objects["policy"] = objects.pop("model")
    objects["metrics"] = {name: _instantiate(node) for name, node in (plain.get("metrics") or {}).items()}
    return Run(**objects, seed=int(plain.get("seed", 0)), config=plain)


def instantiate_node(node: dict) -> Any:
    """Build one `_target_` node (used by tools that need a single component, e.g. a reward)."""
    check_node(node, node.get("_target_", "node"))
    return _instantiate(node)
