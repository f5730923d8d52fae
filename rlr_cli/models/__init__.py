"""Model families: one module each (sd.py: Stable Diffusion 1.x). A family module holds what differs
between pipelines (loading, prompt encoding, the guided denoiser call, decoding, its LoRA file format)
and a `policy(...)` builder that a configs/model/*.yaml names as its `_target_`."""
