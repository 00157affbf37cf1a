"""Rewards for instruction-based editing: (edited, source, prompt, metadata) -> scores and a validity mask.

- `base`: the interface (`RewardResult`, `RewardFn`, `WeightedSum`).
- `mllm`: the Qwen2.5-VL judge (`MLLMScorer`) and its reward wrapper (`MLLMReward`), in process.
- `server` / `http_client`: the same judge behind a small JSON-over-HTTP server, and `HTTPReward`, its client.
- `prompt`: the rubric (template text, answer tokens and values).

The judge is separate from the policy: nothing here imports `nftcore.models`. Importing this package costs torch,
PIL and `nftcore.ops`; transformers is imported when a model is loaded.

See docs/ALGORITHM.md §3.
"""

from .base import RewardFn, RewardResult, WeightedSum, format_error_summary, summarize_errors
from .http_client import HTTPReward
from .mllm import MLLMReward, MLLMScorer, answer_token_ids
from .prompt import DIGIT_RUBRIC, YES_NO_RUBRIC, Rubric, digit_rubric

__all__ = ["DIGIT_RUBRIC", "HTTPReward", "MLLMReward", "MLLMScorer", "RewardFn", "RewardResult", "Rubric",
           "WeightedSum", "YES_NO_RUBRIC", "answer_token_ids", "digit_rubric", "format_error_summary",
           "summarize_errors"]
