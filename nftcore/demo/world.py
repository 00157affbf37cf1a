"""A procedurally generated editing world that ships with the code: scenes, edits, ground truth, a tiny vocabulary.

The real task (Qwen-Image-Edit + a 32B MLLM judge) cannot run in CPU CI, so the trainer's end-to-end demo needs a
stand-in that keeps the shape of the problem — a source image, an instruction, a judge — while being small enough
for a tiny pixel-space MMDiT to learn in minutes. Every scene here is a description (coloured shapes on a black
background at integer positions), so every edit has an exact ground-truth image, rendered from the edited
description, and `nftcore.demo.verifier` can score any output densely against it.

The world, and why it is this small:

- Images are `size` × `size` RGB (default 32, 16–64 allowed) on a black background; each object is a circle,
  square or triangle of half-size `size // 8` (a 9 px box at 32) in one of seven saturated, easily named colours.
  Objects never overlap, keep a 1 px gap, and no two share (colour, shape), so "the red circle" is unambiguous.
- Three edits, each changing only the pixels of one object: recolour ("make the red circle blue"), remove
  ("remove the green square") and move by `size // 4` pixels ("move the yellow triangle to the left", "... up").
  "Add" is left out: without a position in the instruction its ground truth would not be unique.
- Scenes hold 1–2 objects by default (`max_objects`, at most 3).
- Randomness comes only from the `torch.Generator` passed in, so a (seed, index) pair names one task forever
  (for a given version of this file: changing the sampling code changes the tasks).

The tokenizer's vocabulary is exactly the instruction grammar's words; ids are part of a trained demo model's
interface, so new words go at the end of `VOCAB`.
"""

from __future__ import annotations

import functools
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nftcore.data.edit_dataset import derive_seed, epoch_indices

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND = (0.0, 0.0, 0.0)  # black: every palette colour is far from it, so "removed" is unmistakable
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EDITS = ("recolor", "remove", "move")
MIN_SIZE, MAX_SIZE = 16, 64
MAX_OBJECTS = 3  # more would not fit comfortably at 16 px with the 1 px gap

PAD = "<pad>"
VOCAB: tuple[str, ...] = (PAD, "make", "remove", "move", "the", "to", "left", "right", "up", "down", *COLORS, *SHAPES)
WORD_TO_ID = {word: i for i, word in enumerate(VOCAB)}
PAD_ID = WORD_TO_ID[PAD]
MAX_TOKENS = 7  # "move the yellow triangle to the left"


# ----------------------------------------------------------------------------------------------------------------
# Scenes and rendering


@dataclass(frozen=True)
class SceneObject:
    """One shape; (x, y) is its centre in pixels, y pointing down."""

    kind: str  # one of SHAPES
    color: str  # one of COLORS
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A size × size picture described exactly: the objects, in drawing order (they never overlap)."""

    size: int
    objects: tuple[SceneObject, ...]

    @property
    def radius(self) -> int:
        """Half-size of every object's bounding box, in pixels."""
        return object_radius(self.size)


def object_radius(size: int) -> int:
    return size // 8


def move_offset(size: int) -> int:
    return size // 4


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ys, xs


def shape_mask(obj: SceneObject, size: int) -> torch.Tensor:
    """Bool [size, size]: the pixels `obj` covers (a cached tensor: do not modify it)."""
    return _shape_mask(obj.kind, obj.x, obj.y, size)


@functools.lru_cache(maxsize=16384)  # every (shape, position) at 64 px is 3 · 49² ≈ 7k masks of 4 KB at most
def _shape_mask(kind: str, x: int, y: int, size: int) -> torch.Tensor:
    """All shapes fit the box |dx|, |dy| ≤ r and have hard edges, so edit regions are exact."""
    r = object_radius(size)
    ys, xs = _grid(size)
    dx, dy = xs - x, ys - y
    if kind == "square":
        return (dx.abs() <= r) & (dy.abs() <= r)
    if kind == "circle":
        return dx * dx + dy * dy <= r * r + r  # "+ r" rounds the disc on a pixel grid (no single-pixel nubs)
    if kind == "triangle":  # apex up: row dy ∈ [-r, r] spans |dx| ≤ (dy + r) / 2
        return (dy.abs() <= r) & (2 * dx.abs() <= dy + r)
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


_PALETTE = torch.tensor([BACKGROUND, *COLORS.values()])  # [1 + len(COLORS), 3]; row 0 is the background
_COLOR_INDEX = {name: i + 1 for i, name in enumerate(COLORS)}


