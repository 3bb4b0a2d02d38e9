"""Evaluate MulCLIP and plain open_clip models: `python -m mulclip.eval --checkpoint A [B ...] [flags]`.

Every `--checkpoint` is evaluated on the same data and becomes one column of the printed table
and one entry of the JSON results, so a baseline and a trained model compare side by side:

    python -m mulclip.eval --checkpoint logs/RUN --data synthetic --rerank-beta 0.5 --output results.json
    python -m mulclip.eval --model ViT-B-16 --checkpoint openai logs/vitb16/checkpoints/epoch_6.pt \\
        --data urban1k --data-path /data/Urban1k

A checkpoint is a run folder of `python -m mulclip.train` (its `checkpoints/latest.pt`), a
checkpoint file of that run (the model name and calibration module are read from it), any
open_clip / OpenAI CLIP state-dict file (77 or 248 text positions), or an open_clip pretrained
tag of `--model`. A model with 77 positions is evaluated as published: long captions are cut
to 77 tokens, as the CLIP baselines of Long-CLIP and MulCLIP are; `--stretch-positions`
evaluates it with the Long-CLIP 248-position stretch instead. Models that MulCLIP cannot wrap
(ResNets, custom text towers) are evaluated through open_clip's own encoders, without the
rerank (it needs patch embeddings).

Metrics (`mulclip.metrics`, whose docstring gives the tie rule): Recall@1/5/10 image-to-text
and text-to-image per caption set ("long", "short"); hard-negative accuracy where the set has
negatives (the synthetic scenes); zero-shot top-1/top-5 (imagefolder); and with
`--rerank-beta B` the same retrieval and hard-negative metrics on `global + B * mean_n s(n, b)`
(subcaption scores of method section 7) under the key prefix `rerankB/`.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

# As in mulclip.train: sleeping OpenMP waiters, for CPUs shared with other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mulclip_kernels import backends  # noqa: E402

from . import checkpoint as ckpt  # noqa: E402
from . import eval_data, metrics  # noqa: E402
from .data.captions import DEFAULT_MAX_SUBCAPTIONS, caption_fields  # noqa: E402
from .model import LONG_CONTEXT, MulCLIP, create_model  # noqa: E402
from .train import get_autocast  # noqa: E402

SHORT_CONTEXT = 77
DEFAULT_TOPK = 16
DEFAULT_SAP_TEMPERATURE = 0.05


# ----------------------------------------------------------------------------- models


class Encoder:
    """One model to evaluate: pooled image/text embeddings, and patch embeddings where it has them.

    `mulclip` is the MulCLIP wrapper (None for models MulCLIP cannot wrap, which are then encoded
    with open_clip's own `encode_image` / `encode_text`).
    """

    def __init__(self, label: str, source: str, model_name: str, clip: torch.nn.Module, mulclip: Optional[MulCLIP],
                 topk: int, sap_temperature: float):
        self.label, self.source, self.model_name = label, source, model_name
        self.clip, self.mulclip = clip, mulclip
        self.topk, self.sap_temperature = topk, sap_temperature
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(clip)
        self.transform = open_clip.image_transform(
            cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
        )
        size = cfg["size"]
        self.image_size = size if isinstance(size, int) else size[0]

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.output_dim

    @property
    def has_patches(self) -> bool:
        return self.mulclip is not None

    def encode_image(self, images: torch.Tensor, patches: bool):
        """(pooled (B, d), patches (B, P, d) or None); calibrated tokens when the model calibrates."""
        if self.mulclip is None:
            return self.clip.encode_image(images), None
        pooled, tokens = self.mulclip.encode_image(images)
        if not patches:
            return pooled, None
        if self.mulclip.calibration_tokens > 0:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            tokens = self.mulclip.image_calibration(tokens, mask)
        return pooled, tokens

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mulclip is None:
            return self.clip.encode_text(tokens)
        return self.mulclip.encode_text(tokens)[0]


def resolve_checkpoint(spec: str) -> str:
    """A run folder becomes its latest checkpoint; files and tags are returned as given."""
    if os.path.isdir(spec):
        for candidate in (os.path.join(spec, "checkpoints", ckpt.LATEST), os.path.join(spec, ckpt.LATEST)):
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"--checkpoint {spec}: a folder without checkpoints/{ckpt.LATEST} (not a mulclip.train run)")
    return spec


def _training_checkpoint(path: str) -> Optional[dict]:
    """The header of a mulclip.train checkpoint (model name, flags), or None for other files."""
    state = ckpt.load(path)
    if isinstance(state, dict) and "model_name" in state and "calibration" in state and "state_dict" in state:
        return {"model_name": state["model_name"], "args": state.get("args", {}), "calibration": state["calibration"]}
    return None


def _positions(path: str) -> int:
    from open_clip.factory import load_state_dict

    state_dict = load_state_dict(path, weights_only=True)
    if "positional_embedding" not in state_dict:
        raise ValueError(f"{path} has no 'positional_embedding': not an open_clip CLIP checkpoint")
    return state_dict["positional_embedding"].shape[0]


def load_encoder(spec: str, model_name: Optional[str], label: str, device: torch.device, stretch: bool,
                 topk: Optional[int], sap_temperature: Optional[float]) -> Encoder:
    """Build the model of one `--checkpoint` value (see the module docstring for what it may be)."""
    path = resolve_checkpoint(spec)
    header = _training_checkpoint(path) if os.path.isfile(path) else None
    if header is not None:
        if model_name is not None and model_name != header["model_name"]:
            raise ValueError(f"--model {model_name} but {path} was trained as {header['model_name']}")
        model_name = header["model_name"]
    if model_name is None:
        raise ValueError(f"--checkpoint {spec}: give --model (the open_clip architecture of this checkpoint)")
    if model_name not in open_clip.list_models():
        raise ValueError(f"--model: unknown model {model_name!r}")
    if not os.path.isfile(path):
        if os.path.sep in path or path.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise FileNotFoundError(f"--checkpoint: no such file: {path}")
        if not open_clip.get_pretrained_cfg(model_name, path):
            raise ValueError(f"--checkpoint {path!r} is neither a file nor a pretrained tag of {model_name} "
                             f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})")

    args = header["args"] if header else {}
    native = open_clip.get_model_config(model_name)["text_cfg"].get("context_length", SHORT_CONTEXT)
    long_file = os.path.isfile(path) and _positions(path) != native
    if header is not None or long_file or stretch:
        try:
            mulclip = create_model(model_name, path, calibration_tokens=int(args.get("calibration_tokens", 0) or 0),
                                   freeze_positions=0)
        except ValueError as error:
            if header is not None or long_file:
                raise
            raise ValueError(f"--stretch-positions: {error}") from error
        if header is not None and header["calibration"]:
            mulclip.load_state_dict(header["calibration"], strict=False)
        clip = mulclip.clip
    else:
        clip = open_clip.create_model(model_name, pretrained=path)
        try:
            mulclip = MulCLIP(clip, freeze_positions=0)
        except ValueError as error:
            logging.warning("%s: %s; evaluating with open_clip's encoders, without the rerank", label, error)
            mulclip = None
    encoder = Encoder(label, spec, model_name, clip, mulclip,
                      topk if topk is not None else int(args.get("topk", DEFAULT_TOPK)),
                      sap_temperature if sap_temperature is not None else float(args.get("sap_temperature",
                                                                                         DEFAULT_SAP_TEMPERATURE)))
    (mulclip or clip).to(device).eval()
    return encoder


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_images(encoder: Encoder, images: Sequence, device: torch.device, autocast, batch_size: int, workers: int,
                  patches: bool):
    """Pooled embeddings (I, d) float32 and, with `patches`, patch embeddings (I, P, d) float16, on the CPU.

    Patches are kept in float16 to halve their memory (they are the largest tensor of a run);
    the subcaption scores convert them back to float32 chunk by chunk.
    """
    from tqdm import tqdm

    loader = DataLoader(eval_data.ImageDataset(images, encoder.transform), batch_size=batch_size, num_workers=workers)
    pooled, tokens = [], []
    for batch in tqdm(loader, desc=f"{encoder.label}: images", dynamic_ncols=True, leave=False):
        with autocast():
            out, patch = encoder.encode_image(batch.to(device), patches)
        pooled.append(out.float().cpu())
        if patches:
            tokens.append(patch.to(torch.float16).cpu())
    return torch.cat(pooled), (torch.cat(tokens) if patches else None)


@torch.no_grad()
def encode_texts(encoder: Encoder, texts: Sequence[str], context_length: int, device: torch.device, autocast,
                 batch_size: int, desc: str) -> torch.Tensor:
    """(T, d) float32 embeddings on the CPU; texts are batched by token length (less padding), results in input order."""
    from tqdm import tqdm

    if not texts:
        return torch.zeros((0, encoder.embed_dim))
    tokens = encoder.tokenizer(list(texts), context_length=context_length)
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    out = [None] * len(texts)
    chunks = range(0, len(texts), batch_size)
    for start in tqdm(chunks, desc=f"{encoder.label}: {desc}", dynamic_ncols=True, leave=False):
        index = order[start:start + batch_size]
        with autocast():
            features = encoder.encode_text(tokens[index].to(device)).float().cpu()
        for i, row in zip(index.tolist(), features):
            out[i] = row
    return torch.stack(out)


def _subcaptions(captions: Sequence[str], max_subcaptions: int):
    """Flattened subcaptions of every caption and the caption index of each."""
    texts, owner = [], []
    for t, caption in enumerate(captions):
        for sentence in caption_fields(caption, max_subcaptions=max_subcaptions)[2]:
            texts.append(sentence)
            owner.append(t)
    return texts, torch.tensor(owner, dtype=torch.long)


def _padded_subcaptions(features: torch.Tensor, owner: torch.Tensor, groups: int):
    """(groups, M, d) features and (groups, M) mask from flat subcaption features and their (sorted) owners."""
    counts = torch.bincount(owner, minlength=groups)
    M = max(1, int(counts.max())) if owner.numel() else 1
    slot = torch.arange(owner.numel()) - (torch.cumsum(counts, 0) - counts)[owner]
    padded = torch.zeros((groups, M, features.shape[-1]))
    mask = torch.zeros((groups, M), dtype=torch.bool)
    padded[owner, slot] = features
    mask[owner, slot] = True
    return padded, mask


# ----------------------------------------------------------------------------- evaluation


def _rerank_k(encoder: Encoder, patches: torch.Tensor) -> int:
    P = patches.shape[1]
    if encoder.topk > P:
        logging.warning("%s: rerank top-k %d exceeds the %d patches; using %d", encoder.label, encoder.topk, P, P)
    return min(encoder.topk, P)


def evaluate_retrieval(encoder: Encoder, data: eval_data.RetrievalData, device: torch.device, args) -> Dict[str, float]:
    """Recall@k per caption set, hard-negative accuracy, and their rerank variants for each beta."""
    autocast = get_autocast(args.precision, device)
    betas = [b for b in args.rerank_beta if b != 0] if encoder.has_patches else []
    if args.rerank_beta and not encoder.has_patches:
        logging.warning("%s: no patch embeddings, so no rerank", encoder.label)
    images, patches = encode_images(encoder, data.images, device, autocast, args.batch_size, args.workers, bool(betas))
    k = _rerank_k(encoder, patches) if betas else None
    sap = dict(k=k, temperature=encoder.sap_temperature, backend=args.ops) if betas else {}
    results: Dict[str, float] = {"num_images": images.shape[0]}
    reranked: Dict[str, float] = {}  # listed after the global metrics
    for name, captions in data.caption_sets.items():
        context = encoder.context_length if name == "long" else min(SHORT_CONTEXT, encoder.context_length)
        texts = encode_texts(encoder, captions.captions, context, device, autocast, args.batch_size, f"{name} captions")
        text_to_image = torch.tensor(captions.text_to_image)
        similarity = metrics.cosine_similarity(images, texts)
        results[f"num_captions/{name}"] = len(captions.captions)
        results.update({f"{name}/{key}": v for key, v in metrics.retrieval_recall(similarity, text_to_image).items()})
        if name == "long":
            long_texts = texts
        if not betas:
            continue
        subs, owner = _subcaptions(captions.captions, args.max_subcaptions)
        sub_features = encode_texts(encoder, subs, min(SHORT_CONTEXT, encoder.context_length), device, autocast,
                                    args.batch_size, f"{name} subcaptions")
        fine = metrics.mean_subcaption_scores(sub_features, owner, len(captions.captions), patches, **sap)
        for beta in betas:
            scores = metrics.rerank(similarity, fine, beta)
            reranked.update({f"rerank{beta:g}/{name}/{key}": v
                             for key, v in metrics.retrieval_recall(scores, text_to_image).items()})

    if data.negatives:
        if "long" not in data.caption_sets:
            raise ValueError("hard negatives are negatives of the long captions, and this set has none")
        n = len(data.negatives[0])
        if any(len(neg) != n for neg in data.negatives):
            raise ValueError("every image needs the same number of negatives")
        flat = [text for neg in data.negatives for text in neg]
        negatives = encode_texts(encoder, flat, encoder.context_length, device, autocast, args.batch_size,
                                 "negatives").view(len(data.negatives), n, -1)
        image_n = F.normalize(images, dim=-1)
        positive = (image_n * F.normalize(long_texts, dim=-1)).sum(-1)
        negative = torch.einsum("id,ind->in", image_n, F.normalize(negatives, dim=-1))
        results["hard_negative_accuracy"] = metrics.hard_negative_accuracy(positive, negative)
        if betas:
            # Each image's own long caption (group 0) and its negatives (groups 1..n) against that image.
            captions = [[long] + neg for long, neg in zip(data.caption_sets["long"].captions, data.negatives)]
            flat = [text for group in captions for text in group]
            subs, owner = _subcaptions(flat, args.max_subcaptions)
            sub_features = encode_texts(encoder, subs, min(SHORT_CONTEXT, encoder.context_length), device, autocast,
                                        args.batch_size, "hard-negative subcaptions")
            padded, mask = _padded_subcaptions(sub_features, owner, len(flat))
            M, I = padded.shape[1], len(captions)
            fine = metrics.paired_subcaption_scores(padded.view(I, (n + 1) * M, -1), mask.view(I, (n + 1) * M),
                                                    patches, k, temperature=encoder.sap_temperature, backend=args.ops,
                                                    groups=n + 1)
            for beta in betas:
                reranked[f"rerank{beta:g}/hard_negative_accuracy"] = metrics.hard_negative_accuracy(
                    positive + beta * fine[:, 0], negative + beta * fine[:, 1:])
    return {**results, **dict(sorted(reranked.items(), key=lambda item: float(item[0][6:].split("/")[0])))}


def evaluate_zero_shot(encoder: Encoder, data: eval_data.ClassificationData, device: torch.device, args) -> Dict[str, float]:
    """Top-1/top-5 accuracy of the class-name prompt classifier (mean of normalised template embeddings)."""
    autocast = get_autocast(args.precision, device)
    images, _ = encode_images(encoder, data.images, device, autocast, args.batch_size, args.workers, False)
    prompts = [template(name) for name in data.classnames for template in data.templates]
    texts = encode_texts(encoder, prompts, min(SHORT_CONTEXT, encoder.context_length), device, autocast,
                         args.batch_size, "class prompts")
    classifier = F.normalize(F.normalize(texts, dim=-1).view(len(data.classnames), len(data.templates), -1).mean(1), dim=-1)
    logits = F.normalize(images, dim=-1) @ classifier.t()
    results = {"num_images": images.shape[0], "num_classes": len(data.classnames)}
    results.update({f"zeroshot/{k}": v for k, v in metrics.zero_shot_accuracy(logits, torch.tensor(data.labels)).items()})
    return results


def load_data(args, image_size: int):
    """The evaluation set named by --data (synthetic scenes are drawn at the model's image size)."""
    if args.data == "synthetic":
        return eval_data.synthetic(args.num_samples, image_size, args.data_seed, args.negatives)
    if args.data == "imagefolder":
        return eval_data.imagefolder(args.data_path, args.templates, args.classnames)
    if args.data == "docci":
        return eval_data.docci(args.data_path, args.split or "test")
    if args.data == "dci":
        return eval_data.dci(args.data_path, args.split)
    if args.data == "urban1k":
        return eval_data.urban1k(args.data_path)
    return eval_data.karpathy(args.data_path, args.data, args.split or "test", args.image_root)


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    """Flags of `python -m mulclip.eval`; errors exit through argparse with a message naming the flag."""
    parser = argparse.ArgumentParser(prog="python -m mulclip.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="one or more: a mulclip.train run folder or checkpoint, an open_clip/OpenAI state-dict "
                             "file, or an open_clip pretrained tag of --model; one table column each")
    parser.add_argument("--label", nargs="+", default=None, help="column names, one per --checkpoint")
    parser.add_argument("--model", default=None,
                        help="open_clip architecture (read from mulclip.train checkpoints; needed for the others)")
    parser.add_argument("--stretch-positions", action="store_true",
                        help="evaluate 77-position models with the Long-CLIP 248-position stretch "
                             "(default: as published, long captions cut to 77 tokens)")
    parser.add_argument("--data", choices=eval_data.DATA_SETS, default="synthetic")
    parser.add_argument("--data-path", default=None,
                        help="dataset root (docci, dci, urban1k, imagefolder) or Karpathy JSON file/folder (coco, flickr30k)")
    parser.add_argument("--split", default=None, help="docci/coco/flickr30k split (default test); DCI split file")
    parser.add_argument("--image-root", default=None, help="coco/flickr30k image folder (default: the JSON's folder)")
    parser.add_argument("--num-samples", type=int, default=512, help="synthetic held-out scenes")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes (as mulclip.train)")
    parser.add_argument("--negatives", type=int, default=3, help="attribute-swapped negatives per synthetic scene")
    parser.add_argument("--templates", default="openai", help="zero-shot prompts: openai, simple, or a file ('{}' per line)")
    parser.add_argument("--classnames", default=None, help="zero-shot class names: a file (one per line) or 'imagenet'")
    parser.add_argument("--rerank-beta", type=float, nargs="*", default=[],
                        help="also score global + B * mean subcaption score, for each B given (method section 7)")
    parser.add_argument("--rerank-topk", type=int, default=None,
                        help=f"k of the subcaption regions (default: the checkpoint's --topk, else {DEFAULT_TOPK})")
    parser.add_argument("--rerank-temperature", type=float, default=None,
                        help=f"tau_a of the regions (default: the checkpoint's, else {DEFAULT_SAP_TEMPERATURE})")
    parser.add_argument("--max-subcaptions", type=int, default=DEFAULT_MAX_SUBCAPTIONS, help="subcaptions per caption")
    parser.add_argument("--ops", choices=backends("subcaption_patch_scores"), default="auto",
                        help="mulclip_kernels backend of the subcaption scores")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for the images")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: CUDA when available")
    parser.add_argument("--precision", choices=("fp32", "amp", "amp_bf16"), default="fp32")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    for flag in ("num_samples", "batch_size", "max_subcaptions"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.negatives < 0 or args.workers < 0:
        parser.error("--negatives and --workers must be >= 0")
    if args.rerank_topk is not None and args.rerank_topk < 1:
        parser.error("--rerank-topk must be >= 1")
    if args.rerank_temperature is not None and not args.rerank_temperature > 0:
        parser.error("--rerank-temperature must be > 0")
    if not all(math.isfinite(b) for b in args.rerank_beta):
        parser.error("--rerank-beta must be finite")
    if args.label is not None and len(args.label) != len(args.checkpoint):
        parser.error(f"--label needs one name per --checkpoint ({len(args.checkpoint)})")
    if args.data != "synthetic":
        if args.data_path is None:
            parser.error(f"--data {args.data} needs --data-path")
        if not os.path.exists(args.data_path):
            parser.error(f"--data-path: no such file or folder: {args.data_path}")
    for spec in args.checkpoint:
        if (os.path.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors"))) and not os.path.exists(spec):
            parser.error(f"--checkpoint: no such file or folder: {spec}")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        parser.error(f"--image-root: no such folder: {args.image_root}")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"--output: no such folder: {os.path.dirname(os.path.abspath(args.output))}")
    return args


def _default_label(spec: str) -> str:
    """The run name for a run folder, RUN/FILE for a file in RUN/checkpoints/, else the file name or tag."""
    spec = os.path.normpath(spec)
    folder, name = os.path.split(spec)
    if os.path.basename(folder) == "checkpoints" and os.path.dirname(folder):
        return f"{os.path.basename(os.path.dirname(folder))}/{name}"
    return name


def _labels(args) -> List[str]:
    labels = args.label or [_default_label(spec) for spec in args.checkpoint]
    seen: Dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def format_table(columns: Dict[str, Dict[str, float]]) -> str:
    """Metrics as rows, models as columns (counts are left out)."""
    names = list(columns)
    keys = []
    for values in columns.values():
        keys += [k for k in values if not k.startswith("num_") and k not in keys]
    width = max([len(k) for k in keys] + [6]) + 2
    col = max([len(n) for n in names] + [8]) + 2
    lines = [" " * width + "".join(f"{n:>{col}}" for n in names)]
    for key in keys:
        cells = "".join(f"{columns[n][key]:>{col}.2f}" if key in columns[n] else f"{'-':>{col}}" for n in names)
        lines.append(f"{key:<{width}}{cells}")
    return "\n".join(lines)


def main(argv) -> Dict:
    """Evaluate every --checkpoint; print the table, write --output; returns the results dict."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = {"data": args.data, "data_path": args.data_path, "settings": {
        k: v for k, v in vars(args).items() if k not in ("checkpoint", "label", "output")}, "models": {}}
    columns: Dict[str, Dict[str, float]] = {}
    description = ""
    for spec, label in zip(args.checkpoint, _labels(args)):
        tic = time.time()
        try:
            encoder = load_encoder(spec, args.model, label, device, args.stretch_positions, args.rerank_topk,
                                   args.rerank_temperature)
            data = load_data(args, encoder.image_size)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from error
        description = data.description
        logging.info("%s: %s (%s, %d text positions) on %s", label, spec, encoder.model_name, encoder.context_length,
                     data.description)
        if isinstance(data, eval_data.ClassificationData):
            values = evaluate_zero_shot(encoder, data, device, args)
        else:
            values = evaluate_retrieval(encoder, data, device, args)
        columns[label] = values
        results["models"][label] = {
            "checkpoint": spec, "model": encoder.model_name, "context_length": encoder.context_length,
            "rerank_topk": encoder.topk if encoder.has_patches else None,
            "rerank_temperature": encoder.sap_temperature if encoder.has_patches else None,
            "seconds": round(time.time() - tic, 1), "metrics": values,
        }
        del encoder
    results["description"] = description
    print(f"\n{description}, percent:\n{format_table(columns)}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results written to {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
