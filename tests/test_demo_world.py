"""nftcore.demo: determinism, each edit's ground truth changing exactly the expected pixels, the verifier's ordering
and monotonicity, and the tokenizer."""

from __future__ import annotations

import pytest
import torch

from nftcore.demo import (
    COLORS,
    EDITS,
    MAX_TOKENS,
    PAD_ID,
    VOCAB,
    DemoDataset,
    Scene,
    SceneObject,
    detokenize,
    random_task,
    render,
    stack_images,
    tokenize,
    tokenize_batch,
    verify,
    verify_images,
)
from nftcore.demo.world import move_offset, shape_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def dataset() -> DemoDataset:
    return DemoDataset(64, seed=0)


def test_deterministic_by_seed_and_index():
    a, b, c = DemoDataset(12, seed=3), DemoDataset(12, seed=3), DemoDataset(12, seed=4)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.task.target_image, y.task.target_image)
    assert [s.prompt for s in a] != [s.prompt for s in c]
    small = DemoDataset(5, seed=3)  # task i depends on (seed, i) only
    assert [s.sample_id for s in small] == a.sample_ids[:5] == [f"demo:3:{i}" for i in range(5)]
    assert all(torch.equal(small[i].image, a[i].image) and small[i].prompt == a[i].prompt for i in range(5))


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("edit", EDITS)
def test_target_differs_from_source_exactly_in_the_edited_object(edit: str, size: int):
    generator = torch.Generator().manual_seed(size)
    for _ in range(10):
        task = random_task(generator, size=size, max_objects=3, edits=(edit,))
        source, target = task.source_image, task.target_image
        assert source.shape == (3, size, size) and source.dtype == torch.float32
        assert 0 <= source.min() and source.max() <= 1
        obj = task.source_scene.objects[0]
        verb = {"recolor": "make", "remove": "remove", "move": "move"}[edit]
        assert task.instruction.split()[:4] == [verb, "the", obj.color, obj.kind]
        changed = (source != target).any(dim=0)
        old = shape_mask(obj, size)
        colour = torch.tensor(COLORS[obj.color]).view(3, 1)
        assert torch.equal(source[:, old], colour.expand(3, int(old.sum())))
        if edit == "recolor":
            assert torch.equal(changed, old)
            new_colour = torch.tensor(COLORS[task.instruction.split()[-1]]).view(3, 1)
            assert torch.equal(target[:, old], new_colour.expand(3, int(old.sum())))
        elif edit == "remove":
            assert torch.equal(changed, old) and target[:, old].abs().sum() == 0  # background shows through
        else:
            moved = task.target_scene.objects[0]
            offset = abs(moved.x - obj.x) + abs(moved.y - obj.y)
            assert offset == move_offset(size) and task.instruction.split()[-1] in ("left", "right", "up", "down")
            new = shape_mask(moved, size)
            assert torch.equal(changed, old ^ new)  # the shape slides: only pixels it leaves or enters change
            assert torch.equal(target[:, new], colour.expand(3, int(new.sum())))
        others = task.target_scene.objects if edit == "remove" else task.target_scene.objects[1:]
        assert others == task.source_scene.objects[1:]  # the rest of the scene is untouched


def test_scenes_are_valid_and_unambiguous():
    ds = DemoDataset(200, seed=1, max_objects=3)
    counts = {n: 0 for n in (1, 2, 3)}
    for task in ds.tasks:
        objects = task.source_scene.objects
        counts[len(objects)] += 1
        assert len({(o.color, o.kind) for o in objects}) == len(objects)  # "the red circle" names one object
        masks = [shape_mask(o, 32) for o in objects]
        assert int(sum(m.sum() for m in masks)) == int(torch.stack(masks).any(dim=0).sum())  # no overlaps
    assert all(c > 30 for c in counts.values()), counts
    with pytest.raises(ValueError, match="size"):
        random_task(torch.Generator(), size=15)
    with pytest.raises(ValueError, match="colors"):
        random_task(torch.Generator(), colors=("red", "mauve"))
    with pytest.raises(ValueError, match="unknown shape"):
        render(Scene(32, (SceneObject("star", "red", 16, 16),)))


