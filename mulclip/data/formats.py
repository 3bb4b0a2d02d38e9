"""Readers of long-caption datasets in their published on-disk layouts, and a converter to shards.

Each reader yields `RawSample`s (key, image path, long caption, optional short caption) from a
local copy; nothing is downloaded. The layouts assumed (from the datasets' own loaders):

- DOCCI (google/docci): `docci_descriptions.jsonlines`, one JSON object per line with
  "example_id", "split" (train / test / qual_dev / qual_test), "image_file" and "description";
  images in `images/<image_file>`.
- DCI (facebookresearch/DCI): `densely_captioned_images/complete/*.json` (or `annotations/`),
  each with "image" (a path under `photos/`), "short_caption" and "extra_caption"; the long
  caption is the short caption followed by the extra caption (the repository's
  `get_extended_caption`), the short caption is kept as such.
- Urban1k (Long-CLIP): `Urban1k/image/<name>.jpg` with `Urban1k/caption/<name>.txt`.
- ShareGPT4V: a JSON list (e.g. `share-captioner_coco_lcs_sam_1246k_1107.json`) of objects with
  "id", "image" (relative to an image root) and "conversations", the first "gpt" turn being the
  caption.

Convert with `python -m mulclip.data.formats FORMAT ROOT OUT_DIR` (see `--help`); missing or
unreadable images are skipped and counted, never fatal.
"""
import argparse
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

from PIL import Image

from .captions import DEFAULT_MAX_SUBCAPTIONS, caption_fields
from .shards import ShardWriter


@dataclass(frozen=True)
class RawSample:
    key: str
    image_path: str
    caption: str
    short_caption: Optional[str] = None


def read_docci(root: str, split: Optional[str] = "test", descriptions: Optional[str] = None) -> Iterator[RawSample]:
    """DOCCI samples of one split (None: all) from `root/docci_descriptions.jsonlines` and `root/images/`."""
    path = descriptions or os.path.join(root, "docci_descriptions.jsonlines")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if split is not None and record.get("split") != split:
                continue
            yield RawSample(str(record["example_id"]), os.path.join(root, "images", record["image_file"]),
                            record["description"])


def read_dci(root: str, split: Optional[str] = None) -> Iterator[RawSample]:
    """DCI samples from `root` (the `densely_captioned_images` folder, or its parent).

    `split`, when given, names a JSON file in `root` listing the annotation file names to keep
    (DCI publishes its splits that way); None keeps every annotation.
    """
    if os.path.isdir(os.path.join(root, "densely_captioned_images")):
        root = os.path.join(root, "densely_captioned_images")
    folder = next((os.path.join(root, d) for d in ("complete", "annotations") if os.path.isdir(os.path.join(root, d))), None)
    if folder is None:
        raise FileNotFoundError(f"DCI: neither {root}/complete nor {root}/annotations exists")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    if split is not None:
        with open(os.path.join(root, split)) as f:
            keep = set(json.load(f))
        names = [n for n in names if n in keep]
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            record = json.load(f)
        short, extra = record.get("short_caption", "").strip(), record.get("extra_caption", "").strip()
        caption = f"{short}\n{extra}" if extra else short
        yield RawSample(os.path.splitext(name)[0], os.path.join(root, "photos", record["image"]), caption, short or None)


def read_urban1k(root: str, split: Optional[str] = None) -> Iterator[RawSample]:
    """Urban1k samples: `root/image/<name>.<ext>` paired with `root/caption/<name>.txt` (root may be its parent)."""
    if os.path.isdir(os.path.join(root, "Urban1k")):
        root = os.path.join(root, "Urban1k")
    image_dir, caption_dir = os.path.join(root, "image"), os.path.join(root, "caption")
    images = {os.path.splitext(n)[0]: n for n in os.listdir(image_dir)}
    for stem in sorted(images):
        caption_path = os.path.join(caption_dir, stem + ".txt")
        caption = ""
        if os.path.isfile(caption_path):
            with open(caption_path, encoding="utf-8") as f:
                caption = f.read()
        yield RawSample(stem, os.path.join(image_dir, images[stem]), caption)


