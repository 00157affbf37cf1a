"""`ConfigError` and the "did you mean" every config message uses.

A config mistake should be fixable from the message alone: it names the offending section, key or value, lists the
valid ones, and suggests the closest (it is `optim.lr`, not `optim.learning_rate`).
"""

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """An unknown section/key/recipe, a value of the wrong type, or settings that contradict each other."""


class UnsupportedConfigError(ConfigError, NotImplementedError):
    """A valid config asking for something not implemented in this setting (a family, a world size): e.g.
    `parallel.shard_text_encoder` for the demo family on several ranks. Raised where only the running job can tell
    (the world size is not part of the config); a ConfigError to `python -m nftcore.train` (exit code 2), and a
    NotImplementedError to code that already expects one."""


def did_you_mean(word: str, choices: Iterable[object]) -> str:
    """`" (did you mean 'x'?)"` for the closest choice, or "" when nothing is close.

    Close means similar spelling (difflib), or, failing that, containing the word: `qwen` finds `qwen_image_edit_r1`.
    """
    choices = [str(choice) for choice in choices]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = [choice for choice in choices if word.lower() in choice.lower()][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""
