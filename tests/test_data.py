"""Tests for latentgen.data: the shapes data set, image folders, inpainting masks and the checker.

References are independent of the code under test: the caption grammar is re-written here as a
regex, shape interiors and areas come from closed-form geometry, and relations are recomputed from
the scene's centres.
"""

import json
import math
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from latentgen.data import (
    ImageFolderDataset,
    ShapesDataset,
    check_image,
    open_dataset,
    parse_caption,
    random_mask,
    shapes_sample,
)
from latentgen.errors import InputError

BG = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
PALETTE = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "purple": (150, 50, 200),
}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_OBJ = r"a (small |large )?(red|orange|yellow|green|blue|purple) (circle|square|triangle|ring)"
GRAMMAR = re.compile(_OBJ + r"( (left of|right of|above|below) " + _OBJ + r")?( on a (white|black|gray) background)?")
N = 500


@pytest.fixture(scope="module")
def samples():
    return [shapes_sample(seed) for seed in range(N)]


def full_caption(scene) -> str:
    """A caption with every optional phrase present, built from the scene."""
    say = lambda o: f"a {o.size} {o.colour} {o.shape}"  # noqa: E731
    text = say(scene.objects[0])
    if scene.relation:
        text += f" {scene.relation} {say(scene.objects[1])}"
    return text + f" on a {scene.background} background"


def dominant_relation(a, b) -> str:
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) > abs(dy):
        return "right of" if dx > 0 else "left of"
    return "below" if dy > 0 else "above"


def pixel_fully_inside(shape, d, cx, cy, px, py) -> np.ndarray:
    """Pixels [px, px+1) x [py, py+1) lying wholly inside the shape (closed-form, conservative)."""
    corners = [(px + i - cx, py + j - cy) for i in (0, 1) for j in (0, 1)]
    r = d / 2
    if shape == "square":
        return np.all([(abs(x) <= r) & (abs(y) <= r) for x, y in corners], axis=0)
    if shape == "triangle":  # convex: all corners inside; apex (0,-r), base y=r, |x| <= (y+r)/2
        return np.all([(y <= r) & (abs(x) <= (y + r) / 2) for x, y in corners], axis=0)
    outer = np.all([x * x + y * y <= r * r for x, y in corners], axis=0)
    if shape == "circle":
        return outer
    centre_dist = np.hypot(px + 0.5 - cx, py + 0.5 - cy)
    return outer & (centre_dist - math.sqrt(0.5) >= r / 2)  # ring: clear of the hole (inner d/2)


def area(shape, d) -> float:
    return {"square": d * d, "circle": math.pi * d * d / 4, "triangle": d * d / 2, "ring": math.pi * d * d / 4 * 0.75}[
        shape
    ]


