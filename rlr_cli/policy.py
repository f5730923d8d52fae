"""The family-independent policy: the sampling loop with per-step log-probabilities, transitions,
decoding and the LoRA adapters, over a model family (rlr_cli/models/) and a sampling chain.

Trainable weights stay in fp32; the family's frozen parts use the model's dtype. The chain is an
argument (ShortFT samples its shortcut chain with the same policy); a rollout remembers its chain.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlr_cli import lora
from rlr_cli.errors import UserError
from rlr_cli.interfaces import Chain, Family, Rollout, Transition
from rlr_cli.lora import LoraOptions
from rlr_cli.prompts import StagedPrompt, stage_count
from rlr_cli.sampling import as_steps, column, gaussian_log_prob, map_batch, start_noise


@dataclass(frozen=True)
class StagedCond:
    """DiffCoT's conditioning: one family conditioning per stage, and the stage of each transition."""

    stages: tuple[Any, ...]
    stage_of: tuple[int, ...]  # ints, not a tensor: estimators.common.select must not index it by sample

    def at(self, steps: Tensor) -> Any:
        """The conditioning of each sample's transition (B,): one stage's, or a row-wise merge of several."""
        stage = torch.tensor(self.stage_of)[steps.cpu()]
        if bool((stage == stage[0]).all()):
            return self.stages[int(stage[0])]
        b = len(steps)

        def rows(tensors: list[Tensor]) -> Tensor:  # row k from stage[k]'s conditioning
            return torch.stack(tensors)[stage.to(tensors[0].device), torch.arange(b, device=tensors[0].device)]
        return map_batch(list(self.stages), rows, b)


