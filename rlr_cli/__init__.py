"""rlr-train: reward fine-tuning of text-to-image diffusion models."""
