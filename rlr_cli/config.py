"""Composing a run's config and the one validation pass that runs before anything loads.

Every `_target_` node is bound to its class's (or function's) signature by pydantic, in strict JSON
mode: unknown keys, missing values, wrong types and values outside an `Annotated[..., Field(...)]`
range are one line each. Then the rules that span groups run: each estimator's `check(options, run)`.
The defaults of every option live in its YAML file; the Python signatures only type them.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import types
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from rlr_cli.errors import UserError
from rlr_cli.interfaces import RunFacts

GROUPS = ("model", "reward", "estimator", "prompts", "optimizer", "trainer", "logger")
TRUSTED_PACKAGES = ("rlr_cli.", "rewards.")  # `_target_` prefixes accepted without `trusted_modules`
BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def config_dir() -> Path:
    """The configs: rlr_cli/configs, a link to the checkout's top-level configs/ that a wheel ships as files."""
    return (Path(__file__).parent / "configs").resolve()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


# ---- composing ------------------------------------------------------------------------------------
def check_group_choices(overrides: list[str]) -> None:
    """`estimator=nope` -> one line with the valid choices (before Hydra's multi-line report)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "." in key or key.startswith("hydra") or not (config_dir() / key).is_dir():
            continue
        for choice in value.split(","):
            if choice and choice != "null" and not (config_dir() / key / f"{choice}.yaml").exists():
                raise UserError(f"unknown {key} '{choice}'; choose one of: {', '.join(group_options(key))}")


def compose(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The job config for these overrides, with the hydra node set so ${hydra:...} resolves.

    Bad group choices and unknown keys become one-line UserErrors.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(_unknown_key_message(overrides, config_name, error) or first_line(error)) from None
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def first_line(error: BaseException | None) -> str:
    """The first non-empty line of an exception or of the exceptions that caused it."""
    while error is not None:
        lines = [line for line in str(error).splitlines() if line.strip()]
        if lines:
            return lines[0].strip()
        error = error.__cause__ or error.__context__
    return "invalid configuration"


def _unknown_key_message(overrides: list[str], config_name: str, error: BaseException) -> str | None:
    """For `group.key=value` where key does not exist: name the key and list the valid ones."""
    text = str(error)
    if "Could not override" not in text:
        return None
    for override in overrides:
        key = override.partition("=")[0]
        if f"'{key}'" in text and "." in key:
            parent, _, leaf = key.rpartition(".")
            groups = [o for o in overrides if "." not in o.partition("=")[0]]
            node = OmegaConf.select(compose(groups, config_name), parent)
            if isinstance(node, DictConfig) and leaf not in node:
                valid = ", ".join(str(k) for k in node.keys() if not str(k).startswith("_"))
                return f"{key}: unknown option; valid options: {valid}"
    return None


def to_plain(cfg: DictConfig) -> dict:
    """Resolve every interpolation; missing values and broken interpolations become UserErrors."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise UserError(f"missing value for {error.full_key}: set it on the command line ({error.full_key}=...)") from None
    except InterpolationResolutionError as error:
        raise UserError(f"cannot resolve {getattr(error, 'full_key', '')}: {error.msg}") from None
    assert isinstance(plain, dict)
    return {str(key): value for key, value in plain.items()}


# ---- binding a node to its target -----------------------------------------------------------------
def is_node(value: Any) -> bool:
    return isinstance(value, dict) and "_target_" in value


def contains_node(value: Any) -> bool:
    if is_node(value):
        return True
    if isinstance(value, dict):
        return any(contains_node(v) for v in value.values())
    return isinstance(value, list) and any(contains_node(v) for v in value)