class DiffusionPolicy:
    """A model family sampled on a chain with guidance; implements interfaces.Policy and its extensions."""

    def __init__(self, family: Family, chain: Chain, guidance_scale: float, lora_options: LoraOptions | None,
                 gradient_checkpointing: bool):
        self.family, self.chain, self.guidance_scale = family, chain, guidance_scale
        self.lora, self.gradient_checkpointing = lora_options, gradient_checkpointing
        network = family.denoiser
        for module in family.modules():
            module.requires_grad_(False).eval()
        if lora_options is None:
            network.requires_grad_(True)
        else:
            lora.add_trainable(network, lora_options)
        for parameter in self.trainable_parameters():
            parameter.data = parameter.data.float()
        self.adapters = lora.AdapterSet(network, family.lora_format)
        self.device = torch.device("cpu")
        self.trajectories_sampled = 0  # every trajectory drawn by sample(), for sample budgets

    @property
    def num_steps(self) -> int:
        return self.chain.num_steps

    @property
    def scheduler_config(self) -> Any:
        return self.family.scheduler_config

    def to(self, device: torch.device | str) -> DiffusionPolicy:
        self.device = torch.device(device)
        for module in self.family.modules():
            module.to(self.device)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.family.denoiser.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.family.denoiser.named_parameters() if p.requires_grad}

    # ---- one denoiser call ----------------------------------------------------------------------
    def _guidance(self, chain: Chain) -> float:
        return self.guidance_scale if chain.guidance_scale is None else chain.guidance_scale

    def model_output(self, chain: Chain, steps: Tensor, x: Tensor, cond: Any, recompute: bool) -> Tensor:
        """Guided model output at each sample's transition steps (B,), in one denoiser call.

        `recompute`: checkpoint the call (its activations are recomputed in backward) when grad is on and
        the model asks for it; worth it only inside a graph of several calls. The adapters of the step
        are activated inside the call, so a recomputation sees them too.
        """
        frozen = {chain.adapters(int(i)) for i in steps.unique()}
        if len(frozen) > 1:
            raise ValueError(f"one denoiser call cannot mix adapter sets {sorted(frozen)}")
        adapters, guidance = frozen.pop(), self._guidance(chain)
        t = chain.timesteps[steps].to(self.device)
        if isinstance(cond, StagedCond):
            cond = cond.at(steps)

        def run(x: Tensor, t: Tensor) -> Tensor:
            self.adapters.activate(adapters)
            return self.family.predict(x, t, cond, guidance)

        if recompute and self.gradient_checkpointing and torch.is_grad_enabled():
            out = checkpoint(run, x, t, use_reentrant=False)
        else:
            out = run(x, t)
        assert isinstance(out, Tensor)
        return out

    def _step(self, chain: Chain, steps: Tensor, x: Tensor, cond: Any, recompute: bool = True) -> tuple[Tensor, Tensor]:
        """(mean of x_next, std (B,) float64) of each sample's transition."""
        out = self.model_output(chain, steps, x, cond, recompute)
        return chain.mean(steps, x, out), chain.std(steps)

    # ---- the Policy protocol ---------------------------------------------------------------------
    def sample(self, prompts: Sequence[str], *, generator: torch.Generator, grad_steps: Sequence[int] = (),
               chain: Chain | None = None, kl: bool = False, shared_start: int = 1, keep_x0: bool = False) -> Rollout:
        """Sample B trajectories; the noise is drawn on the CPU generator, so runs are device-independent."""
        chain = chain or self.chain
        cond = self._encode(prompts, self._guidance(chain) != 1.0, chain.num_steps)
        shape = self.family.latent_shape(len(prompts))
        self.trajectories_sampled += len(prompts)
        x = start_noise(shape, shared_start, generator).to(self.device)
        noises = torch.randn((chain.num_steps, *shape), generator=generator).to(self.device)
        with_grad = set(grad_steps)
        latents, log_probs, kls, x0s = [x], [], [], []
        for i in range(chain.num_steps):
            steps = as_steps(i, len(prompts))
            with torch.set_grad_enabled(i in with_grad):
                out = self.model_output(chain, steps, x, cond, recompute=True)
                mean, std = chain.mean(steps, x, out), chain.std(steps)
                if kl and i in with_grad:
                    kls.append(self._kl(chain, steps, x, cond, mean, std, "sum"))
            if keep_x0:
                x0s.append(chain.predict_x0(steps, x.detach(), out.detach()))
            x = mean + column(std, mean) * noises[i]
            stochastic = bool((std > 0).all())
            log_probs.append(gaussian_log_prob(x, mean.detach(), std) if stochastic else x.new_zeros(len(prompts)))
            latents.append(x)
        total_kl = (torch.stack(kls).sum(dim=0) if kls else x.new_zeros(len(prompts))) if kl else None
        return Rollout(latents=torch.stack(latents, dim=1), noises=noises.transpose(0, 1),
                       log_probs=torch.stack(log_probs, dim=1).detach(), chain=chain, cond=cond, prompts=list(prompts),
                       kl=total_kl, x0_predictions=torch.stack(x0s, dim=1) if keep_x0 else None)

    def _encode(self, prompts: Sequence[str], negative: bool, num_steps: int) -> Any:
        """The family's conditioning; with staged prompts (DiffCoT), one per stage over equal chain segments."""
        stages = stage_count(prompts, "prompts")
        if not stages:
            return self.family.encode(prompts, negative=negative)
        per_stage = [[p.stages[s] if isinstance(p, StagedPrompt) else p for p in prompts] for s in range(stages)]
        return StagedCond(stages=tuple(self.family.encode(p, negative=negative) for p in per_stage),
                          stage_of=tuple(i * stages // num_steps for i in range(num_steps)))

    def transition(self, rollout: Rollout, i: int, x: Tensor, noise: Tensor | None = None) -> Transition:
        mean, std = self._step(rollout.chain, as_steps(i, x.shape[0]), x, rollout.cond)
        noise = rollout.noises[:, i] if noise is None else noise
        return Transition(sample=mean + column(std, mean) * noise, mean=mean, std=std)

    def step_log_prob(self, rollout: Rollout, steps: int | Tensor, reduce: str = "mean") -> Tensor:
        """One denoiser call differentiated on its own: never checkpointed (recomputing saves nothing)."""
        return self._log_prob(rollout, steps, reduce, kl=False)[0]

    def step_log_prob_kl(self, rollout: Rollout, steps: int | Tensor, reduce: str = "mean") -> tuple[Tensor, Tensor]:
        log_prob, kl = self._log_prob(rollout, steps, reduce, kl=True)
        assert kl is not None
        return log_prob, kl

    def _log_prob(self, rollout: Rollout, steps: int | Tensor, reduce: str, kl: bool) -> tuple[Tensor, Tensor | None]:
        b = rollout.latents.shape[0]
        steps = as_steps(steps, b)
        rows = torch.arange(b)
        x, x_next = rollout.latents[rows, steps].detach(), rollout.latents[rows, steps + 1]
        mean, std = self._step(rollout.chain, steps, x, rollout.cond, recompute=False)
        divergence = self._kl(rollout.chain, steps, x, rollout.cond, mean, std, reduce) if kl else None
        return gaussian_log_prob(x_next, mean, std, reduce), divergence

    def _kl(self, chain: Chain, steps: Tensor, x: Tensor, cond: Any, mean: Tensor, std: Tensor, reduce: str) -> Tensor:
        """(B,) KL(N(mean, std^2) || N(mean_ref, std^2)) = ||mean - mean_ref||^2 / (2 std^2), summed (the
        Gaussians' KL) or averaged over latent dims; the reference is the model with every adapter off, at
        the same input x (one more denoiser call, without grad)."""
        if bool((std <= 0).any()):
            raise ValueError("the KL of a deterministic step (std = 0) is undefined")
        with torch.no_grad(), self.adapters.disabled():
            reference = chain.mean(steps, x, self.model_output(chain, steps, x.detach(), cond, recompute=False))
        squared = ((mean.float() - reference.float()) ** 2).flatten(1)
        squared = squared.mean(dim=1) if reduce == "mean" else squared.sum(dim=1)
        return squared / (2 * std.to(squared) ** 2)

    def predict_x0(self, rollout: Rollout, i: int, x: Tensor) -> Tensor:
        steps = as_steps(i, x.shape[0])
        return rollout.chain.predict_x0(steps, x, self.model_output(rollout.chain, steps, x, rollout.cond, True))

    def eval_chain(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> Chain:
        """The chain held-out samples are drawn on: the training chain with these settings replaced (None
        keeps the training value)."""
        if num_steps is None and eta is None and guidance_scale is None:
            return self.chain
        return self.chain.resampled(num_steps, eta, guidance_scale)

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        return self.family.overlong(prompts)

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B,C,h,w) -> images (B,3,H,W) in [0,1]; checkpointed when grad is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            images = checkpoint(self.family.decode, latents, use_reentrant=False)
        else:
            images = self.family.decode(latents)
        assert isinstance(images, Tensor)
        return (images / 2 + 0.5).clamp(0, 1)

    # ---- adapters --------------------------------------------------------------------------------
    def add_frozen_adapter(self, name: str, state: dict, alphas: dict | None, metadata: dict | None,
                           scale: float) -> None:
        """Attach a LoRA (diffusers or kohya keys) that never trains; active where a chain asks for it."""
        if self.lora is None:
            raise UserError("a frozen extra adapter needs a LoRA-trained policy (model.lora); full fine-tuning "
                            "would save the extra adapter's layers with the denoiser")
        self.adapters.add(name, state, alphas, metadata, scale)
        self.family.denoiser.to(self.device)

    def save_adapter(self, directory: str) -> None:
        """LoRA: a diffusers LoRA file that pipe.load_lora_weights(directory) accepts; full FT: the denoiser."""
        if self.lora is None:
            folder = os.path.join(directory, self.family.lora_format.prefix)
            self.family.denoiser.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
            return
        lora.write(directory, self.family.denoiser, self.family.lora_format, self.lora.metadata())

    def load_adapter(self, directory: str) -> None:
        """Load what save_adapter wrote, tensor for tensor."""
        if self.lora is None:
            from safetensors.torch import load_file

            state = load_file(os.path.join(directory, self.family.lora_format.prefix, "diffusion_pytorch_model.safetensors"))
            self.family.denoiser.load_state_dict(state, strict=True)
            return
        lora.load_into(self.family.denoiser, lora.read(directory, self.family.lora_format), directory)
