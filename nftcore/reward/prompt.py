"""The judge's rubric: the text after the two images, and which answer tokens are read with what value.

Edit-R1 scores with Qwen2.5-VL on a non-CoT prompt that names the two images, gives the instruction and the per-sample
requirement, asks for a 0-5 rating of accuracy and quality with anchors for 0 and 5, and asks for the number directly.
The wording below is our own paraphrase of that structure. The score is the expected answer value under the softmax
over the answer tokens' logits, mapped to [0, 1]. The Yes/No variant
(UniWorld-V2 Table 4) reads p(Yes) / (p(Yes) + p(No)) the same way, with values Yes = 1, No = 0.

See docs/ALGORITHM.md §3.2 and §3.3.
"""

from __future__ import annotations

from dataclasses import dataclass

DIGIT_TEMPLATE = (
    "You are shown two images: first the original image, then an edited version of it. Judge the edited image "
    "against the editing instruction and the requirements below.\n"
    "Instruction: {instruction}\n"
    "Requirements: {requirement}\n"
    "Rate the edit from {low} to {high}, considering both how accurately the instruction was carried out and the "
    "visual quality of the result.\n"
    "{low}: the wrong object was edited, or the edit does not meet the requirements.\n"
    "{high}: the correct object was edited, the requirements are met, and the image quality is high.\n"
    "Answer with the number directly: reply with a single digit from {low} to {high} and nothing else."
)

YES_NO_TEMPLATE = (
    "You are shown two images: first the original image, then an edited version of it. Judge the edited image "
    "against the editing instruction and the requirements below.\n"
    "Instruction: {instruction}\n"
    "Requirements: {requirement}\n"
    "Was the instruction carried out on the correct object, are the requirements met, and is the visual quality "
    "high? Answer with Yes or No directly."
)


@dataclass(frozen=True)
class Rubric:
    """A prompt template plus the answer tokens read at the first generated position and their values.

    `template` may use {instruction}, {requirement}, {low} and {high} (the smallest and largest value). Each answer
    must be a single token of the judge's tokenizer (the scorer checks). score = (sum_k p_k v_k - min v) /
    (max v - min v), with p the softmax over the answers' logits only: in [0, 1] whatever the values.
    """

    template: str
    answers: tuple[str, ...]
    values: tuple[float, ...]

    def __post_init__(self):
        if len(self.answers) != len(self.values) or len(self.answers) < 2:
            raise ValueError(f"a rubric needs >= 2 answers with one value each, got answers={self.answers!r} "
                             f"values={self.values!r}")
        if len(set(self.answers)) != len(self.answers):
            raise ValueError(f"rubric answers must be distinct, got {self.answers!r}")
        if max(self.values) == min(self.values):
            raise ValueError(f"rubric values must not all be equal, got {self.values!r}")

    def render(self, instruction: str, requirement: str | None) -> str:
        low, high = min(self.values), max(self.values)
        fmt = (lambda v: str(int(v)) if float(v).is_integer() else str(v))
        return self.template.format(instruction=instruction, requirement=requirement or "", low=fmt(low),
                                    high=fmt(high))


def digit_rubric(low: int = 0, high: int = 5, template: str = DIGIT_TEMPLATE) -> Rubric:
    """The expected-digit rubric over low..high (Edit-R1: 0..5). Qwen2 splits numbers into single digits, so the
    range must stay within 0..9 for every answer to be one token."""
    if not 0 <= low < high <= 9:
        raise ValueError(f"digit range must satisfy 0 <= low < high <= 9 (one token per answer), got {low}..{high}")
    return Rubric(template, tuple(str(d) for d in range(low, high + 1)), tuple(float(d) for d in range(low, high + 1)))


DIGIT_RUBRIC = digit_rubric()
YES_NO_RUBRIC = Rubric(YES_NO_TEMPLATE, ("Yes", "No"), (1.0, 0.0))
