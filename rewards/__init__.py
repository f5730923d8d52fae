"""Reward models: images (B,3,H,W) in [0,1] and prompts -> (B,), higher is better.

Each reward is a class whose weights load in __init__ (never at import) and which declares
`differentiable` truthfully; see rlr_cli.interfaces.Reward for the protocol.
"""