def test_verifier_ordering_and_monotone_blend(dataset: DemoDataset):
    source, target = stack_images(dataset.tasks)
    noise = torch.rand(source.shape, generator=torch.Generator().manual_seed(0))
    scores = {
        "truth": verify(target, dataset.tasks),
        "half": verify(0.5 * source + 0.5 * target, dataset.tasks),
        "source": verify(source, list(dataset)),  # DemoSamples are accepted too
        "noise": verify(noise, dataset.tasks),
    }
    assert all(s.shape == (64,) and s.dtype == torch.float32 for s in scores.values())
    assert torch.all(scores["truth"] > 0.99)
    assert torch.all(scores["half"] < scores["truth"] - 0.1) and torch.all(scores["half"] > scores["source"] + 0.1)
    assert torch.all((scores["source"] > 0.3) & (scores["source"] < 0.6))
    assert torch.all(scores["noise"] < 0.05)

    alphas = torch.linspace(0, 1, 11)
    blends = torch.stack([verify((1 - a) * source + a * target, dataset.tasks) for a in alphas])  # [11, 64]
    assert torch.all(blends[1:] > blends[:-1])
    # Out-of-range values are clamped, as a display would: overshooting past white is no better than white.
    overshoot = target * 2 - 0.5
    assert torch.allclose(verify(overshoot, dataset.tasks), verify(overshoot.clamp(0, 1), dataset.tasks))


def test_half_moves_earn_partial_credit_and_blank_images_earn_no_more_than_the_source():
    generator = torch.Generator().manual_seed(11)
    tasks = [random_task(generator, edits=("move",)) for _ in range(16)]
    halfway = []
    for task in tasks:
        obj, moved = task.source_scene.objects[0], task.target_scene.objects[0]
        half = SceneObject(obj.kind, obj.color, (obj.x + moved.x) // 2, (obj.y + moved.y) // 2)
        halfway.append(render(Scene(32, (half, *task.source_scene.objects[1:]))))
    source, target = stack_images(tasks)
    partial, done, nothing = verify(torch.stack(halfway), tasks), verify(target, tasks), verify(source, tasks)
    assert torch.all(partial > nothing + 0.1) and torch.all(partial < done - 0.1), partial

    tasks = [random_task(generator, edits=("recolor", "move")) for _ in range(32)]
    source, _ = stack_images(tasks)
    assert torch.all(verify(torch.zeros_like(source), tasks) <= verify(source, tasks) + 1e-6)


def test_editing_the_wrong_object_scores_below_doing_nothing():
    generator = torch.Generator().manual_seed(7)
    checked = 0
    while checked < 10:
        task = random_task(generator, max_objects=2, edits=("remove",))
        if len(task.source_scene.objects) < 2:
            continue
        wrong = render(Scene(32, task.source_scene.objects[:1]))  # removed the *other* object
        score = verify(torch.stack([wrong, task.source_image]), [task, task])
        assert score[0] < score[1], score
        checked += 1


def test_verifier_checks_its_input(dataset: DemoDataset):
    source, target = stack_images(dataset.tasks[:2])
    with pytest.raises(ValueError, match="B = len"):
        verify(source, dataset.tasks[:3])
    with pytest.raises(ValueError, match="NaN"):
        verify(torch.full_like(source, float("nan")), dataset.tasks[:2])
    with pytest.raises(ValueError, match="must match"):
        verify_images(source[:, :, :16], source, target)


def test_tokenizer_round_trip_and_unknown_word(dataset: DemoDataset):
    for sample in dataset:
        ids = tokenize(sample.prompt)
        assert ids.dtype == torch.long and len(ids) <= MAX_TOKENS
        assert detokenize(ids) == sample.prompt
    assert tokenize("Move the RED circle  up").tolist() == tokenize("move the red circle up").tolist()
    ids, mask = tokenize_batch(["remove the blue square", "move the yellow triangle to the left"])
    assert ids.shape == mask.shape == (2, MAX_TOKENS)
    assert mask.sum(dim=1).tolist() == [4, 7] and torch.all(ids[0, 4:] == PAD_ID)
    assert detokenize(ids[0]) == "remove the blue square"
    assert len(set(VOCAB)) == len(VOCAB)
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['purple', 'hexagon'\]"):
        tokenize("make the purple hexagon red")
    with pytest.raises(ValueError, match="unknown word"):
        tokenize("remove the <pad>")
    with pytest.raises(ValueError, match="more than length"):
        tokenize("move the yellow triangle to the left", length=5)