def render(scene: Scene) -> torch.Tensor:
    """float32 [3, size, size] in [0, 1]: the background, then each object in its flat colour."""
    index = torch.zeros(scene.size, scene.size, dtype=torch.long)  # palette row per pixel: one gather, few small ops
    for obj in scene.objects:
        if obj.color not in _COLOR_INDEX:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {tuple(COLORS)}")
        index.masked_fill_(shape_mask(obj, scene.size), _COLOR_INDEX[obj.color])
    # index_select, not _PALETTE[index]: advanced indexing costs milliseconds per call on a 32 × 32 map on CPU
    return _PALETTE.index_select(0, index.view(-1)).t().reshape(3, scene.size, scene.size)


# ----------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class EditTask:
    """A source scene, an instruction, and the exact result: the edited scene and both renders ([3, H, W] float)."""

    source_scene: Scene
    instruction: str
    target_scene: Scene
    source_image: torch.Tensor
    target_image: torch.Tensor
    edit: str  # one of EDITS
    requirement: str  # the judge-facing requirement text, as in the real dataset's "requirement" field


def _requirement(edit: str, obj: SceneObject, size: int, detail: str) -> str:
    keep = "The background and every other object stay exactly as they were."
    if edit == "recolor":
        return f"Only the {obj.name} changes: it becomes {detail}, keeping its shape, size and position. {keep}"
    if edit == "remove":
        return f"The {obj.name} disappears completely and its area shows the plain black background. {keep}"
    return (
        f"The {obj.name} moves {move_offset(size)} pixels {detail}, keeping its colour, shape and size; "
        f"its old place shows the plain black background. {keep}"
    )


def _instruction(edit: str, obj: SceneObject, detail: str) -> str:
    if edit == "recolor":
        return f"make the {obj.name} {detail}"
    if edit == "remove":
        return f"remove the {obj.name}"
    return f"move the {obj.name} {'to the ' + detail if detail in ('left', 'right') else detail}"


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _choice(generator: torch.Generator, options: Sequence[Any]) -> Any:
    return options[_randint(generator, 0, len(options) - 1)]


def _fits(objects: Sequence[SceneObject], size: int) -> bool:
    """Every box inside the image, and every pair of boxes at least 1 px apart (so masks never touch)."""
    r = object_radius(size)
    if any(not (r <= o.x <= size - 1 - r and r <= o.y <= size - 1 - r) for o in objects):
        return False
    return all(
        max(abs(a.x - b.x), abs(a.y - b.y)) >= 2 * r + 2 for i, a in enumerate(objects) for b in objects[i + 1 :]
    )


def _check_options(name: str, values: Sequence[str] | None, allowed: Sequence[str], minimum: int) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(allowed if values is None else values))  # deduplicated, order kept
    unknown = [v for v in values if v not in allowed]
    if unknown or len(values) < minimum:
        raise ValueError(f"{name} must hold ≥ {minimum} distinct values from {tuple(allowed)}, got {values!r}")
    return values


def random_task(
    generator: torch.Generator,
    *,
    size: int = 32,
    max_objects: int = 2,
    colors: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    edits: Sequence[str] | None = None,
) -> EditTask:
    """Draw one task: an edit type, a scene of 1–`max_objects` objects, the object to edit and the edit's detail.

    Scenes are drawn by rejection until the objects fit and the edit is valid (a moved object stays inside and
    clear of the others; a recolour has a new colour that keeps (colour, shape) unique). The edited object is the
    scene's first; object order is random, so this is no bias.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be an int in [1, {MAX_OBJECTS}], got {max_objects!r}")
    colors = _check_options("colors", colors, tuple(COLORS), 2)
    shapes = _check_options("shapes", shapes, SHAPES, 1)
    edits = _check_options("edits", edits, EDITS, 1)
    r, offset = object_radius(size), move_offset(size)
    pairs = [(c, s) for c in colors for s in shapes]

    edit = _choice(generator, edits)
    # Drawn once (redrawing on rejection would favour fewer objects), and capped so that the edit is always possible:
    # a recolour needs a colour that no same-shaped object has yet.
    most = min(max_objects, len(pairs), len(colors) - 1 if edit == "recolor" else len(pairs))
    count = _randint(generator, 1, most)
    for _ in range(1000):
        chosen = torch.randperm(len(pairs), generator=generator)[:count].tolist()
        objects = []
        for j in chosen:
            x, y = _randint(generator, r, size - 1 - r), _randint(generator, r, size - 1 - r)
            objects.append(SceneObject(kind=pairs[j][1], color=pairs[j][0], x=x, y=y))
        if not _fits(objects, size):
            continue
        obj, others = objects[0], objects[1:]
        if edit == "recolor":
            taken = {(o.color, o.kind) for o in objects}
            new_colors = [c for c in colors if (c, obj.kind) not in taken]
            if not new_colors:
                continue
            detail = _choice(generator, new_colors)
            edited: list[SceneObject] = [SceneObject(obj.kind, detail, obj.x, obj.y), *others]
        elif edit == "remove":
            detail, edited = "", list(others)
        else:
            detail = _choice(generator, tuple(DIRECTIONS))
            dx, dy = DIRECTIONS[detail]
            edited = [SceneObject(obj.kind, obj.color, obj.x + dx * offset, obj.y + dy * offset), *others]
            if not _fits(edited, size):
                continue
        source, target = Scene(size, tuple(objects)), Scene(size, tuple(edited))
        return EditTask(
            source_scene=source,
            instruction=_instruction(edit, obj, detail),
            target_scene=target,
            source_image=render(source),
            target_image=render(target),
            edit=edit,
            requirement=_requirement(edit, obj, size, detail),
        )
    raise RuntimeError(f"could not place a valid {edit!r} scene at size {size} in 1000 tries")


# ----------------------------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class DemoSample:
    """A demo dataset item, shaped like the real dataset's `EditSample` but with a tensor image and its task."""

    sample_id: str
    prompt: str
    requirement: str
    image: torch.Tensor  # the source image, float32 [3, size, size] in [0, 1]
    task: EditTask
    metadata: dict[str, Any] = field(default_factory=dict)


