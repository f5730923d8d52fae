"""The embedded toy world: coloured-shape images, a toy CLIP, a toy StableDiffusionPipeline, a judge, an aesthetic head.

Entry points for the trainer (weights load when called, never at import):
    assets.PIPELINE_DIR, assets.CLIP_DIR, assets.AESTHETIC_HEAD     ordinary folders / files to load from
    assets.train_prompts() -> list[str]                             the 192 training captions
    data.eval_prompts(n, seed=0) -> list[str]                       held-out evaluation prompts
    judge.prompt_following(images, prompts, judge=None) -> dict     judge accuracy of images vs their prompts
See docs/toy_world.md for how the weights were made and what they measure.
"""
