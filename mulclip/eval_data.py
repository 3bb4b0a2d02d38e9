"""Evaluation sets from local files (nothing is downloaded), for `python -m mulclip.eval`.

Retrieval sets (`RetrievalData`): images plus one or more caption sets, each a list of
captions with the index of its image (several captions per image are allowed):

- `synthetic`: the held-out split of the built-in scenes (`mulclip.data.synthetic`), the same
  samples that `python -m mulclip.train` evaluates on for the same seed and count: "long"
  captions (scene sentence + one sentence per object), "short" (the scene sentence) and, per
  image, attribute-swapped "negatives" of the long caption.
- `docci` (split "test" by default), `dci`, `urban1k`: the layouts read by
  `mulclip.data.formats` (see there); "long" captions, and "short" ones for DCI, which
  publishes them.
- `coco`, `flickr30k`: the Karpathy-split JSON (`dataset_coco.json` / `dataset_flickr30k.json`):
  `images[]` with `filename`, `split` ("test" by default), optional `filepath` (COCO's
  "val2014"), and `sentences[].raw`; usually 5 captions per image, all kept as the "short"
  caption set. Images are looked up as `IMAGE_ROOT/filepath/filename`, then
  `IMAGE_ROOT/filename`, where IMAGE_ROOT defaults to the JSON file's folder.

Classification sets (`ClassificationData`) for zero-shot: `imagefolder`, a folder with one
sub-folder per class (sorted names are the class order; images found recursively), class
names from the folder names (underscores become spaces) or a file with one name per line,
and prompt templates ("openai": CLIP's 80 ImageNet templates, "simple": 18 of them, or a file
with one template per line containing "{}").

Captions that are empty after stripping are dropped (with their image when it has no caption
left). Missing image files raise FileNotFoundError before any encoding starts.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

from PIL import Image
from torch.utils.data import Dataset

from .data.formats import read_dci, read_docci, read_urban1k
from .data.synthetic import SyntheticScenes

RETRIEVAL_SETS = ("synthetic", "docci", "dci", "urban1k", "coco", "flickr30k")
CLASSIFICATION_SETS = ("imagefolder",)
DATA_SETS = RETRIEVAL_SETS + CLASSIFICATION_SETS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}


@dataclass
class CaptionSet:
    """Captions and, for each, the index of its image."""

    captions: List[str]
    text_to_image: List[int]


@dataclass
class RetrievalData:
    """An image-text retrieval set: `images[i]` is a path or a callable returning a PIL image."""

    name: str
    images: List[Union[str, Callable[[], Image.Image]]]
    caption_sets: Dict[str, CaptionSet]
    negatives: Optional[List[List[str]]] = None  # per image: captions that must score below its long caption
    description: str = ""


@dataclass
class ClassificationData:
    """A zero-shot classification set: image paths, labels, class names and prompt templates."""

    name: str
    images: List[str]
    labels: List[int]
    classnames: List[str]
    templates: List[Callable[[str], str]] = field(default_factory=list)
    description: str = ""


class ImageDataset(Dataset):
    """`images[i]` (a path, or a callable giving a PIL image) through `transform`."""

    def __init__(self, images: Sequence, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        source = self.images[index]
        if callable(source):
            image = source()
        else:
            try:
                with Image.open(source) as f:
                    image = f.convert("RGB")
            except Exception as error:  # PIL raises many types for unreadable files
                raise RuntimeError(f"cannot read image {source}: {error}") from error
        return self.transform(image)


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such file or folder: {path}")
    return path


def _check_images(paths: Sequence[str], name: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} of {len(paths)} image files are missing, e.g. {missing[0]}")


def _from_samples(name: str, samples, description: str) -> RetrievalData:
    """A set with one long caption per image (and short captions when every sample has one)."""
    images, longs, shorts = [], [], []
    dropped = 0
    for sample in samples:
        caption = sample.caption.strip()
        if not caption:
            dropped += 1
            continue
        images.append(sample.image_path)
        longs.append(caption)
        shorts.append((sample.short_caption or "").strip())
    if dropped:
        logging.warning("%s: dropped %d sample(s) with an empty caption", name, dropped)
    if not images:
        raise ValueError(f"{name}: no sample with a caption found")
    _check_images(images, name)
    identity = list(range(len(images)))
    sets = {"long": CaptionSet(longs, identity)}
    if all(shorts):
        sets["short"] = CaptionSet(shorts, identity)
    return RetrievalData(name, images, sets, description=description)


def synthetic(num_samples: int = 512, image_size: int = 64, seed: int = 0, num_negatives: int = 3) -> RetrievalData:
    """The held-out synthetic scenes with long and short captions and attribute-swapped negatives."""
    scenes = SyntheticScenes(num_samples, image_size, seed=seed, split="heldout", num_negatives=num_negatives)
    longs, shorts, negatives = [], [], []
    for i in range(num_samples):
        item = scenes[i]
        longs.append(item["caption"])
        shorts.append(item["short_caption"])
        negatives.append(item["negatives"] if num_negatives else [])
    identity = list(range(num_samples))
    images = [_SceneImage(scenes, i) for i in range(num_samples)]
    return RetrievalData(
        "synthetic", images, {"long": CaptionSet(longs, identity), "short": CaptionSet(shorts, identity)},
        negatives if num_negatives else None,
        f"synthetic held-out scenes ({num_samples}, seed {seed}, {num_negatives} negatives each)",
    )


class _SceneImage:
    """Renders scene `index` on demand (a picklable callable, for DataLoader workers)."""

    def __init__(self, scenes: SyntheticScenes, index: int):
        self.scenes, self.index = scenes, index

    def __call__(self) -> Image.Image:
        return self.scenes[self.index]["image"]


def docci(root: str, split: str = "test") -> RetrievalData:
    """DOCCI from `root` (docci_descriptions.jsonlines and images/), one split (default "test")."""
    _require(os.path.join(root, "docci_descriptions.jsonlines"), "DOCCI descriptions")
    return _from_samples("docci", read_docci(root, split=split), f"DOCCI {split} ({root})")


def dci(root: str, split: Optional[str] = None) -> RetrievalData:
    """DCI from `root` (the densely_captioned_images folder or its parent); long and short captions."""
    _require(root, "DCI root")
    return _from_samples("dci", read_dci(root, split=split), f"DCI ({root})")


def urban1k(root: str) -> RetrievalData:
    """Urban1k from `root` (image/ and caption/, or their parent Urban1k/)."""
    _require(root, "Urban1k root")
    return _from_samples("urban1k", read_urban1k(root), f"Urban1k ({root})")


def karpathy(path: str, name: str = "coco", split: str = "test", image_root: Optional[str] = None) -> RetrievalData:
    """COCO / Flickr30K from the Karpathy-split JSON `path` (or a folder holding dataset_<name>.json).

    Every image of `split` with at least one non-empty sentence is kept with all its sentences
    (the "short" caption set; several captions per image).
    """
    if os.path.isdir(path):
        path = os.path.join(path, KARPATHY_FILES.get(name, f"dataset_{name}.json"))
    _require(path, f"{name} Karpathy-split JSON")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if "images" not in records:
        raise ValueError(f"{path}: not a Karpathy-split JSON (no 'images' list)")
    image_root = image_root or os.path.dirname(os.path.abspath(path))
    images, captions, text_to_image = [], [], []
    for record in records["images"]:
        if record.get("split") != split:
            continue
        sentences = [s["raw"].strip() for s in record.get("sentences", []) if s.get("raw", "").strip()]
        if not sentences:
            continue
        candidates = [os.path.join(image_root, record.get("filepath", ""), record["filename"]),
                      os.path.join(image_root, record["filename"])]
        image = next((c for c in candidates if os.path.isfile(c)), candidates[0])
        captions.extend(sentences)
        text_to_image.extend([len(images)] * len(sentences))
        images.append(image)
    if not images:
        splits = sorted({r.get("split", "?") for r in records["images"]})
        raise ValueError(f"{path}: no image of split {split!r} with a caption (splits present: {splits})")
    _check_images(images, f"{name} (image root {image_root})")
    return RetrievalData(name, images, {"short": CaptionSet(captions, text_to_image)},
                         description=f"{name} {split} ({len(images)} images, {len(captions)} captions)")


def load_templates(spec: str) -> List[Callable[[str], str]]:
    """Prompt templates: "openai" (80), "simple" (18) or a file with one template per line containing "{}"."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    _require(spec, "--templates")
    with open(spec, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    bad = [line for line in lines if "{}" not in line]
    if not lines or bad:
        raise ValueError(f"--templates {spec}: need one template per line, each with '{{}}' for the class name"
                         + (f" (bad: {bad[0]!r})" if bad else ""))
    return [line.format for line in lines]


def imagefolder(root: str, templates: str = "openai", classnames: Optional[str] = None) -> ClassificationData:
    """Zero-shot set from class sub-folders of `root` (images found recursively in each)."""
    _require(root, "ImageFolder root")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise ValueError(f"{root}: no class sub-folder")
    if classnames is None:
        names = [d.replace("_", " ") for d in folders]
    elif classnames == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    else:
        with open(_require(classnames, "--classnames"), encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders in {root}")
    images, labels = [], []
    for label, folder in enumerate(folders):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, folder))):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(os.path.join(dirpath, name))
                    labels.append(label)
    if not images:
        raise ValueError(f"{root}: no image file ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
    return ClassificationData("imagefolder", images, labels, names, load_templates(templates),
                              f"ImageFolder {root} ({len(images)} images, {len(names)} classes)")
