"""`ConfigError` and the "did you mean" that every config message uses to name the closest valid choice."""

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """An unknown section/key/recipe, a value of the wrong type, or settings that contradict each other."""


class UnsupportedConfigError(ConfigError, NotImplementedError):
    """A valid config asking for what is not implemented where it runs (a family, a world size), found only by the
    running job: e.g. `parallel.shard_text_encoder` for the demo on several ranks. Exit code 2, as any ConfigError."""


def did_you_mean(word: str, choices: Iterable[object]) -> str:
    """`" (did you mean 'x'?)"` for the closest choice by spelling, else the first containing `word` (`qwen` finds
    `qwen_image_edit_r1`); "" when nothing is close."""
    choices = [str(choice) for choice in choices]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = [choice for choice in choices if word.lower() in choice.lower()][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""
