"""Evaluation metrics of method section 7, from score matrices.

Everything here works on scores that are already computed (cosine similarities, logits, the
fine-grained subcaption scores), so that the rules are testable on hand-made matrices:

- Retrieval Recall@k both ways with several captions per image: an image query is a hit at k
  when any of its captions is among the top k texts; a text query has exactly one image.
- Zero-shot classification top-k accuracy.
- Hard-negative accuracy: the true caption must score above every one of its negatives.
- The fine-grained rerank (ours): `score(t, b) = global(t, b) + beta * mean_{n in t} s(n, b)`
  over caption t's subcaptions, with `s(n, b)` from `mulclip_kernels.subcaption_patch_scores`.

Ties (one rule everywhere, deterministic and conservative): a wrong candidate that scores
exactly as high as the right one ranks ahead of it. The rank of a query is the number of
wrong candidates scoring >= its best right one, and the query is a hit at k when that rank is
< k. So a model that gives every candidate the same score gets no hit at all (instead of 100 %
under the opposite rule), and the result never depends on the order of the candidates. Other
captions of the same image are right answers, never wrong candidates. Scores must be finite
(a NaN would compare false against everything and silently count as a hit).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores

DEFAULT_KS = (1, 5, 10)
_ROW_BLOCK = 1024  # rows of a score matrix compared at once: bounds the (rows, T) temporaries


def _check_finite(name: str, scores: torch.Tensor) -> None:
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf): rank-based metrics would be meaningless")


def cosine_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(I, T) cosine similarities of (I, d) image and (T, d) text embeddings, in float32."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).t()


def _ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per row: the number of non-positive columns scoring >= the row's best positive column."""
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positive).sum(dim=1)


def retrieval_ranks(similarity: torch.Tensor, text_to_image: Optional[torch.Tensor] = None):
    """Ranks of the right answers of every query, under the module's tie rule (0 is the top).

    Args:
        similarity: (I, T) scores of every image against every text (higher is better).
        text_to_image: (T,) index of each text's image; None means text i belongs to image i.

    Returns:
        (image_ranks (I,), text_ranks (T,)): for image i the number of other images' texts
        scoring >= its best own text; for text t the number of other images scoring >= its own.

    Raises:
        ValueError: non-finite scores, a text pointing outside the images, or an image with no text.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (I, T), got shape {tuple(similarity.shape)}")
    I, T = similarity.shape
    if text_to_image is None:
        if I != T:
            raise ValueError(f"without text_to_image, similarity must be square, got {I} images and {T} texts")
        text_to_image = torch.arange(T)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=similarity.device)
    if text_to_image.shape != (T,):
        raise ValueError(f"text_to_image must be ({T},), got shape {tuple(text_to_image.shape)}")
    if T and (text_to_image.min() < 0 or text_to_image.max() >= I):
        raise ValueError(f"text_to_image has indices outside 0..{I - 1}")
    counts = torch.bincount(text_to_image, minlength=I)
    if (counts == 0).any():
        missing = int((counts == 0).nonzero()[0])
        raise ValueError(f"image {missing} has no text: image-to-text recall is undefined for it")
    _check_finite("similarity", similarity)

    image_ranks = torch.empty(I, dtype=torch.long, device=similarity.device)
    for start in range(0, I, _ROW_BLOCK):
        rows = torch.arange(start, min(start + _ROW_BLOCK, I), device=similarity.device)
        image_ranks[rows] = _ranks(similarity[rows], text_to_image[None, :] == rows[:, None])
    text_ranks = torch.empty(T, dtype=torch.long, device=similarity.device)
    images = torch.arange(I, device=similarity.device)
    for start in range(0, T, _ROW_BLOCK):
        cols = torch.arange(start, min(start + _ROW_BLOCK, T), device=similarity.device)
        text_ranks[cols] = _ranks(similarity[:, cols].t(), images[None, :] == text_to_image[cols, None])
    return image_ranks, text_ranks


def retrieval_recall(
    similarity: torch.Tensor, text_to_image: Optional[torch.Tensor] = None, ks: Sequence[int] = DEFAULT_KS
) -> Dict[str, float]:
    """Image-to-text and text-to-image Recall@k in percent (see the module docstring for ties).

    Args:
        similarity: (I, T) scores; text_to_image: (T,) image of each text (None: the diagonal).
        ks: the k of Recall@k; a k at or above the number of candidates makes every query a hit.

    Returns:
        {"image_to_text_R@k": ..., "text_to_image_R@k": ...} for every k.
    """
    image_ranks, text_ranks = retrieval_ranks(similarity, text_to_image)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * (image_ranks < k).double().mean().item()
        metrics[f"text_to_image_R@{k}"] = 100.0 * (text_ranks < k).double().mean().item()
    return metrics


def zero_shot_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k classification accuracy in percent; a class tied with the true one ranks ahead of it.

    Args:
        logits: (N, C) class scores; labels: (N,) true class indices.

    Returns:
        {"top1": ..., "top5": ...} (one key per k).
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"need logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels outside 0..{logits.shape[1] - 1}")
    _check_finite("logits", logits)
    positive = F.one_hot(labels, logits.shape[1]).bool()
    ranks = _ranks(logits, positive)
    return {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def hard_negative_accuracy(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Percent of queries whose true caption scores strictly above every one of its negatives.

    Args:
        positive_scores: (I,) score of each image with its own caption.
        negative_scores: (I, N) scores with its N negative captions; -inf pads an image with fewer.
    """
    if negative_scores.ndim != 2 or positive_scores.shape != negative_scores.shape[:1]:
        raise ValueError(f"need positive (I,) and negative (I, N) scores, got {tuple(positive_scores.shape)} "
                         f"and {tuple(negative_scores.shape)}")
    _check_finite("positive_scores", positive_scores)
    if torch.isnan(negative_scores).any() or torch.isposinf(negative_scores).any():
        raise ValueError("negative_scores has NaN or +inf values")
    beaten = positive_scores > negative_scores.max(dim=1).values
    return 100.0 * beaten.double().mean().item()


