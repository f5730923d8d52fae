"""ShortFT's shortcut: a short chain of a few-step (trajectory-preserving) LoRA, and loading its weights.

A `ShortcutChain` is a chain (interfaces.Chain) like `sampling.DDIMChain`: the policy samples it
unchanged, with the frozen shortcut adapter active on its shortcut steps (`adapters`).
Transition i < k goes from timesteps[i] to the next shortcut timestep by one of three rules:

- ddim: x_next = sqrt(a_n) x0_hat + sqrt(1 - a_n) eps (DDIM, eta 0: deterministic, follows the ODE);
- tcd:  TCDScheduler.step with gamma: denoise to s = floor((1 - gamma) t_next), then re-noise to t_next;
- lcm:  LCMScheduler.step: boundary-conditioned x0, then fresh noise to t_next (last step: x0 itself).

Optionally the last `long_steps` transitions are the base model's own long-chain DDIM steps (with the
policy's eta), run without the shortcut adapter.
The stochastic parts draw their noise from the rollout, like every other transition of the policy.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.sampling import DDIMChain, as_steps

Rule = Literal["ddim", "tcd", "lcm"]
SHORTCUT_ADAPTER = "shortcut"  # the frozen adapter's name inside the UNet (never saved with the run's adapter)


def scheduler_timesteps(base_scheduler_config, rule: Rule, k: int) -> list[int]:
    """The k timesteps the shortcut's own diffusers scheduler picks (TCD / LCM; DDIM with trailing spacing)."""
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    scheduler: Any  # from_config is annotated as maybe returning a tuple
    if rule == "ddim":
        scheduler = DDIMScheduler.from_config(base_scheduler_config, timestep_spacing="trailing")
    else:
        scheduler = (TCDScheduler if rule == "tcd" else LCMScheduler).from_config(base_scheduler_config)
    scheduler.set_timesteps(k)
    return [int(t) for t in scheduler.timesteps]