def read_sharegpt4v(root: str, split: Optional[str] = None, annotations: Optional[str] = None) -> Iterator[RawSample]:
    """ShareGPT4V samples from the JSON list `annotations` (default: the only *.json in `root`), images under `root`."""
    if annotations is None:
        candidates = sorted(n for n in os.listdir(root) if n.endswith(".json"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"ShareGPT4V: give --annotations; {root} has json files {candidates}")
        annotations = os.path.join(root, candidates[0])
    with open(annotations, encoding="utf-8") as f:
        records = json.load(f)
    for index, record in enumerate(records):
        caption = next((turn["value"] for turn in record.get("conversations", []) if turn.get("from") == "gpt"), "")
        key = str(record.get("id", index)).replace(".", "_").replace("/", "_")
        yield RawSample(key, os.path.join(root, record["image"]), caption.replace("\n", " ").strip())


READERS: Dict[str, Callable[..., Iterator[RawSample]]] = {
    "docci": read_docci,
    "dci": read_dci,
    "urban1k": read_urban1k,
    "sharegpt4v": read_sharegpt4v,
}


_KEPT_FORMATS = {"jpeg": "jpg", "mpo": "jpg", "png": "png", "webp": "webp"}


def _image_payload(path: str) -> Optional[Tuple[str, bytes]]:
    """(shard extension, bytes) of an image file: JPEG/PNG/WebP copied as is, others re-encoded as PNG.

    None when the file is missing or PIL cannot decode it.
    """
    try:
        with Image.open(path) as image:
            image.load()
            ext = _KEPT_FORMATS.get((image.format or "").lower())
            if ext is None:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                return "png", buffer.getvalue()
        with open(path, "rb") as f:
            return ext, f.read()
    except Exception:  # PIL raises many types for unreadable files
        return None


def convert(
    samples: Iterator[RawSample],
    out_dir: str,
    prefix: str = "shard",
    max_count: int = 1000,
    max_subcaptions: int = DEFAULT_MAX_SUBCAPTIONS,
) -> Dict[str, int]:
    """Write samples into shards with their short caption and subcaptions; returns written/skipped counts."""
    written = skipped = 0
    with ShardWriter(out_dir, prefix, max_count) as writer:
        for sample in samples:
            payload = _image_payload(sample.image_path) if sample.caption.strip() else None
            if payload is None:
                skipped += 1
                reason = f"unreadable image {sample.image_path}" if sample.caption.strip() else "empty caption"
                logging.warning("skipping %s: %s", sample.key, reason)
                continue
            caption, short, subs = caption_fields(sample.caption, sample.short_caption, None, max_subcaptions)
            writer.write(sample.key, *payload, caption, {"short_caption": short, "subcaptions": subs})
            written += 1
    return {"written": written, "skipped": skipped}


def main(argv=None) -> Dict[str, int]:
    """Command line: convert a local dataset copy into webdataset shards."""
    parser = argparse.ArgumentParser(description="Convert DOCCI / DCI / Urban1k / ShareGPT4V into webdataset shards.")
    parser.add_argument("format", choices=sorted(READERS))
    parser.add_argument("root", help="the dataset's local folder")
    parser.add_argument("out_dir", help="folder for the shards and sizes.json")
    parser.add_argument("--split", default=None, help="DOCCI split (train/test/qual_dev/qual_test); DCI split file")
    parser.add_argument("--annotations", default=None, help="ShareGPT4V json file / DOCCI jsonlines file")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the format)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-subcaptions", type=int, default=DEFAULT_MAX_SUBCAPTIONS)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"root: no such folder: {args.root}")
    kwargs = {"split": args.split}
    if args.format == "docci":
        kwargs["descriptions"] = args.annotations
        kwargs["split"] = args.split or "test"
    elif args.format == "sharegpt4v":
        kwargs["annotations"] = args.annotations
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    counts = convert(READERS[args.format](args.root, **kwargs), args.out_dir, args.prefix or args.format,
                     args.shard_size, args.max_subcaptions)
    print(f"wrote {counts['written']} samples to {args.out_dir}, skipped {counts['skipped']}")
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
