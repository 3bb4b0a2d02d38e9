"""A built-in dataset that needs no download: drawn scenes of simple objects with long captions.

Every sample is a pure function of (seed, split, index): a background colour and 2-4 objects,
each with a shape, a colour, a size and a cell of a 3x3 grid, drawn with PIL. The long caption
has a scene sentence (the short caption: how many objects, their colours and shapes, the
background) and then one sentence per object (size, colour, shape, position), so the
subcaptions each describe one object. Hard negatives for evaluation swap one attribute between
two objects (colour, shape, size or position) and re-render the caption: the same words, a
different binding. Train and held-out splits draw from different random streams.
"""
import random
from dataclasses import dataclass, replace
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .captions import DEFAULT_MAX_SUBCAPTIONS, caption_fields

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "pink": (245, 125, 185),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "dark gray": (80, 80, 80),
    "light gray": (185, 185, 185),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES = {"small": 0.11, "large": 0.16}  # half-extent as a fraction of the image side
POSITIONS = (
    ("top left", 0, 0), ("top", 1, 0), ("top right", 2, 0),
    ("left", 0, 1), ("center", 1, 1), ("right", 2, 1),
    ("bottom left", 0, 2), ("bottom", 1, 2), ("bottom right", 2, 2),
)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "heldout")
_SUPERSAMPLE = 4  # draw larger, then downscale: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: int  # index into POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str
    objects: Tuple[SceneObject, ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scene(rng: random.Random, min_objects: int = 2, max_objects: int = 4) -> Scene:
    """Draw a random scene: distinct grid cells, and no two objects with the same colour and shape."""
    background = rng.choice(sorted(BACKGROUNDS))
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(len(POSITIONS)), count)
    objects, seen = [], set()
    for cell in sorted(cells):
        while True:
            shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
            if (shape, color) not in seen:
                break
        seen.add((shape, color))
        objects.append(SceneObject(shape, color, rng.choice(sorted(SIZES)), cell))
    return Scene(background, tuple(objects))


def describe(scene: Scene) -> str:
    """The long caption: a scene sentence, then one sentence per object in reading order."""
    names = [f"{_article(o.color)} {o.color} {o.shape}" for o in scene.objects]
    listing = ", ".join(names[:-1]) + " and " + names[-1]
    sentences = [f"{NUMBER_WORDS[len(names)].capitalize()} shapes on {_article(scene.background)} "
                 f"{scene.background} background: {listing}."]
    for o in scene.objects:
        where = POSITIONS[o.position][0]
        where = "in the center" if where == "center" else f"at the {where}"
        sentences.append(f"{_article(o.size).capitalize()} {o.size} {o.color} {o.shape} is {where}.")
    return " ".join(sentences)


def hard_negatives(scene: Scene, rng: random.Random, count: int = 3) -> List[str]:
    """`count` captions of the scene with one attribute swapped between two objects that differ in it.

    When a scene has fewer such swaps, the rest recolour one object with a colour absent from
    the scene.
    """
    positive = describe(scene)
    swaps = []
    objs = scene.objects
    for field in ("color", "shape", "size", "position"):
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                if getattr(objs[i], field) != getattr(objs[j], field):
                    swaps.append((field, i, j))
    rng.shuffle(swaps)
    candidates = []
    for field, i, j in swaps:
        swapped = list(objs)
        swapped[i] = replace(objs[i], **{field: getattr(objs[j], field)})
        swapped[j] = replace(objs[j], **{field: getattr(objs[i], field)})
        if field == "position":  # keep reading order so that only the binding changes
            swapped.sort(key=lambda o: o.position)
        candidates.append(tuple(swapped))
    # Too few swaps (two objects alike in most attributes): recolour one object instead.
    unused = [c for c in sorted(COLORS) if c not in {o.color for o in objs}]
    rng.shuffle(unused)
    for color in unused:
        i = rng.randrange(len(objs))
        candidates.append(tuple(replace(o, color=color) if k == i else o for k, o in enumerate(objs)))
    negatives = []
    for objects in candidates:
        text = describe(Scene(scene.background, objects))
        if text != positive and text not in negatives:
            negatives.append(text)
        if len(negatives) == count:
            break
    return negatives


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        import math

        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene at `image_size` pixels; objects jitter a little inside their grid cell."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = side / 3
    for o in scene.objects:
        _, col, row = POSITIONS[o.position]
        r = SIZES[o.size] * side
        slack = max(0.0, cell / 2 - r)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.6
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.6
        color = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=color)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


class SyntheticScenes(Dataset):
    """Map-style dataset of drawn scenes; sample i is the same on every call, process and machine.

    Items are dicts with "image" (PIL RGB), "caption", "short_caption", "subcaptions" and, when
    `num_negatives > 0`, "negatives" (attribute-swapped captions).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        *,
        seed: int = 0,
        split: str = "train",
        num_negatives: int = 0,
        max_subcaptions: int = DEFAULT_MAX_SUBCAPTIONS,
        min_objects: int = 2,
        max_objects: int = 4,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 2 <= min_objects <= max_objects <= 4:
            raise ValueError("need 2 <= min_objects <= max_objects <= 4")
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.num_negatives = num_negatives
        self.max_subcaptions = max_subcaptions
        self.min_objects, self.max_objects = min_objects, max_objects

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Tuple[Scene, random.Random]:
        """The scene of sample `index` and the random stream that continues after drawing it."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"mulclip-synthetic/{self.seed}/{self.split}/{index}")
        return sample_scene(rng, self.min_objects, self.max_objects), rng

    def __getitem__(self, index: int) -> dict:
        scene, rng = self.scene(index)
        caption, short, subs = caption_fields(describe(scene), max_subcaptions=self.max_subcaptions)
        item = {
            "image": render(scene, self.image_size, rng),
            "caption": caption,
            "short_caption": short,
            "subcaptions": subs,
            "key": f"{self.split}-{index:08d}",
        }
        if self.num_negatives:
            item["negatives"] = hard_negatives(scene, rng, self.num_negatives)
        return item


def scenes_as_records(dataset: SyntheticScenes, indices: Sequence[int]):
    """(key, PNG bytes, caption, json metadata) records of some samples, for writing shards."""
    import io

    for index in indices:
        item = dataset[index]
        buffer = io.BytesIO()
        item["image"].save(buffer, format="PNG")
        meta = {"short_caption": item["short_caption"], "subcaptions": item["subcaptions"]}
        yield item["key"], "png", buffer.getvalue(), item["caption"], meta