def even_indices(num_long_steps: int, k: int) -> list[int]:
    """Indices into the long chain's grid, k + 1 of them evenly spread over [0, num_long_steps]."""
    return [(2 * j * num_long_steps + k) // (2 * k) for j in range(k + 1)]  # rounded half up


class ShortcutChain:
    """k shortcut transitions (optionally followed by the last `long_steps` of the long chain).

    timesteps (k + long_steps,): inputs of the transitions, descending. The shortcut's last transition
    ends at the first long step's timestep, or at x_0 (the long chain's final alpha) when long_steps = 0.
    """

    def __init__(
        self,
        long_chain: DDIMChain,
        k: int,
        rule: Rule = "ddim",
        timesteps: str | Sequence[int] = "even",
        gamma: float = 0.0,
        long_steps: int = 0,
        scheduler_config: Any = None,
        guidance_scale: float | None = None,
    ):
        if not 1 <= k:
            raise UserError(f"estimator.k={k}: the shortcut chain needs at least one step")
        if not 0 <= long_steps < long_chain.num_steps:
            raise UserError(f"estimator.long_steps={long_steps}: must be in [0, {long_chain.num_steps - 1}]")
        if not 0.0 <= gamma <= 1.0:
            raise UserError(f"estimator.gamma={gamma}: TCD's gamma must be in [0, 1]")
        self.long, self.rule, self.gamma, self.k, self.long_steps = long_chain, rule, gamma, k, long_steps
        self.guidance_scale = guidance_scale  # CFG inside the chain; None: the policy's
        self.adapter: str | None = SHORTCUT_ADAPTER  # active on the shortcut steps
        first_long = long_chain.num_steps - long_steps  # grid index where the long tail starts
        end = int(long_chain.timesteps[first_long]) if long_steps else -1  # -1: x_0
        if timesteps == "even":
            if k > first_long:
                raise UserError(f"estimator.k={k} exceeds the {first_long} long-chain steps it would replace")
            short = [int(long_chain.timesteps[i]) for i in even_indices(first_long, k)[:-1]]
        elif timesteps == "scheduler":
            short = scheduler_timesteps(scheduler_config, rule, k)
        elif isinstance(timesteps, str):
            raise UserError(f"estimator.timesteps={timesteps!r}: use even, scheduler or a list of k timesteps")
        else:
            short = [int(t) for t in timesteps]
            if len(short) != k:
                raise UserError(f"estimator.timesteps has {len(short)} entries, estimator.k={k}")
        if any(a <= b for a, b in zip(short, short[1:])) or short[-1] <= end:
            raise UserError(f"shortcut timesteps {short} must descend and stay above {max(end, 0)}")
        self.short = short
        self.ends = short[1:] + [end]
        tail = [int(t) for t in long_chain.timesteps[first_long:]]
        self.timesteps = torch.tensor(short + tail, dtype=long_chain.timesteps.dtype)
        self.num_steps = k + long_steps
        self._lcm: Any = None  # LCM's boundary-condition scalings, when rule is lcm
        if rule == "lcm":
            from diffusers import LCMScheduler

            self._lcm = LCMScheduler.from_config(scheduler_config)

    # ---- which part of the chain ----------------------------------------------------------------
    def is_shortcut(self, i: int) -> bool:
        return i < self.k

    def _long_index(self, i: int) -> int:
        return self.long.num_steps - self.long_steps + (i - self.k)

    def _alpha(self, t: int) -> float:
        return float(self.long.alphas_cumprod[t]) if t >= 0 else self.long.final_alpha

    # ---- the Chain interface ---------------------------------------------------------------------
    # A shortcut rollout runs every sample at the same transition; the per-step rules below take that one.
    def adapters(self, i: int) -> tuple[str, ...]:
        return (self.adapter,) if self.adapter and self.is_shortcut(i) else ()

    def without_adapter(self) -> ShortcutChain:
        """The same chain run by the base model alone (what the shortcut adds, measured)."""
        chain = copy.copy(self)
        chain.adapter = None
        return chain

    def std(self, steps: Tensor) -> Tensor:
        return torch.tensor([self._std(i) for i in steps.tolist()], dtype=torch.float64)

    def predict_x0(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        return self._predict_x0(_single(steps), x, out)

    def mean(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        return self._mean(_single(steps), x, out)

    def noised(self, steps: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        alpha = self._alpha(int(self.timesteps[_single(steps)]))
        return math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * noise

    def resampled(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> ShortcutChain:
        raise ValueError("held-out samples are drawn on the policy's long chain, never on a shortcut chain")

    def _std(self, i: int) -> float:
        if not self.is_shortcut(i):
            return float(self.long.std(as_steps(self._long_index(i), 1))[0])
        end = self.ends[i]
        if self.rule == "ddim" or end < 0 or (self.rule == "tcd" and self.gamma == 0):
            return 0.0
        if self.rule == "lcm":
            return math.sqrt(1 - self._alpha(end))
        return math.sqrt(max(1 - self._alpha(end) / self._alpha(self._tcd_s(i)), 0.0))

    def _tcd_s(self, i: int) -> int:
        """TCD's intermediate timestep s = floor((1 - gamma) * t_next); the last step denoises to t = 0."""
        return math.floor((1 - self.gamma) * max(self.ends[i], 0))

    def _predict_x0(self, i: int, x: Tensor, eps: Tensor) -> Tensor:
        """x_0 prediction (B,C,H,W) at step i; LCM adds its boundary condition c_skip x + c_out x0_hat."""
        if not self.is_shortcut(i):
            return self.long.predict_x0(as_steps(self._long_index(i), x.shape[0]), x, eps)
        t = self.short[i]
        a_t = self._alpha(t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if self.rule == "lcm":
            c_skip, c_out = self._lcm.get_scalings_for_boundary_condition_discrete(t)
            x0 = float(c_out) * x0 + float(c_skip) * x
        return x0

    def _mean(self, i: int, x: Tensor, eps: Tensor) -> Tensor:
        """Mean of x_next given x (B,C,H,W) at step i and the noise prediction eps (B,C,H,W)."""
        if not self.is_shortcut(i):
            return self.long.mean(as_steps(self._long_index(i), x.shape[0]), x, eps)
        x0, end = self._predict_x0(i, x, eps), self.ends[i]
        if self.rule == "lcm":
            return x0 if end < 0 else math.sqrt(self._alpha(end)) * x0
        if self.rule == "ddim":
            a_n = self._alpha(end)
            return math.sqrt(a_n) * x0 + math.sqrt(1 - a_n) * eps
        a_s = self._alpha(self._tcd_s(i))
        x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        if end < 0 or self.gamma == 0:
            return x_s
        return math.sqrt(self._alpha(end) / a_s) * x_s


# ---- the shortcut's weights ---------------------------------------------------------------------------
def load_shortcut_state(
    path: str | None, hub_id: str | None, weight_name: str | None, cache_dir: str | None
) -> tuple[dict[str, Tensor], dict | None, dict | None]:
    """(state dict, network alphas, metadata) of a LoRA in diffusers or kohya format; UserError when unavailable.

    path: a local .safetensors file or a folder holding one (diffusers' save_lora_weights layout);
    hub_id (+ weight_name): fetched through the hub cache; offline and uncached fails at once.
    """
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants

    if path is None and hub_id is None:
        raise UserError("estimator=shortft: no shortcut weights: set estimator.shortcut_path=/local/lora "
                        "(a .safetensors file or folder) or estimator.shortcut_hub_id=org/name")
    kwargs = {"weight_name": weight_name, "return_lora_metadata": True}
    if path is not None:
        local = Path(path).expanduser()
        if not local.is_absolute() and not local.exists():
            local = Path(__file__).resolve().parent.parent / local  # relative to the checkout or the installed packages
        if not local.exists():
            raise UserError(f"estimator.shortcut_path={path}: no such file or folder")
        if local.is_file():
            source, kwargs["weight_name"] = str(local.parent), local.name
        else:
            source = str(local)
    else:
        source = hub_id
        kwargs |= {"cache_dir": cache_dir, "local_files_only": constants.is_offline_mode() or None}
    try:
        loaded: Any = StableDiffusionPipeline.lora_state_dict(str(source), **kwargs)
        state, alphas, metadata = loaded
    except Exception as error:  # any failure to get the file means the same to the user: no shortcut
        if path is not None:
            raise UserError(f"estimator.shortcut_path={path}: cannot read a LoRA there ({_first_line(error)})") from None
        what = f"{hub_id}" + (f" (file {weight_name})" if weight_name else "")
        reason = "offline and not in the hub cache" if constants.is_offline_mode() else _first_line(error)
        download = f"hf download {hub_id}" + (f" {weight_name}" if weight_name else "")
        raise UserError(
            f"estimator=shortft: cannot get the shortcut LoRA {what} from the hub ({reason}); download it "
            f"(`{download}`) and pass estimator.shortcut_path=/local/file.safetensors"
        ) from None
    state = {key: value for key, value in state.items() if not key.startswith("text_encoder")}
    if not state:
        raise UserError(f"estimator=shortft: the shortcut LoRA {path or hub_id} holds no UNet layers")
    return state, alphas, metadata


def _single(steps: Tensor) -> int:
    first = int(steps[0])
    if bool((steps != first).any()):
        raise ValueError("a shortcut chain runs one transition per call")
    return first


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]

