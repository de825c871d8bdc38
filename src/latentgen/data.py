"""Training data: the procedural "shapes" data set, captioned image folders, inpainting masks,
and a geometric checker that scores an image against a shapes caption.

The shapes data set is a small, fully specified text-to-image task for training and evaluating a
latent diffusion model (Rombach et al., arXiv 2112.10752) on one CPU: 64x64 RGB scenes of one or
two flat objects on a plain background, with captions whose every word can be verified from the
pixels by `check_image`.

Caption grammar (regex in `_CAPTION_RE`)::

    a [small|large] <colour> <shape>[ <relation> a [small|large] <colour> <shape>][ on a <bg> background]

Sampling choices (all drawn from `numpy.random.default_rng(seed)`, so a seed fixes the sample):
  * one or two objects, each with probability 1/2; two objects never share both colour and shape;
  * each object's size phrase is left out independently with probability 0.3, and the background
    phrase is left out with probability 0.3;
  * `<relation>` says where object 1 lies relative to object 2 along the dominant axis (the axis with
    the larger centre offset; image y grows downwards, so "above" means a smaller y). Scenes where
    the two offsets differ by less than `_AXIS_MARGIN` px are redrawn, so the relation is never a
    near tie;
  * objects keep `_EDGE_MARGIN` px from the canvas edge and `_GAP` px between bounding boxes (all
    lengths are given for 64 px and scale with `size`). Two large objects whose diameters sum to
    more than the canvas allows are redrawn, so such pairs never occur.

An object's `centre` is the centre of its bounding box (for a triangle: the base midpoint's x and
mid-height y), which is also what `check_image` measures.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from latentgen.errors import InputError

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "ring")
SIZES: dict[str, tuple[int, int]] = {"small": (12, 18), "large": (24, 32)}  # diameter d at 64 px
RELATIONS = ("left of", "right of", "above", "below")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_BASE = 64  # all lengths below are in pixels of a 64 px canvas and scale with `size`
_SUPERSAMPLE = 4  # anti-aliasing: coverage is averaged over 4x4 sub-pixel samples
_EDGE_MARGIN = 1.0
_GAP = 3.0
_AXIS_MARGIN = 3.0
_OMIT_P = 0.3
_SIZE_SPLIT = 21.0  # bounding-box extent separating "small" (<= 18+1) from "large" (>= 24)
_FG_DISTANCE = 45.0  # RGB distance from the background beyond which a pixel belongs to an object


# --------------------------------------------------------------------------------------------------
# Scenes and rendering


@dataclass(frozen=True)
class ShapeObject:
    """One object of a shapes scene; `d` and `centre` (x, y) are in pixels of the rendered image."""

    colour: str
    shape: str
    size: str
    d: float
    centre: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    """A shapes scene: background name, one or two objects and, for two, the relation of 1 to 2."""

    background: str
    objects: tuple[ShapeObject, ...]
    relation: str | None
    image_size: int


def _sample_object(rng: np.random.Generator, scale: float) -> ShapeObject:
    size = str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size]
    return ShapeObject(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=size,
        d=float(rng.integers(lo, hi + 1)) * scale,
        centre=(0.0, 0.0),
    )


def _place(rng: np.random.Generator, obj: ShapeObject, image_size: int, scale: float) -> ShapeObject:
    half = obj.d / 2 + _EDGE_MARGIN * scale
    x, y = rng.uniform(half, image_size - half, size=2)
    return ShapeObject(obj.colour, obj.shape, obj.size, obj.d, (round(float(x), 3), round(float(y), 3)))


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centre `a` lies relative to centre `b` along the dominant axis (image y points down)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _separated(a: ShapeObject, b: ShapeObject, scale: float) -> bool:
    """Bounding boxes at least `_GAP` apart on some axis, and a clearly dominant axis."""
    dx, dy = abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])
    reach = (a.d + b.d) / 2 + _GAP * scale
    return max(dx, dy) >= reach and abs(dx - dy) >= _AXIS_MARGIN * scale


def sample_scene(rng: np.random.Generator, image_size: int = _BASE) -> Scene:
    """Draw a random scene (see the module docstring for the distribution)."""
    scale = image_size / _BASE
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.5:
        return Scene(background, (_place(rng, _sample_object(rng, scale), image_size, scale),), None, image_size)
    while True:
        first, second = _sample_object(rng, scale), _sample_object(rng, scale)
        if (first.colour, first.shape) == (second.colour, second.shape):
            continue
        for _ in range(20):
            a, b = _place(rng, first, image_size, scale), _place(rng, second, image_size, scale)
            if _separated(a, b, scale):
                return Scene(background, (a, b), relation_of(a.centre, b.centre), image_size)


def _inside(shape: str, x: np.ndarray, y: np.ndarray, d: float) -> np.ndarray:
    """Point-in-shape test for coordinates relative to the object centre."""
    r = d / 2
    if shape == "square":
        return (np.abs(x) <= r) & (np.abs(y) <= r)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "ring":  # annulus, inner diameter d/2
        rr = x * x + y * y
        return (rr <= r * r) & (rr >= r * r / 4)
    if shape == "triangle":  # upright, base = height = d: half-width grows by 1/2 per unit depth
        depth = y + r
        return (depth >= 0) & (y <= r) & (np.abs(x) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(obj: ShapeObject, image_size: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage of `obj` in its pixel window: mean of supersampled inside tests."""
    cx, cy = obj.centre
    r = obj.d / 2
    x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 1, image_size)
    y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 1, image_size)
    s = _SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s - cx
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s - cy
    hit = _inside(obj.shape, xs[None, :], ys[:, None], obj.d)
    alpha = hit.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return slice(y0, y1), slice(x0, x1), alpha