def test_deterministic_by_seed_and_dataset_items():
    a, b, c = shapes_sample(7), shapes_sample(7), shapes_sample(8)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1:] == b[1:]
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    ds = ShapesDataset(4, seed=5)
    item = ds[2]
    assert len(ds) == 4 and item["index"] == 2 and item["caption"] == shapes_sample(7)[1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    expected = torch.from_numpy(np.asarray(a[0]).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(item["image"], expected, atol=1e-6, rtol=0)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    with pytest.raises(IndexError):
        ds[4]
    for size in (32, 128):
        image, _, scene = shapes_sample(3, size)
        assert image.size == (size, size) and ShapesDataset(1, 3, size)[0]["image"].shape == (3, size, size)
        assert scene.objects[0].d == shapes_sample(3)[2].objects[0].d * size / 64


def test_captions_follow_grammar_and_match_scene(samples):
    omitted_size = omitted_bg = n_objects = two = 0
    for _, caption, scene in samples:
        m = GRAMMAR.fullmatch(caption)
        assert m, caption
        objs = scene.objects
        said = [(m.group(1), m.group(2), m.group(3))] + ([(m.group(6), m.group(7), m.group(8))] if m.group(4) else [])
        assert len(said) == len(objs) in (1, 2)
        for (size, colour, shape), o in zip(said, objs):
            assert (colour, shape) == (o.colour, o.shape)
            assert size is None or size.strip() == o.size
            omitted_size += size is None
            lo, hi = (12, 18) if o.size == "small" else (24, 32)
            assert lo <= o.d <= hi
            assert o.d / 2 < o.centre[0] < 64 - o.d / 2 and o.d / 2 < o.centre[1] < 64 - o.d / 2
        n_objects += len(objs)
        if m.group(9):
            assert m.group(10) == scene.background
        else:
            omitted_bg += 1
        if len(objs) == 2:
            two += 1
            assert m.group(5) == scene.relation == dominant_relation(objs[0].centre, objs[1].centre)
            dx, dy = (abs(objs[0].centre[i] - objs[1].centre[i]) for i in (0, 1))
            assert max(dx, dy) >= (objs[0].d + objs[1].d) / 2 + 1  # bounding boxes do not overlap
    assert 0.22 < omitted_size / n_objects < 0.38
    assert 0.22 < omitted_bg / N < 0.38
    assert 0.4 < two / N < 0.6


def test_rendering_exact_interiors_background_and_antialiased_area(samples):
    py, px = np.mgrid[0:64, 0:64].astype(np.float64)
    for image, _, scene in samples[:200]:
        pixels = np.asarray(image).astype(np.int64)
        bg = np.asarray(BG[scene.background])
        far = np.ones((64, 64), bool)
        for o in scene.objects:
            cx, cy = o.centre
            inside = pixel_fully_inside(o.shape, o.d, cx, cy, px, py)
            assert inside.sum() > 0.3 * area(o.shape, o.d)
            assert (pixels[inside] == PALETTE[o.colour]).all(), (scene, o)
            far &= (np.abs(px + 0.5 - cx) > o.d / 2 + 1) | (np.abs(py + 0.5 - cy) > o.d / 2 + 1)
        assert (pixels[far] == bg).all()
        if len(scene.objects) == 1:  # coverage recovered from the blend equals the analytic area
            o = scene.objects[0]
            direction = np.asarray(PALETTE[o.colour]) - bg
            alpha = ((pixels - bg) @ direction) / (direction @ direction)
            assert alpha.sum() == pytest.approx(area(o.shape, o.d), rel=0.01, abs=o.d / 4)  # 4x4 sampling
            partial = (alpha > 0.05) & (alpha < 0.95)
            assert partial.sum() >= 8  # anti-aliased edge


def test_checker_accepts_ground_truth(samples):
    given = sum(check_image(img, caption)["all"] for img, caption, _ in samples)
    full = sum(check_image(img, full_caption(scene))["all"] for img, _, scene in samples)
    assert given / N >= 0.98 and full / N >= 0.98, (given, full)
    result = check_image(ShapesDataset(1, seed=11)[0]["image"], full_caption(shapes_sample(11)[2]))
    assert result["all"] and set(result) == {"background", "colours", "shapes", "sizes", "relation", "count", "all"}


def test_checker_rejects_altered_captions(samples):
    rng = np.random.default_rng(0)
    rejected = {"colours": [], "shapes": [], "relation": [], "background": [], "sizes": []}
    for img, _, scene in samples[:300]:
        caption = full_caption(scene)
        o = scene.objects[int(rng.integers(len(scene.objects)))]
        phrase = f"a {o.size} {o.colour} {o.shape}"
        colour = rng.choice([c for c in PALETTE if c != o.colour])
        shape = rng.choice([s for s in ("circle", "square", "triangle", "ring") if s != o.shape])
        size = "small" if o.size == "large" else "large"
        background = rng.choice([b for b in BG if b != scene.background])
        altered = {
            "colours": caption.replace(phrase, f"a {o.size} {colour} {o.shape}"),
            "shapes": caption.replace(phrase, f"a {o.size} {o.colour} {shape}"),
            "sizes": caption.replace(phrase, f"a {size} {o.colour} {o.shape}"),
            "background": caption.replace(f"a {scene.background} background", f"a {background} background"),
        }
        if scene.relation:
            altered["relation"] = caption.replace(scene.relation, OPPOSITE[scene.relation])
        for attribute, text in altered.items():
            assert text != caption
            result = check_image(img, text)
            rejected[attribute].append(not result["all"] and not result[attribute])
    for attribute, outcomes in rejected.items():
        assert np.mean(outcomes) >= 0.95, (attribute, np.mean(outcomes))
    # an object missing or added is a count error
    img, _, scene = next(s for s in samples if s[2].relation)
    assert not check_image(img, f"a {scene.objects[0].colour} {scene.objects[0].shape}")["count"]


def test_parse_caption():
    spec = parse_caption("A large red circle left of a blue ring on a gray background.")
    assert [(o.colour, o.shape, o.size) for o in spec.objects] == [("red", "circle", "large"), ("blue", "ring", None)]
    assert spec.relation == "left of" and spec.background == "gray"
    spec = parse_caption("a yellow triangle")
    assert spec.relation is None and spec.background is None and len(spec.objects) == 1
    for bad in ("a red hexagon", "two red circles", "a red circle near a blue ring", ""):
        with pytest.raises(InputError, match="not of the form"):
            parse_caption(bad)
    with pytest.raises(InputError):
        check_image("not an image", "a red circle")


def _save(path, size=(80, 60), colour=(10, 200, 30)):
    Image.new("RGB", size, colour).save(path)


def test_image_folder_captions_crop_and_random_crop(tmp_path):
    # 128x64: blue | green | green | red quarters; short side 64 -> 32 gives 64x32, centre crop = green
    pattern = np.zeros((64, 128, 3), np.uint8)
    pattern[:, :32] = (0, 0, 255)
    pattern[:, 32:96] = (0, 255, 0)
    pattern[:, 96:] = (255, 0, 0)
    Image.fromarray(pattern).save(tmp_path / "a.png")
    _save(tmp_path / "b.jpg")
    _save(tmp_path / "c.webp")
    (tmp_path / "a.txt").write_text("caption from txt\n")
    lines = [
        json.dumps({"file": "a.png", "caption": "loses to txt"}),
        "",
        json.dumps({"file": "b.jpg", "caption": "from jsonl"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    ds = ImageFolderDataset(tmp_path, 32)
    assert len(ds) == 3 and [ds[i]["caption"] for i in range(3)] == ["caption from txt", "from jsonl", ""]
    image = ds[0]["image"]
    assert image.shape == (3, 32, 32) and ds[0]["index"] == 0
    interior = (image[:, :, 2:-2] + 1) * 127.5
    assert torch.allclose(interior, torch.tensor([0.0, 255, 0])[:, None, None].expand_as(interior), atol=3)
    with pytest.raises(InputError, match="c.webp"):
        ImageFolderDataset(tmp_path, 32, require_captions=True)

    # random crops: reproducible from the generator seed, and they do move
    def crops(seed):
        ds = ImageFolderDataset(tmp_path, 32, generator=torch.Generator().manual_seed(seed))
        return [ds[0]["image"] for _ in range(12)]

    first, again = crops(1), crops(1)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert len({tuple(x[:, 16, ::2].flatten().tolist()) for x in first}) > 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 32)
    (tmp_path / "x.txt").write_text("no image here")
    with pytest.raises(InputError, match="no images"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(InputError, match=r"cannot read image .*broken\.png"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "broken.png").unlink()
    _save(tmp_path / "tiny.png", size=(40, 24))
    with pytest.raises(InputError, match=r"tiny\.png.*40x24.*32"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "tiny.png").unlink()
    _save(tmp_path / "ok.png")
    with pytest.raises(InputError, match=r"ok\.png.*has no caption.*ok\.txt.*captions\.jsonl"):
        ImageFolderDataset(tmp_path, 32, require_captions=True)
    (tmp_path / "captions.jsonl").write_text('{"file": "ok.png"}\n')
    with pytest.raises(InputError, match=r"captions\.jsonl line 1"):
        ImageFolderDataset(tmp_path, 32)
    (tmp_path / "captions.jsonl").write_text('{"file": "gone.png", "caption": "c"}\n')
    with pytest.raises(InputError, match=r"gone\.png"):
        ImageFolderDataset(tmp_path, 32)
    with pytest.raises(InputError) as info:
        ImageFolderDataset(tmp_path / "nope", 32)
    assert "\n" not in str(info.value) and "nope" in str(info.value)


def test_open_dataset(tmp_path):
    ds = open_dataset("shapes", 32, length=7)
    assert isinstance(ds, ShapesDataset) and len(ds) == 7 and ds[0]["image"].shape == (3, 32, 32)
    ds = open_dataset("shapes:5:100")
    assert len(ds) == 5 and ds[1]["caption"] == shapes_sample(101)[1]
    assert len(open_dataset("shapes:12")) == 12
    for bad in ("shapes:x", "shapes:0", "shapes:1:2:3", "shapes:-3"):
        with pytest.raises(InputError, match="shapes:N:SEED"):
            open_dataset(bad)
    _save(tmp_path / "one.png")
    assert isinstance(open_dataset(str(tmp_path), 32), ImageFolderDataset)
    with pytest.raises(InputError, match="does not exist"):
        open_dataset(str(tmp_path / "missing"))


def test_random_mask():
    masks = [random_mask(48, 64, torch.Generator().manual_seed(s)) for s in range(40)]
    again = random_mask(48, 64, torch.Generator().manual_seed(3))
    assert torch.equal(masks[3], again)
    fractions = []
    for m in masks:
        assert m.shape == (1, 48, 64) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
        fractions.append(m.mean().item())
    assert len({round(f, 4) for f in fractions}) > 30  # varied
    assert 0.02 < np.mean(fractions) < 0.7 and min(fractions) < 0.9


def test_generation_speed():
    start = time.perf_counter()
    for seed in range(1000):
        shapes_sample(seed)
    assert time.perf_counter() - start < 20  # ~1 ms each; 10k images well under a minute
