"""Small neutral helpers shared by the policy models and the rewards.

Nothing here imports `nftcore.models` or `nftcore.reward`, and this package's `__init__` imports nothing heavy: pull in
what you need from the submodule (`from nftcore.utils.qwen_vl import load_qwen_vl_processor`), which imports
transformers only then.

Layer 0 of docs/DESIGN.md §1.
"""