def import_target(path: Any, where: str, trusted: tuple[str, ...] = ()) -> Any:
    """The class or function a `_target_` names; only from our packages and `trusted_modules`."""
    if not isinstance(path, str) or not path.startswith(TRUSTED_PACKAGES + tuple(f"{m}." for m in trusted)):
        raise UserError(f"{where}._target_={path!r}: only targets in rlr_cli, rewards or a module listed in "
                        f"trusted_modules=[...] are accepted")
    module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = None
    target = getattr(module, attribute, None)
    if target is None:
        raise UserError(f"{where}._target_: cannot import '{path}'")
    return target


@functools.cache
def _options_model(target: Any, untyped: frozenset[str]):
    """A pydantic model of the target's keyword parameters; `untyped` ones (built nodes) accept anything.

    Fields are named p_<parameter> with the parameter as alias: a parameter may be called anything
    (even model_config, which pydantic reserves).
    """
    from pydantic import ConfigDict, Field, create_model

    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # foreign code with unresolvable annotations: bind names, not types
        hints = {}
    parameters = inspect.signature(target).parameters
    fields: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = Any if name in untyped else hints.get(name, Any)
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[f"p_{name}"] = (annotation, Field(default, alias=name))
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    config = ConfigDict(extra="allow" if takes_any else "forbid", strict=True, arbitrary_types_allowed=True,
                        protected_namespaces=())
    return create_model(f"{getattr(target, '__name__', 'Target')}Options", __config__=config, **fields)


def _parameters(model) -> dict[str, Any]:
    """parameter name -> its field's annotation."""
    return {str(field.alias): field.annotation for field in model.model_fields.values()}


def bind(target: Any, node: dict, where: str) -> dict[str, Any]:
    """The node's options checked against the target's signature -> {name: typed value}.

    Options that hold `_target_` nodes are passed through as they are (their nodes are bound on
    their own); every other option is validated and converted (lists to tuples, dicts to dataclasses).
    """
    from pydantic import ValidationError

    options = {k: v for k, v in node.items() if not k.startswith("_")}
    untyped = frozenset(k for k, v in options.items() if contains_node(v))
    model = _options_model(target, untyped)
    try:
        validated = model.model_validate_json(json.dumps({k: v for k, v in options.items() if k not in untyped}
                                                         | {k: None for k in untyped}))
    except ValidationError as error:
        raise UserError(_describe_error(error, where, model, target)) from None
    except TypeError as error:  # a value JSON cannot hold
        raise UserError(f"{where}: {error}") from None
    values = {str(field.alias): getattr(validated, name) for name, field in model.model_fields.items()}
    values.update(validated.model_extra or {})
    return values | {k: options[k] for k in untyped}


def _describe_error(error, where: str, model, target) -> str:
    """pydantic's first error as one line naming the key, what it expects and what it got (a range
    error wins over a type error of another member of the same union)."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] in BOUNDS and e["loc"][:2] == errors[0]["loc"][:2]), errors[0])
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else ""
    key = f"{where}.{field}" if where else field
    parameters = _parameters(model)
    annotation = parameters.get(field)
    nested = next((a for a in (annotation, *typing.get_args(annotation)) if is_dataclass(a)), None)  # X or X | None
    if nested is not None and len(loc) > 1:  # a nested option, e.g. estimator.zo.steps, model.lora.dropout
        key, annotation = f"{key}.{loc[1]}", typing.get_type_hints(nested, include_extras=True).get(loc[1])
    kind = first["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = ", ".join(parameters) if key.count(".") == where.count(".") + 1 else ""
        known = f"; valid options: {valid}" if valid else ""
        return f"{key}: unknown option for {target.__module__}.{target.__name__}{known}"
    if kind == "missing":
        return f"missing value for {key}: set it in the config or on the command line ({key}=...)"
    if kind in BOUNDS:
        limit = next(iter((first.get("ctx") or {}).values()))
        return f"{key}={first['input']!r}: must be {BOUNDS[kind]} {limit}"
    return f"{key}: expected {describe(annotation)}, got {first['input']!r}"


def describe(annotation: Any) -> str:
    """A type annotation in words: int, float or None, one of 'a', 'b', ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


