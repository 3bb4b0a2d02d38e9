"""Training and evaluation data: the synthetic scenes or webdataset shards, batched and tokenized.

`get_train_data` / `get_val_data` return a `DataInfo`: `batches(epoch, start_batch)` gives the
epoch's batches from `start_batch` on (what `--resume` needs), `num_batches` how many an epoch
has on each rank. A batch is a dict of tensors: "images" (B,3,H,W), "long_text" (B,248),
"short_text" (B,77), "subcaption_text" (B,M,77), "subcaption_mask" (B,M), "skipped" (samples
dropped as unreadable while the batch was assembled), and for evaluation sets with hard
negatives "negative_text" (B,N,248).
"""
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
from torch.utils.data import DataLoader, Sampler

from .captions import DEFAULT_MAX_SUBCAPTIONS, caption_fields, split_sentences
from .shards import StreamConfig, check_urls, count_samples, expand_urls, stream_loader
from .synthetic import SyntheticScenes

SYNTHETIC = "synthetic"
SHORT_TEXT_CONTEXT = 77

__all__ = [
    "Collator", "DataInfo", "EpochSampler", "SYNTHETIC", "caption_fields", "get_train_data", "get_val_data",
    "split_sentences",
]


class Collator:
    """Turn sample dicts into a batch: images through `transform`, captions through the tokenizer.

    Long captions use `long_context` (248) positions, short captions and subcaptions 77; a
    sample has up to `max_subcaptions` subcaptions, the rest of the (B, M) slots are masked.
    """

    def __init__(self, tokenizer, transform: Callable, long_context: int, max_subcaptions: int = DEFAULT_MAX_SUBCAPTIONS):
        self.tokenizer, self.transform = tokenizer, transform
        self.long_context, self.max_subcaptions = long_context, max_subcaptions

    def __call__(self, samples: List[dict], skipped: int = 0) -> dict:
        B, M = len(samples), self.max_subcaptions
        batch = {
            "images": torch.stack([self.transform(s["image"]) for s in samples]),
            "long_text": self.tokenizer([s["caption"] for s in samples], context_length=self.long_context),
            "short_text": self.tokenizer([s["short_caption"] for s in samples], context_length=SHORT_TEXT_CONTEXT),
            "subcaption_mask": torch.zeros((B, M), dtype=torch.bool),
            "subcaption_text": torch.zeros((B, M, SHORT_TEXT_CONTEXT), dtype=torch.long),
            "skipped": torch.tensor(skipped),
        }
        subs = [(b, i, text) for b, s in enumerate(samples) for i, text in enumerate(s["subcaptions"][:M])]
        if subs:
            rows, slots, texts = zip(*subs)
            rows, slots = torch.tensor(rows), torch.tensor(slots)
            batch["subcaption_text"][rows, slots] = self.tokenizer(list(texts), context_length=SHORT_TEXT_CONTEXT)
            batch["subcaption_mask"][rows, slots] = True
        if "negatives" in samples[0]:
            negatives = [text for s in samples for text in s["negatives"]]
            batch["negative_text"] = self.tokenizer(negatives, context_length=self.long_context).view(B, -1, self.long_context)
        return batch