@torch.no_grad()
def mean_subcaption_scores(
    subcaptions: torch.Tensor,
    owner: torch.Tensor,
    num_captions: int,
    patches: torch.Tensor,
    k: int,
    *,
    patch_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.05,
    backend: str = "auto",
    chunk_subcaptions: int = 4096,
    chunk_images: int = 1024,
) -> torch.Tensor:
    """`fine(b, t) = mean_{n: owner[n] = t} s(n, b)`: every image against every caption (method section 7).

    `s(n, b) = u_n . norm(r(u_n, image_b))`, the cross score of `subcaption_patch_scores`
    (top-k region of image b for subcaption n). Computed in (subcaption, image) chunks, so the
    memory beyond the output is bounded by the chunk sizes; patches may be stored in a low
    precision and are converted to float32 chunk by chunk.

    Args:
        subcaptions: (N, d) subcaption embeddings; owner: (N,) caption index of each, in 0..T-1.
        num_captions: T. A caption with no subcaption gets a fine score of 0.
        patches: (I, P, d) patch embeddings of the images.
        k, patch_mask, temperature, backend: as `subcaption_patch_scores`.

    Returns:
        (I, T) float32, laid out like the global similarity of `retrieval_recall`.
    """
    if subcaptions.ndim != 2 or owner.shape != subcaptions.shape[:1]:
        raise ValueError(f"need subcaptions (N, d) and owner (N,), got {tuple(subcaptions.shape)} and {tuple(owner.shape)}")
    owner = owner.to(device=subcaptions.device, dtype=torch.long)
    if owner.numel() and (owner.min() < 0 or owner.max() >= num_captions):
        raise ValueError(f"owner has caption indices outside 0..{num_captions - 1}")
    I = patches.shape[0]
    total = torch.zeros((I, num_captions), dtype=torch.float32, device=subcaptions.device)
    for i0 in range(0, I, chunk_images):
        image_patches = patches[i0:i0 + chunk_images].float()
        mask = None if patch_mask is None else patch_mask[i0:i0 + chunk_images]
        for n0 in range(0, subcaptions.shape[0], chunk_subcaptions):
            scores = subcaption_patch_scores(subcaptions[n0:n0 + chunk_subcaptions].float(), image_patches, k,
                                             patch_mask=mask, temperature=temperature, backend=backend)
            total[i0:i0 + image_patches.shape[0]].index_add_(1, owner[n0:n0 + chunk_subcaptions], scores.float().t())
    counts = torch.bincount(owner, minlength=num_captions).clamp_min(1)
    return total / counts[None, :]


@torch.no_grad()
def paired_subcaption_scores(
    subcaptions: torch.Tensor,
    subcaption_mask: torch.Tensor,
    patches: torch.Tensor,
    k: int,
    *,
    patch_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.05,
    backend: str = "auto",
    groups: Optional[int] = None,
) -> torch.Tensor:
    """`mean_n s(n, b)` of captions against their own image only: the diagonal of `mean_subcaption_scores`.

    Uses `subcaption_patch_align` (regions of each caption's subcaptions in its own image), so
    it costs O(B M P) instead of O(B^2 M P); `s = u . norm(region)`.

    Args:
        subcaptions: (B, M, d); subcaption_mask: (B, M) bool; patches: (B, P, d), row b the
            image of the captions in row b. A caption with no valid subcaption scores 0.
        groups: None: row b holds one caption's subcaptions. G: row b holds G captions of
            image b, M / G subcaption slots each, in order (e.g. an image's hard negatives).

    Returns:
        (B,) float32, or (B, G) with `groups`.
    """
    B, M, _ = subcaptions.shape
    G = groups or 1
    if M % G:
        raise ValueError(f"{M} subcaption slots do not split into {G} groups")
    subcaptions = subcaptions.float()
    regions = subcaption_patch_align(subcaptions, patches.float(), k, subcaption_mask=subcaption_mask,
                                     patch_mask=patch_mask, temperature=temperature, backend=backend)
    cos = (F.normalize(subcaptions, dim=-1, eps=1e-6) * F.normalize(regions.float(), dim=-1, eps=1e-6)).sum(-1)
    cos = cos.masked_fill(~subcaption_mask, 0.0).view(B, G, M // G)
    mean = cos.sum(dim=2) / subcaption_mask.view(B, G, M // G).sum(dim=2).clamp_min(1)
    return mean if groups else mean[:, 0]


def rerank(global_scores: torch.Tensor, fine_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """The fine-grained rerank score `global + beta * fine` (shapes must match)."""
    if global_scores.shape != fine_scores.shape:
        raise ValueError(f"global {tuple(global_scores.shape)} and fine {tuple(fine_scores.shape)} scores differ in shape")
    return global_scores.float() + beta * fine_scores.float()
