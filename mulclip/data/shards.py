"""webdataset shards: writing them, and reading them robustly for training.

A sample is a group of tar members sharing a key: an image (`jpg`, `jpeg`, `png` or `webp`),
the long caption (`txt`, UTF-8) and optionally `json` with "short_caption" and/or
"subcaptions" (missing fields are derived by `captions.caption_fields`). The shard writer also
puts `sizes.json` (shard file name -> sample count) beside the shards, as open_clip does.

Unreadable data never stops a run: a sample whose image does not decode, whose caption is
missing or whose json is malformed is skipped, and so is the rest of a shard that cannot be
read; each batch carries the number skipped while it was assembled, which the training loop
logs.
"""
import io
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .captions import DEFAULT_MAX_SUBCAPTIONS, caption_fields

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"


class Skipped:
    """Marker for a sample (or the rest of a shard) that could not be read."""

    __slots__ = ("reason", "key")

    def __init__(self, reason: str, key: str = ""):
        self.reason, self.key = reason, key


def expand_urls(spec: str) -> List[str]:
    """Shard paths from "a.tar::b-{000..009}.tar" (brace ranges, '::'-separated) or a directory."""
    import braceexpand

    urls = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            urls.extend(sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith(".tar")))
        else:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def check_urls(urls: Sequence[str], what: str) -> None:
    """Raise FileNotFoundError naming the flag and the first local shard path that does not exist."""
    if not urls:
        raise FileNotFoundError(f"{what}: no shard found")
    for url in urls:
        if "://" not in url and not os.path.isfile(url):
            raise FileNotFoundError(f"{what}: no such shard file: {url}")


def count_samples(urls: Sequence[str]) -> Optional[int]:
    """Samples in the shards according to the `sizes.json` beside them, or None if it is missing."""
    total = 0
    sizes_cache = {}
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in sizes_cache:
            path = os.path.join(folder, SIZES_FILE)
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                sizes_cache[folder] = json.load(f)
        if name not in sizes_cache[folder]:
            return None
        total += int(sizes_cache[folder][name])
    return total


