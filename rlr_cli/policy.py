"""The policy: a diffusers StableDiffusionPipeline sampled with DDIM, trainable through LoRA (or fully).

Trainable weights stay in fp32; the frozen parts (VAE, text encoder, UNet base) use `dtype`.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlr_cli.errors import UserError
from rlr_cli.interfaces import Rollout, Transition
from rlr_cli.sampling import DDIMChain, gaussian_log_prob

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TRAINABLE_ADAPTER = "default"  # peft's name for the LoRA that add_adapter(config) creates


def load_pipeline(path: str | None, hub_id: str | None, cache_dir: str | None, dtype: torch.dtype):
    """StableDiffusionPipeline from a local folder or a hub id; a clear UserError when it cannot be had."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    source = path or hub_id
    if source is None:
        raise UserError("no model given: set model.path=/local/folder or model.hub_id=org/name")
    if path is not None and not Path(path).is_dir():
        raise UserError(f"model.path={path} is not a folder holding a diffusers StableDiffusionPipeline")
    try:
        return StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, cache_dir=cache_dir, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, EnvironmentError) as error:
        if path is not None:
            raise UserError(f"could not load the pipeline in {path}: {error}") from None
        raise UserError(
            f"could not fetch '{hub_id}' from the hub (offline or not cached). Download it where the hub is "
            f"reachable (huggingface-cli download {hub_id}) and pass model.path=/local/folder"
        ) from None