class DemoDataset:
    """`num_tasks` demo tasks; task i is drawn from its own generator seeded by (seed, i).

    Task i therefore does not depend on `num_tasks` (a bigger dataset extends a smaller one), and its sample id
    `demo:{seed}:{i}` is stable. Tasks are built eagerly: a 32 px task renders in well under a millisecond.
    """

    def __init__(self, num_tasks: int, seed: int = 0, size: int = 32, *, max_objects: int = 2, **task_options: Any):
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int ≥ 1, got {num_tasks!r}")
        self.seed, self.size = seed, size
        self.tasks: tuple[EditTask, ...] = tuple(
            random_task(
                torch.Generator().manual_seed(derive_seed("demo", seed, i)),
                size=size,
                max_objects=max_objects,
                **task_options,
            )
            for i in range(num_tasks)
        )
        self.sample_ids: list[str] = [f"demo:{seed}:{i}" for i in range(num_tasks)]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> DemoSample:
        task = self.tasks[index]
        return DemoSample(
            sample_id=self.sample_ids[index],
            prompt=task.instruction,
            requirement=task.requirement,
            image=task.source_image,
            task=task,
            metadata={"edit": task.edit},
        )

    def epoch_prompts(self, num_groups: int, epoch: int, seed: int, banned: Container[str] = frozenset()) -> list[int]:
        """This epoch's group indices, drawn exactly as for the real dataset (`nftcore.data.epoch_indices`)."""
        return epoch_indices(self.sample_ids, num_groups, epoch, seed, banned)


def stack_images(tasks: Sequence[EditTask | DemoSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) float32 [B, 3, H, W] for a batch of tasks (or demo samples)."""
    tasks = [t.task if isinstance(t, DemoSample) else t for t in tasks]
    if not tasks:
        raise ValueError("need at least one task")
    return torch.stack([t.source_image for t in tasks]), torch.stack([t.target_image for t in tasks])


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenize(instruction: str, length: int | None = None) -> torch.Tensor:
    """Instruction -> int64 [n] word ids (lower-cased, split on whitespace), or [length] right-padded with PAD_ID.

    An unknown word, or more words than `length`, is a ValueError naming it: the demo's text encoder has an
    embedding row only for the grammar's words.
    """
    words = instruction.lower().split()
    unknown = [w for w in words if w not in WORD_TO_ID or w == PAD]
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in {instruction!r}; the demo vocabulary is {VOCAB[1:]}")
    if not words:
        raise ValueError("empty instruction")
    ids = [WORD_TO_ID[w] for w in words]
    if length is not None:
        if len(ids) > length:
            raise ValueError(f"{instruction!r} has {len(ids)} words, more than length={length}")
        ids += [PAD_ID] * (length - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def tokenize_batch(instructions: Sequence[str], length: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [B, length], mask bool [B, length]) with True on real words."""
    ids = torch.stack([tokenize(s, length) for s in instructions])
    return ids, ids != PAD_ID


def detokenize(ids: torch.Tensor | Sequence[int]) -> str:
    """Word ids -> the instruction text, padding dropped (the inverse of `tokenize` on lower-case text)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    bad = [i for i in ids if not 0 <= i < len(VOCAB)]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary of {len(VOCAB)}")
    return " ".join(VOCAB[i] for i in ids if i != PAD_ID)