class ShardWriter:
    """Write (key, image extension, image bytes, caption, json metadata) records into tar shards."""

    def __init__(self, folder: str, prefix: str = "shard", max_count: int = 1000):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.prefix, self.max_count = folder, prefix, max_count
        self.sizes = {}
        self._tar = None
        self._count = 0

    def _open_next(self):
        self.close_shard()
        name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._name = name
        self._tar = tarfile.open(os.path.join(self.folder, name), "w")
        self._count = 0
        self.sizes[name] = 0

    def _add(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image_ext: str, image_bytes: bytes, caption: str, meta: Optional[dict] = None):
        """Add one sample; keys must not contain '.' (webdataset splits key and extension there)."""
        if "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} contains '.'")
        if self._tar is None or self._count >= self.max_count:
            self._open_next()
        self._add(f"{key}.{image_ext}", image_bytes)
        self._add(f"{key}.txt", caption.encode("utf-8"))
        if meta:
            self._add(f"{key}.json", json.dumps(meta).encode("utf-8"))
        self._count += 1
        self.sizes[self._name] += 1

    def close_shard(self):
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> List[str]:
        """Finish the last shard, write sizes.json, return the shard paths."""
        self.close_shard()
        with open(os.path.join(self.folder, SIZES_FILE), "w") as f:
            json.dump(self.sizes, f, indent=1)
        return [os.path.join(self.folder, name) for name in self.sizes]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_tar(url: str) -> Iterator:
    """Raw samples {"__key__", ext: bytes, ...} of one shard; a read error ends it with a Skipped."""
    current, key = {}, None
    try:
        with tarfile.open(url, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                member_key = os.path.join(folder, stem)
                if member_key != key:
                    if current:
                        yield current
                    current, key = {"__key__": member_key}, member_key
                current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        if current:
            yield Skipped(f"{type(exc).__name__}: {exc}", key or "")
            current = {}
        yield Skipped(f"unreadable rest of shard {url}: {type(exc).__name__}: {exc}", url)
    if current:
        yield current


def decode_sample(raw: dict, max_subcaptions: int = DEFAULT_MAX_SUBCAPTIONS):
    """A training sample dict from raw tar members, or a Skipped saying why not."""
    key = raw.get("__key__", "")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        return Skipped("no image", key)
    if "txt" not in raw:
        return Skipped("no caption (.txt)", key)
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image.load()
        image = image.convert("RGB")
        caption = raw["txt"].decode("utf-8")
        meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
        if not isinstance(meta, dict):
            raise ValueError("json is not an object")
    except Exception as exc:  # PIL raises many types for corrupt images
        return Skipped(f"{type(exc).__name__}: {exc}", key)
    long_caption, short, subs = caption_fields(
        caption, meta.get("short_caption"), meta.get("subcaptions"), max_subcaptions
    )
    if not long_caption:
        return Skipped("empty caption", key)
    return {"image": image, "caption": long_caption, "short_caption": short, "subcaptions": subs, "key": key}


@dataclass
class StreamConfig:
    """Where a stream reads and how it orders samples; `unit` splits shards over ranks x workers."""

    urls: Sequence[str]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000
    rank: int = 0
    world_size: int = 1
    repeat: bool = True
    max_subcaptions: int = DEFAULT_MAX_SUBCAPTIONS


class ShardStream(IterableDataset):
    """Batches from webdataset shards, split over ranks and DataLoader workers, skipping bad data.

    Each (rank, worker) unit reads its own shards (all shards, keeping every U-th sample, when
    there are fewer shards than units), in a seeded order per epoch and pass, through a seeded
    shuffle buffer, so the batch sequence depends only on the seed, epoch, shards, world size
    and worker count. With `repeat` the unit cycles over its shards forever: the training loop
    takes a fixed number of batches per epoch, equal on every rank. Batches are `collate`d
    and carry "skipped": the samples dropped while they were assembled.
    """

    def __init__(self, cfg: StreamConfig, collate: Callable[[list, int], dict]):
        super().__init__()
        self.cfg = cfg
        self.collate = collate

    def _unit(self) -> Tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.cfg.rank * workers + worker, self.cfg.world_size * workers

    def _samples(self) -> Iterator:
        cfg = self.cfg
        unit, units = self._unit()
        if len(cfg.urls) >= units:
            own, stride = list(cfg.urls[unit::units]), 1
        else:  # every unit reads every shard in the same order and keeps every units-th sample
            own, stride = list(cfg.urls), units
        passes = 0
        while True:
            order = list(own)
            if cfg.shuffle:
                random.Random(f"{cfg.seed}/{cfg.epoch}/{passes}").shuffle(order)
            index = good = 0
            for url in order:
                for raw in read_tar(url):
                    if isinstance(raw, Skipped):
                        yield raw
                        continue
                    index += 1
                    if (index - 1) % stride != unit % stride:
                        continue
                    sample = decode_sample(raw, cfg.max_subcaptions)
                    good += not isinstance(sample, Skipped)
                    yield sample
            passes += 1
            if good == 0:
                raise RuntimeError(f"no readable sample in shards {order} (rank {cfg.rank})")
            if not cfg.repeat:
                return

    def _shuffled(self, samples: Iterable) -> Iterator:
        cfg = self.cfg
        if not cfg.shuffle or cfg.shuffle_buffer <= 1:
            yield from samples
            return
        unit, _ = self._unit()
        rng = random.Random(f"{cfg.seed}/{cfg.epoch}/{unit}/buffer")
        buffer = []
        for sample in samples:
            if isinstance(sample, Skipped):
                yield sample
                continue
            buffer.append(sample)
            if len(buffer) >= cfg.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self) -> Iterator[dict]:
        batch, skipped = [], 0
        for sample in self._shuffled(self._samples()):
            if isinstance(sample, Skipped):
                skipped += 1
                logging.warning("skipping unreadable sample %s: %s", sample.key, sample.reason)
                continue
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                yield self.collate(batch, skipped)
                batch, skipped = [], 0
        if batch and not self.cfg.repeat:
            yield self.collate(batch, skipped)


def stream_loader(cfg: StreamConfig, collate, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream (batching happens in the workers)."""
    return torch.utils.data.DataLoader(
        ShardStream(cfg, collate), batch_size=None, num_workers=workers,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