class DiffusionPolicy:
    """Stable Diffusion sampled with DDIM + classifier-free guidance; implements interfaces.Policy."""

    def __init__(
        self,
        path: str | None = None,
        hub_id: str | None = None,
        cache_dir: str | None = None,
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        resolution: int | None = None,
        lora: dict | None = None,
        dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
        gradient_checkpointing: bool = True,
    ):
        pipe = load_pipeline(path, hub_id, cache_dir, DTYPES[dtype])
        self.source = path or hub_id
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.lora = dict(lora) if lora is not None else None
        self._make_trainable()
        self._frozen_adapters: dict[str, float] = {}  # name -> scale of extra LoRAs that never train
        self._active: tuple[str, ...] = (TRAINABLE_ADAPTER,)
        self._adapters_at = None  # inside `sampling_with`: transition i -> frozen adapters active at i
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.chain = DDIMChain(self.scheduler, num_steps, eta)
        self.num_steps, self.eta = num_steps, eta
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.gradient_checkpointing = gradient_checkpointing
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = resolution or self.unet.config.sample_size * self.vae_scale
        self.device = torch.device("cpu")
        self.trajectories_sampled = 0  # every trajectory drawn by sample(), for sample budgets

    # ---- set-up --------------------------------------------------------------------------------
    def _make_trainable(self) -> None:
        if self.lora is None:
            self.unet.requires_grad_(True)
        else:
            from peft import LoraConfig

            init = True if self.lora.get("init", "default") == "default" else self.lora["init"]
            self.unet.add_adapter(
                LoraConfig(
                    r=self.lora["rank"],
                    lora_alpha=self.lora["alpha"],
                    init_lora_weights=init,
                    target_modules=list(self.lora["target_modules"]),
                    lora_dropout=self.lora.get("dropout", 0.0),
                )
            )
        for parameter in self.trainable_parameters():
            parameter.data = parameter.data.float()
        self._trainable_names = set(self.named_trainable_parameters())

    def to(self, device: torch.device | str) -> "DiffusionPolicy":
        self.device = torch.device(device)
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.unet.named_parameters() if p.requires_grad}

    # ---- network calls ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """prompts (B) -> (text embeddings (B,L,D), negative-prompt embeddings (B,L,D) or None)."""

        def embed(texts):
            ids = self.tokenizer(
                list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            return self.text_encoder(ids)[0]

        negative = embed([self.negative_prompt] * len(prompts)) if self.guidance_scale != 1.0 else None
        return embed(prompts), negative

    def _guided_eps(self, x: Tensor, t: Tensor, embeds: Tensor, negative: Tensor | None) -> Tensor:
        dtype = self.unet.dtype
        if negative is None:
            return self.unet(x.to(dtype), t, embeds.to(dtype)).sample.float()
        both = self.unet(torch.cat([x, x]).to(dtype), t, torch.cat([negative, embeds]).to(dtype)).sample.float()
        uncond, text = both.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def eps(self, x: Tensor, i: int, cond) -> Tensor:
        """Guided noise prediction at transition i; checkpointed (one UNet call) when grad is on."""
        t = self.chain.timesteps[i].to(self.device)
        run = self._guided_eps
        if self._adapters_at is not None:  # the adapters are set inside the call, so a recomputation sees them too
            frozen = self._adapters_at(i)

            def run(*args):
                self._activate(frozen)
                return self._guided_eps(*args)

        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(run, x, t, *cond, use_reentrant=False)
        return run(x, t, *cond)

    # ---- the Policy protocol ---------------------------------------------------------------------
    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale
        return (batch, self.unet.config.in_channels, side, side)

    def sample(self, prompts: Sequence[str], *, generator: torch.Generator, grad_steps: Sequence[int] = ()) -> Rollout:
        """Sample B trajectories; the noise is drawn on the CPU generator, so runs are device-independent."""
        cond = self.encode(prompts)
        shape = self.latent_shape(len(prompts))
        self.trajectories_sampled += len(prompts)
        x = torch.randn(shape, generator=generator).to(self.device)
        noises = torch.randn((self.num_steps, *shape), generator=generator).to(self.device)
        grad_steps = set(grad_steps)
        latents, log_probs = [x], []
        for i in range(self.num_steps):
            with torch.set_grad_enabled(i in grad_steps):
                eps = self.eps(x, i, cond)
            mean, std = self.chain.mean(i, x, eps), self.chain.std(i)
            x = mean + std * noises[i]
            log_probs.append(gaussian_log_prob(x, mean.detach(), std) if std > 0 else torch.zeros(len(prompts), device=self.device))
            latents.append(x)
        return Rollout(
            latents=torch.stack(latents, dim=1),
            noises=noises.transpose(0, 1),
            log_probs=torch.stack(log_probs, dim=1).detach(),
            timesteps=self.chain.timesteps,
            cond=cond,
            prompts=list(prompts),
        )

    def transition(self, rollout: Rollout, i: int, x: Tensor, noise: Tensor | None = None) -> Transition:
        eps = self.eps(x, i, rollout.cond)
        mean, std = self.chain.mean(i, x, eps), self.chain.std(i)
        noise = rollout.noises[:, i] if noise is None else noise
        return Transition(sample=mean + std * noise, mean=mean, std=std)

    def step_log_prob(self, rollout: Rollout, i: int, reduce: str = "mean") -> Tensor:
        step = self.transition(rollout, i, rollout.latents[:, i].detach())
        return gaussian_log_prob(rollout.latents[:, i + 1], step.mean, step.std, reduce)

    def predict_x0(self, rollout: Rollout, i: int, x: Tensor) -> Tensor:
        return self.chain.predict_x0(i, x, self.eps(x, i, rollout.cond))

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B,C,h,w) -> images (B,3,H,W) in [0,1]; checkpointed when grad is on."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)

        def run(z):
            return self.vae.decode(z.to(self.vae.dtype)).sample.float()

        if self.gradient_checkpointing and torch.is_grad_enabled():
            images = checkpoint(run, latents, use_reentrant=False)
        else:
            images = run(latents)
        return (images / 2 + 0.5).clamp(0, 1)

    # ---- frozen extra adapters and another chain (ShortFT's shortcut) ----------------------------
    def add_frozen_adapter(self, name: str, state: dict, network_alphas=None, metadata=None, scale: float = 1.0) -> None:
        """Attach a LoRA (diffusers or kohya keys) that never trains and is off outside `sampling_with`."""
        from diffusers import StableDiffusionPipeline

        if self.lora is None:
            raise UserError("a frozen extra adapter needs a LoRA-trained policy (model.lora); full fine-tuning "
                            "would save the extra adapter's layers with the UNet")
        if name == TRAINABLE_ADAPTER:
            raise ValueError(f"adapter name {name!r} is the trainable adapter's")
        if name in self._frozen_adapters:  # attaching again replaces it
            self.unet.delete_adapters(name)
            del self._frozen_adapters[name]
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            StableDiffusionPipeline.load_lora_into_unet(state, network_alphas, self.unet, adapter_name=name, metadata=metadata)
        self.unet.to(self.device)
        self._frozen_adapters[name] = scale
        self._active = ()
        self._activate(())

    def _activate(self, frozen: tuple[str, ...]) -> None:
        """Make the trainable adapter plus `frozen` the active ones; only trainable weights require grad."""
        names = (TRAINABLE_ADAPTER, *frozen)
        if names == self._active:
            return
        scales = [1.0] + [self._frozen_adapters[name] for name in frozen]
        self.unet.set_adapters(list(names), weights=scales)
        for name, parameter in self.unet.named_parameters():  # peft's set_adapter flips requires_grad
            parameter.requires_grad_(name in self._trainable_names)
        self._active = names

    @contextmanager
    def sampling_with(self, chain, adapters_at, guidance_scale: float | None = None) -> Iterator["DiffusionPolicy"]:
        """Inside: `sample`, `transition`, ... run `chain` (a DDIMChain-like object with its own num_steps), with
        the frozen adapters `adapters_at(i)` active at transition i beside the trainable one, and, when given,
        another guidance scale. Outside, and on exit, the policy is its own long chain with the trainable
        adapter alone. Backpropagate inside: a recomputed UNet call re-activates its own adapters."""
        saved = self.chain, self.num_steps, self.guidance_scale
        self.chain, self.num_steps, self._adapters_at = chain, chain.num_steps, adapters_at
        if guidance_scale is not None:
            self.guidance_scale = guidance_scale
        try:
            yield self
        finally:
            self.chain, self.num_steps, self.guidance_scale = saved
            self._adapters_at = None
            self._activate(())

    # ---- adapters --------------------------------------------------------------------------------
    def save_adapter(self, directory: str) -> None:
        """LoRA: diffusers format that pipe.load_lora_weights(directory) accepts; full FT: a unet/ folder."""
        os.makedirs(directory, exist_ok=True)
        if self.lora is None:
            self.unet.save_pretrained(os.path.join(directory, "unet"), safe_serialization=True)
            return
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=TRAINABLE_ADAPTER)
        layers = convert_state_dict_to_diffusers(state)
        metadata = {"r": self.lora["rank"], "lora_alpha": self.lora["alpha"],
                    "target_modules": sorted(self.lora["target_modules"])}
        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )

    def load_adapter(self, directory: str) -> None:
        """Load what save_adapter wrote, tensor for tensor."""
        from safetensors.torch import load_file

        if self.lora is None:
            state = load_file(os.path.join(directory, "unet", "diffusion_pytorch_model.safetensors"))
            self.unet.load_state_dict(state, strict=True)
            return
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state = load_file(os.path.join(directory, LORA_WEIGHTS))
        state = {key.removeprefix("unet."): value for key, value in state.items()}
        result = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(state), TRAINABLE_ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise UserError(f"adapter in {directory} does not fit this model: unexpected keys {unexpected[:3]}")