class EpochSampler(Sampler):
    """Seeded per-epoch order of a map-style dataset, split over ranks, resumable at a batch.

    Global batch b of an epoch is `perm[b*B*W : (b+1)*B*W]`, rank r taking the r-th slice of B:
    gathered over ranks in rank order, the ranks' batches form the same global batch that one
    process with batch size B*W sees. The incomplete last global batch is dropped.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_batches = size // (batch_size * world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        span = self.batch_size * self.world_size
        for b in range(self.start_batch, self.num_batches):
            start = b * span + self.rank * self.batch_size
            yield from order[start:start + self.batch_size]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch) * self.batch_size


@dataclass
class DataInfo:
    """A dataset ready to iterate: `batches(epoch, start_batch)` and `num_batches` per epoch and rank."""

    make_batches: Callable[[int, int], Iterable[dict]]
    num_batches: int
    num_samples: int
    description: str

    def batches(self, epoch: int = 0, start_batch: int = 0) -> Iterable[dict]:
        return self.make_batches(epoch, start_batch)


def _map_style(dataset, collate: Collator, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
               workers: int, description: str) -> DataInfo:
    sampler = EpochSampler(len(dataset), batch_size, rank, world_size, seed, shuffle)
    if sampler.num_batches == 0:
        raise ValueError(f"{description}: {len(dataset)} samples do not fill one global batch of {batch_size * world_size}")

    def make_batches(epoch: int, start_batch: int):
        sampler.set_epoch(epoch, start_batch)
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
            drop_last=True, pin_memory=torch.cuda.is_available(),
        )

    return DataInfo(make_batches, sampler.num_batches, len(dataset), description)


def _shards(spec: str, what: str, collate: Collator, batch_size: int, num_samples: Optional[int], rank: int,
            world_size: int, seed: int, shuffle: bool, workers: int, max_subcaptions: int, repeat: bool) -> DataInfo:
    urls = expand_urls(spec)
    check_urls(urls, what)
    counted = count_samples(urls)
    num_samples = num_samples or counted
    if num_samples is None:
        raise ValueError(f"{what}: no sizes.json beside the shards; give the sample count (--train-num-samples / --val-num-samples)")
    num_batches = num_samples // (batch_size * world_size) if repeat else -(-num_samples // (batch_size * world_size))
    if num_batches == 0:
        raise ValueError(f"{what}: {num_samples} samples do not fill one global batch of {batch_size * world_size}")

    def make_batches(epoch: int, start_batch: int):
        cfg = StreamConfig(urls, batch_size, seed, epoch, shuffle, rank=rank, world_size=world_size, repeat=repeat,
                           max_subcaptions=max_subcaptions)
        loader = stream_loader(cfg, collate, workers)
        # Replaying the consumed batches keeps a resumed epoch's sequence exactly as it would have been.
        return itertools.islice(loader, start_batch, num_batches if repeat else None)

    return DataInfo(make_batches, num_batches, num_samples, f"{len(urls)} shard(s) {spec}")


def get_train_data(args, collate: Collator, image_size: int, rank: int = 0, world_size: int = 1) -> DataInfo:
    """Training batches from `args.train_data`: "synthetic" (default, drawn at `image_size`) or webdataset shards."""
    if args.train_data == SYNTHETIC:
        dataset = SyntheticScenes(args.train_num_samples, image_size, seed=args.data_seed, split="train",
                                  max_subcaptions=args.max_subcaptions)
        return _map_style(dataset, collate, args.batch_size, rank, world_size, args.seed, True, args.workers,
                          f"synthetic scenes (train, {args.train_num_samples} samples)")
    return _shards(args.train_data, "--train-data", collate, args.batch_size, args.train_num_samples, rank, world_size,
                   args.seed, True, args.workers, args.max_subcaptions, repeat=True)


def get_val_data(args, collate: Collator, image_size: int) -> Optional[DataInfo]:
    """Held-out batches from `args.val_data` (one process, fixed order), or None without it."""
    if not args.val_data:
        return None
    if args.val_data == SYNTHETIC:
        dataset = SyntheticScenes(args.val_num_samples, image_size, seed=args.data_seed, split="heldout",
                                  num_negatives=args.val_negatives, max_subcaptions=args.max_subcaptions)
        loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=args.workers)
        return DataInfo(lambda epoch, start: loader, len(loader), len(dataset),
                        f"synthetic scenes (held-out, {args.val_num_samples} samples)")
    return _shards(args.val_data, "--val-data", collate, args.batch_size, args.val_num_samples, 0, 1, args.seed,
                   False, args.workers, args.max_subcaptions, repeat=False)
