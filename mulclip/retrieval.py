"""Retrieval scores from embeddings: Recall@k both ways and hard-negative accuracy (method section 7)."""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F


def recall_at_k(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Optional[torch.Tensor] = None,
    ks: Sequence[int] = (1, 5, 10),
) -> Dict[str, float]:
    """Image-to-text and text-to-image Recall@k (in percent) from (I, d) and (T, d) embeddings.

    Args:
        image_features, text_features: embeddings, normalised here (cosine similarity).
        text_to_image: (T,) index of each text's image; None means text i belongs to image i.
            With several captions per image, image-to-text counts a hit when any of the image's
            captions is in the top k.
        ks: the k of Recall@k (k larger than the candidates counts every query as a hit).
            A candidate scoring exactly as high as the positive does not push it down.

    Returns:
        {"image_to_text_R@k": ..., "text_to_image_R@k": ...} for every k.
    """
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    if text_to_image is None:
        if images.shape[0] != texts.shape[0]:
            raise ValueError("without text_to_image, image and text counts must match")
        text_to_image = torch.arange(texts.shape[0], device=texts.device)
    text_to_image = text_to_image.to(texts.device)
    similarity = images @ texts.t()  # (I, T)
    image_ids = torch.arange(images.shape[0], device=images.device)
    positive = text_to_image[None, :] == image_ids[:, None]  # (I, T)

    # Rank of the best positive text of each image, and of the image of each text.
    best_positive = similarity.masked_fill(~positive, float("-inf")).max(dim=1).values
    i2t_rank = (similarity > best_positive[:, None]).sum(dim=1)
    own = similarity[text_to_image, torch.arange(texts.shape[0], device=texts.device)]
    t2i_rank = (similarity.t() > own[:, None]).sum(dim=1)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return metrics


def hard_negative_accuracy(image_features: torch.Tensor, positive_text: torch.Tensor, negative_text: torch.Tensor) -> float:
    """Percent of images whose own caption scores strictly above every one of its negatives.

    Args:
        image_features: (I, d); positive_text: (I, d); negative_text: (I, N, d).
    """
    images = F.normalize(image_features.float(), dim=-1)
    positive = (images * F.normalize(positive_text.float(), dim=-1)).sum(-1)
    negative = torch.einsum("id,ind->in", images, F.normalize(negative_text.float(), dim=-1))
    return 100.0 * (positive > negative.max(dim=1).values).float().mean().item()