def render_scene(scene: Scene) -> np.ndarray:
    """Render a scene to a uint8 [H, W, 3] array; edges blend by coverage (box-filtered 4x4 samples)."""
    n = scene.image_size
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        ys, xs, alpha = _coverage(obj, n)
        a = alpha[..., None].astype(np.float32)
        canvas[ys, xs] = canvas[ys, xs] * (1 - a) + np.asarray(COLOURS[obj.colour], np.float32) * a
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """Describe a scene; each size phrase and the background phrase is left out with p = 0.3."""

    def phrase(obj: ShapeObject) -> str:
        size = "" if rng.random() < _OMIT_P else f"{obj.size} "
        return f"a {size}{obj.colour} {obj.shape}"

    text = phrase(scene.objects[0])
    if scene.relation is not None:
        text += f" {scene.relation} {phrase(scene.objects[1])}"
    if rng.random() >= _OMIT_P:
        text += f" on a {scene.background} background"
    return text


def shapes_sample(seed: int, size: int = _BASE) -> tuple[Image.Image, str, Scene]:
    """The shapes sample for `seed`: (RGB image, caption, scene); identical for identical arguments."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, size)
    caption = caption_scene(scene, rng)
    return Image.fromarray(render_scene(scene), "RGB"), caption, scene


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float [3, H, W] in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """`length` shapes samples; item i is `shapes_sample(seed + i, size)` as dict(image, caption, index)."""

    def __init__(self, length: int, seed: int = 0, size: int = _BASE):
        self.length, self.seed, self.size = int(length), int(seed), int(size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, caption, _ = shapes_sample(self.seed + index, self.size)
        return {"image": _to_tensor(image), "caption": caption, "index": index}


# --------------------------------------------------------------------------------------------------
# Image folders


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_jsonl_captions(path: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[str(entry["file"])] = str(entry["caption"])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"{path} line {number}: expected a JSON object with 'file' and 'caption' ({_one_line(err)})"
            ) from None
    return captions


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in a folder (top level only), captioned by `<name>.txt` beside each image or by a
    `captions.jsonl` of {"file": ..., "caption": ...} lines (a .txt file wins over the jsonl).

    Each image is resized so its short side is `size` (bicubic) and cropped to size x size: centred,
    or at a random offset drawn from `generator` when one is given. Uncaptioned images get "" unless
    `require_captions`. Items are dict(image: float [3, size, size] in [-1, 1], caption, index).
    """

    def __init__(
        self,
        root: str | Path,
        size: int = _BASE,
        *,
        require_captions: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.root, self.size, self.generator = Path(root), int(size), generator
        if not self.root.is_dir():
            raise InputError(f"image folder '{self.root}' does not exist; pass an existing folder of images")
        self.files = sorted(
            p
            for p in self.root.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not self.files:
            raise InputError(
                f"image folder '{self.root}' has no images ({' '.join(IMAGE_EXTENSIONS)}); add images to it"
            )
        self.captions = self._load_captions(require_captions)
        for path in self.files:
            self._check_size(path)

    def _load_captions(self, require: bool) -> list[str]:
        jsonl = self.root / "captions.jsonl"
        listed = _read_jsonl_captions(jsonl) if jsonl.is_file() else {}
        names = {p.name for p in self.files}
        for name in listed:
            if name not in names:
                raise InputError(
                    f"{jsonl} names '{name}', which is not an image in '{self.root}'; fix or remove that line"
                )
        captions = []
        for path in self.files:
            text_file = path.with_suffix(".txt")
            if text_file.is_file():
                caption = text_file.read_text(encoding="utf-8")
            else:
                caption = listed.get(path.name, "")
            if require and not caption.strip():
                raise InputError(
                    f"image '{path}' has no caption; write it to '{text_file.name}' beside the image or add "
                    f'{{"file": "{path.name}", "caption": "..."}} to {jsonl.name}'
                )
            captions.append(caption.strip())
        return captions

    def _check_size(self, path: Path) -> None:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot read image '{path}' ({_one_line(err)}); replace or remove it") from None
        if min(width, height) < self.size:
            raise InputError(
                f"image '{path}' is {width}x{height} px, smaller than the training size {self.size}; "
                f"remove it or train at size {min(width, height)} or less"
            )

    def _load(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                return ImageOps.exif_transpose(image).convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot read image '{path}' ({_one_line(err)}); replace or remove it") from None

    def _offset(self, extra: int) -> int:
        if self.generator is None or extra == 0:
            return extra // 2
        return int(torch.randint(0, extra + 1, (1,), generator=self.generator))

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.size / min(width, height)
        new = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = self._offset(new[0] - self.size), self._offset(new[1] - self.size)
        return image.crop((left, top, left + self.size, top + self.size))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image = self._resize_crop(self._load(self.files[index]))
        return {"image": _to_tensor(image), "caption": self.captions[index], "index": index}


def open_dataset(
    spec: str, size: int = _BASE, require_captions: bool = False, length: int = 10_000
) -> torch.utils.data.Dataset:
    """ "shapes" | "shapes:N" | "shapes:N:SEED" -> ShapesDataset (N defaults to `length`, SEED to 0);
    anything else is a folder path -> ImageFolderDataset."""
    if spec == "shapes" or spec.startswith("shapes:"):
        parts = spec.split(":")[1:]
        if len(parts) > 2 or not all(re.fullmatch(r"\d+", p) for p in parts) or (parts and int(parts[0]) == 0):
            raise InputError(f"dataset '{spec}' is not 'shapes', 'shapes:N' or 'shapes:N:SEED' with N >= 1, SEED >= 0")
        n = int(parts[0]) if parts else length
        seed = int(parts[1]) if len(parts) == 2 else 0
        return ShapesDataset(n, seed, size)
    return ImageFolderDataset(spec, size, require_captions=require_captions)


# --------------------------------------------------------------------------------------------------
# Inpainting masks


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _box(xx, yy, generator, h: int, w: int) -> torch.Tensor:
    bw, bh = _uniform(generator, 0.1, 0.5) * w, _uniform(generator, 0.1, 0.5) * h
    x0, y0 = _uniform(generator, 0, w - bw), _uniform(generator, 0, h - bh)
    return (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)


def _stroke(xx, yy, generator, h: int, w: int) -> torch.Tensor:
    """A thick polyline (a brush stroke): pixels within `radius` of any of its segments."""
    side = min(h, w)
    radius = max(_uniform(generator, 0.03, 0.08) * side, 1.0)
    x, y = _uniform(generator, 0, w), _uniform(generator, 0, h)
    hit = torch.zeros_like(xx, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 6, (), generator=generator))):
        angle, length = _uniform(generator, 0, 2 * np.pi), _uniform(generator, 0.1, 0.4) * side
        nx, ny = min(max(x + length * np.cos(angle), 0.0), w), min(max(y + length * np.sin(angle), 0.0), h)
        dx, dy = nx - x, ny - y
        t = (((xx - x) * dx + (yy - y) * dy) / max(dx * dx + dy * dy, 1e-8)).clamp(0, 1)
        hit |= (xx - (x + t * dx)) ** 2 + (yy - (y + t * dy)) ** 2 <= radius**2
        x, y = nx, ny
    return hit


def random_mask(h: int, w: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random training mask [1, h, w] (1 = repaint): 1-3 boxes or 1-4 thick brush strokes, in the
    spirit of the LaMa mask generator (Suvorov et al., arXiv 2109.07161) that the SD inpainting
    models were trained with; never empty."""
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    use_boxes = float(torch.rand((), generator=generator)) < 0.5
    draw, most = (_box, 3) if use_boxes else (_stroke, 4)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(int(torch.randint(1, most + 1, (), generator=generator))):
        mask |= draw(xx, yy, generator, h, w)
    if not mask.any():
        mask[h // 2, w // 2] = True
    return mask.float()[None]


# --------------------------------------------------------------------------------------------------
# The geometric checker


_OBJ_RE = rf"a (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(
    rf"{_OBJ_RE}(?: ({'|'.join(RELATIONS)}) {_OBJ_RE})?(?: on a ({'|'.join(BACKGROUNDS)}) background)?"
)


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; `size` is None when the caption leaves it out."""

    colour: str
    shape: str
    size: str | None


@dataclass(frozen=True)
class CaptionSpec:
    """A parsed shapes caption; None marks a part the caption leaves out."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None
    background: str | None


def parse_caption(caption: str) -> CaptionSpec:
    """Parse a caption of the shapes grammar (case, spacing and a final '.' are forgiven)."""
    text = " ".join(caption.lower().split()).rstrip(".")
    match = _CAPTION_RE.fullmatch(text)
    if match is None:
        raise InputError(
            f"caption {caption!r} is not of the form 'a [small|large] <colour> <shape>"
            f"[ <relation> a ...][ on a <background> background]'"
        )
    size1, colour1, shape1, relation, size2, colour2, shape2, background = match.groups()
    objects = [ObjectSpec(colour1, shape1, size1)]
    if relation is not None:
        objects.append(ObjectSpec(colour2, shape2, size2))
    return CaptionSpec(tuple(objects), relation, background)


def _label(mask: np.ndarray, eight: bool) -> np.ndarray:
    """Connected components of a boolean mask: each pixel gets the smallest flat index in its
    component (-1 off the mask). Min-label propagation with pointer jumping, fully vectorised."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if eight else [])
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        new = labels.copy()
        for dy, dx in shifts:
            np.minimum(new, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], out=new)
        new = np.where(mask, new, none)
        flat = np.append(new.ravel(), none)
        for _ in range(4):  # pointer jumping: a label is a pixel of the component; follow its label
            new = flat[new]
            flat = np.append(new.ravel(), none)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


@dataclass(frozen=True)
class _Component:
    colour: str
    shape: str
    size: str
    centre: tuple[float, float]


def _to_uint8(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 3:
        return ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return img
    raise InputError("check_image needs a PIL image, a uint8 [H, W, 3] array or a [3, H, W] tensor in [-1, 1]")


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - colour, axis=1)
    return names[int(np.argmin(distances))]


def _classify_shape(region: np.ndarray) -> str:
    """Shape from geometry of a component's bounding-box crop: a hole -> ring; narrow top ->
    triangle; bounding-box fill ratio ~1 -> square, ~pi/4 -> circle."""
    h, w = region.shape
    outside = _label(~np.pad(region, 1), eight=False)
    border = set(np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])))
    holes = (outside >= 0) & ~np.isin(outside, list(border))
    if holes.sum() >= 0.04 * h * w:
        return "ring"
    widths = region.sum(axis=1)
    quarter = max(h // 4, 1)
    if widths[:quarter].mean() < 0.6 * widths[-quarter:].mean():
        return "triangle"
    return "square" if region.mean() > 0.9 else "circle"


def _components(pixels: np.ndarray, background: np.ndarray, scale: float) -> list[_Component]:
    distance = np.linalg.norm(pixels.astype(np.float32) - background, axis=2)
    labels = _label(distance > _FG_DISTANCE, eight=True)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    found = []
    for ident, count in zip(ids, counts):
        if count < 0.15 * (SIZES["small"][0] * scale) ** 2:  # specks, not objects
            continue
        ys, xs = np.nonzero(labels == ident)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        strong = distance[ys, xs] >= 0.7 * distance[ys, xs].max()
        colour = _nearest(np.median(pixels[ys[strong], xs[strong]].astype(np.float32), axis=0), COLOURS)
        extent = max(y1 - y0, x1 - x0)
        found.append(
            _Component(
                colour=colour,
                shape=_classify_shape(labels[y0:y1, x0:x1] == ident),
                size="small" if extent <= _SIZE_SPLIT * scale else "large",
                centre=((x0 + x1) / 2, (y0 + y1) / 2),
            )
        )
    return found


def _score(spec: CaptionSpec, chosen: tuple[_Component, ...]) -> dict[str, bool]:
    pairs = list(zip(spec.objects, chosen))
    complete = len(chosen) == len(spec.objects)
    relation = spec.relation is None or (complete and relation_of(chosen[0].centre, chosen[1].centre) == spec.relation)
    return {
        "colours": complete and all(o.colour == c.colour for o, c in pairs),
        "shapes": complete and all(o.shape == c.shape for o, c in pairs),
        "sizes": complete and all(o.size in (None, c.size) for o, c in pairs),
        "relation": relation,
    }


def check_image(img, caption: str) -> dict[str, bool]:
    """Check an image against a shapes caption. Returns booleans for "background", "colours",
    "shapes", "sizes", "relation", "count" and "all"; parts the caption leaves out count as matching.

    Background = nearest named background to the median border colour; objects = 8-connected
    components of pixels farther than `_FG_DISTANCE` from it, each given the nearest palette colour
    of its interior, a shape from its geometry and a size from its bounding box. Caption objects
    are matched to components by the assignment that gets the most object attributes right
    (relation breaks ties), so a wrong relation is reported as "relation", not as a swapped object.
    """
    spec = parse_caption(caption)
    pixels = _to_uint8(img)
    scale = min(pixels.shape[:2]) / _BASE
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)
    measured = np.median(border, axis=0)
    components = _components(pixels, measured, scale)
    k = min(len(spec.objects), len(components))
    best = max(
        (_score(spec, chosen) for chosen in itertools.permutations(components, k)),
        key=lambda s: (s["colours"] + s["shapes"] + s["sizes"], s["relation"]),
    )
    result = {
        "background": spec.background in (None, _nearest(measured, BACKGROUNDS)),
        **best,
        "count": len(components) == len(spec.objects),
    }
    result["all"] = all(result.values())
    return result