# ---- the validation pass --------------------------------------------------------------------------
def check_nodes(tree: Any, where: str, trusted: tuple[str, ...] = ()) -> None:
    """Bind every `_target_` node in tree (tree itself included) to its target's signature."""
    if is_node(tree):
        bind(import_target(tree["_target_"], where, trusted), tree, where)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            check_nodes(value, f"{where}.{key}" if where else str(key), trusted)


def reward_is_differentiable(node: dict, trusted: tuple[str, ...] = ()) -> bool:
    """From the classes' `differentiable` attributes: a reward and every reward nested in it."""
    def walk(value: Any) -> bool:
        if is_node(value):
            target = import_target(value["_target_"], "reward", trusted)
            if getattr(target, "differentiable", True) is False:
                return False
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return all(walk(child) for child in children)

    return walk(node)


def run_facts(plain: dict) -> RunFacts:
    model, trainer = plain["model"], plain["trainer"]
    return RunFacts(
        num_steps=int(model.get("num_steps", 0)), eta=float(model.get("eta", 0.0)),
        sampler=model_sampler(model, trusted_modules(plain)), sde_window=model.get("sde_window") is not None,
        reward_differentiable=reward_is_differentiable(plain["reward"], trusted_modules(plain)),
        lora=model.get("lora") is not None, batch_size=int(trainer["batch_size"]), grad_accum=int(trainer["grad_accum"]),
        kl_beta=float(kl_beta(plain)), memory_budget_gb=trainer.get("memory_budget_gb"),
    )


def model_sampler(model: dict, trusted: tuple[str, ...]) -> str:
    """The SAMPLER a model family's module declares (rlr_cli/models/: ddim | flow)."""
    import sys

    target = import_target(model["_target_"], "model", trusted)
    return getattr(sys.modules[target.__module__], "SAMPLER", "ddim")


def kl_beta(plain: dict) -> Any:
    """regularizer.kl_beta as configured (0 in a config older than the regularizer)."""
    return (plain.get("regularizer") or {}).get("kl_beta", 0.0)


def check_regularizer(plain: dict) -> None:
    """regularizer.kl_beta is a weight >= 0 (named here: the estimators receive it by interpolation)."""
    beta = kl_beta(plain)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise UserError(f"regularizer.kl_beta={beta!r}: must be a number >= 0")


def check_precision(trainer: dict) -> None:
    """fp16 needs a GPU (its loss scaler); on a CPU accelerate would silently train in fp32."""
    import torch

    if trainer["mixed_precision"] == "fp16" and (trainer["cpu"] or not torch.cuda.is_available()):
        raise UserError("trainer.mixed_precision=fp16 needs a GPU and this run has none (trainer.cpu="
                        f"{str(trainer['cpu']).lower()}, CUDA available: {torch.cuda.is_available()}); "
                        "use trainer.mixed_precision=bf16 or no")


def trusted_modules(plain: dict) -> tuple[str, ...]:
    return tuple(plain.get("trusted_modules") or ())


def validate(cfg: DictConfig, across_groups: bool = True) -> dict:
    """Everything a run needs is present, resolvable, fits its class and (across_groups: the training
    run's rules) fits together; returns the plain config."""
    plain = to_plain(cfg)
    for group in GROUPS:
        if not is_node(plain.get(group)):
            raise UserError(f"config group '{group}' is not set (choose one: {group}=NAME)")
    trusted = trusted_modules(plain)
    check_regularizer(plain)
    check_nodes(plain, "", trusted)
    if not across_groups:
        return plain
    check_precision(plain["trainer"])
    estimator = import_target(plain["estimator"]["_target_"], "estimator", trusted)
    if not callable(getattr(estimator, "check", None)):
        raise UserError(f"estimator {plain['estimator']['_target_']} has no check(options, run) (interfaces.Estimator)")
    estimator.check(bind(estimator, plain["estimator"], "estimator"), run_facts(plain))
    return plain
