"""Evaluation metrics on hand-computed cases: known score matrices with known ranks, several
captions per image, ties, and the fine-grained subcaption scores."""
import math

import pytest
import torch

from mulclip import metrics
from mulclip.retrieval import recall_at_k


def test_recall_one_caption_per_image():
    # image 0: own 0.9 beats 0.1, 0.65 -> rank 0; image 1: own 0.3 < 0.8 -> rank 1; image 2: own 0.6 < 0.7 -> rank 1
    # text 0: column (0.9, 0.2, 0.4) -> 0; text 1: (0.1, 0.3, 0.7) -> 1; text 2: (0.65, 0.8, 0.6) -> 2
    sim = torch.tensor([[0.9, 0.1, 0.65],
                        [0.2, 0.3, 0.8],
                        [0.4, 0.7, 0.6]])
    image_ranks, text_ranks = metrics.retrieval_ranks(sim)
    assert image_ranks.tolist() == [0, 1, 1]
    assert text_ranks.tolist() == [0, 1, 2]
    r = metrics.retrieval_recall(sim, ks=(1, 2, 3, 10))
    assert r["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(100.0)
    assert r["text_to_image_R@1"] == pytest.approx(100 / 3)
    assert r["text_to_image_R@2"] == pytest.approx(200 / 3)
    assert r["text_to_image_R@3"] == r["text_to_image_R@10"] == pytest.approx(100.0)


def test_recall_several_captions_per_image():
    text_to_image = torch.tensor([0, 0, 1, 1, 1])
    sim = torch.tensor([[0.2, 0.6, 0.7, 0.1, 0.3],
                        [0.5, 0.4, 0.45, 0.8, 0.3]])
    image_ranks, text_ranks = metrics.retrieval_ranks(sim, text_to_image)
    # image 0: its best caption (0.6) is beaten by text 2 (0.7); its weak caption 0 (0.2) does not matter.
    # image 1: its best caption (0.8) beats the other image's captions (0.5, 0.4); its own 0.45 and 0.3 are no rivals.
    assert image_ranks.tolist() == [1, 0]
    # text 4 scores 0.3 with both images: the tie goes against it.
    assert text_ranks.tolist() == [1, 0, 1, 0, 1]
    r = metrics.retrieval_recall(sim, text_to_image, ks=(1, 2))
    assert r == pytest.approx({"image_to_text_R@1": 50.0, "text_to_image_R@1": 40.0,
                               "image_to_text_R@2": 100.0, "text_to_image_R@2": 100.0})


def test_ties_go_against_the_query():
    sim = torch.full((3, 3), 0.25)
    image_ranks, text_ranks = metrics.retrieval_ranks(sim)
    assert image_ranks.tolist() == text_ranks.tolist() == [2, 2, 2]
    r = metrics.retrieval_recall(sim, ks=(1, 2, 3))
    assert r["image_to_text_R@1"] == r["text_to_image_R@2"] == 0.0
    assert r["image_to_text_R@3"] == r["text_to_image_R@3"] == 100.0
    # one exact tie with a wrong caption: image 0 misses at 1 and hits at 2
    sim = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    assert metrics.retrieval_ranks(sim)[0].tolist() == [1, 0]


def _brute_force_ranks(sim, text_to_image):
    """Sort the candidates by score, wrong ones first among equals; the rank is the first right one's place."""
    image_ranks = []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda t: (-sim[i, t].item(), text_to_image[t] == i))
        image_ranks.append(next(p for p, t in enumerate(order) if text_to_image[t] == i))
    text_ranks = []
    for t in range(sim.shape[1]):
        order = sorted(range(sim.shape[0]), key=lambda i: (-sim[i, t].item(), i == text_to_image[t]))
        text_ranks.append(order.index(text_to_image[t]))
    return image_ranks, text_ranks


def test_ranks_match_brute_force_with_many_ties_and_do_not_depend_on_order():
    g = torch.Generator().manual_seed(3)
    text_to_image = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    sim = torch.randint(0, 4, (7, len(text_to_image)), generator=g).float()  # four values: ties everywhere
    image_ranks, text_ranks = metrics.retrieval_ranks(sim, text_to_image)
    expected = _brute_force_ranks(sim, text_to_image.tolist())
    assert image_ranks.tolist() == expected[0] and text_ranks.tolist() == expected[1]
    perm = torch.randperm(len(text_to_image), generator=g)
    shuffled = metrics.retrieval_ranks(sim[:, perm], text_to_image[perm])
    assert torch.equal(shuffled[0], image_ranks) and torch.equal(shuffled[1], text_ranks[perm])


def test_blocks_of_rows_give_the_same_ranks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(9).repeat_interleave(2)
    sim = torch.randn(9, 18, generator=g)
    whole = metrics.retrieval_ranks(sim, text_to_image)
    monkeypatch.setattr(metrics, "_ROW_BLOCK", 4)
    blocked = metrics.retrieval_ranks(sim, text_to_image)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


def test_agrees_with_the_training_package_without_ties():
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(6, 8, generator=g), torch.randn(14, 8, generator=g)
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 5, 5, 5, 1])
    ours = metrics.retrieval_recall(metrics.cosine_similarity(images, texts), text_to_image)
    assert ours == pytest.approx(recall_at_k(images, texts, text_to_image))


def test_recall_errors():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.retrieval_recall(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="image 1 has no text"):
        metrics.retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside"):
        metrics.retrieval_recall(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="square"):
        metrics.retrieval_recall(torch.zeros(2, 3))


def test_zero_shot_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.3, 0.2],   # label 0: rank 0
                           [0.5, 0.6, 0.4, 0.1],   # label 2: 0.5 and 0.6 above -> rank 2
                           [0.3, 0.3, 0.3, 0.3]])  # label 3: tied with the three others -> rank 3
    acc = metrics.zero_shot_accuracy(logits, torch.tensor([0, 2, 3]), ks=(1, 2, 3, 4))
    assert acc == pytest.approx({"top1": 100 / 3, "top2": 100 / 3, "top3": 200 / 3, "top4": 100.0})
    with pytest.raises(ValueError, match="labels outside"):
        metrics.zero_shot_accuracy(logits, torch.tensor([0, 1, 4]))


def test_hard_negative_accuracy():
    positive = torch.tensor([0.5, 0.4, 0.3, 0.2])
    negative = torch.tensor([[0.1, 0.2],               # beats both
                             [0.4, 0.1],               # tie: not beaten
                             [0.35, float("-inf")],    # padded, loses to 0.35
                             [0.1, float("-inf")]])    # padded, beats 0.1
    assert metrics.hard_negative_accuracy(positive, negative) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="NaN"):
        metrics.hard_negative_accuracy(positive, negative.nan_to_num(nan=0.0, neginf=float("nan")))


def _fine_example():
    # With k = 1 the region is the single best patch, so s(n, b) = max_p cos(u_n, v_bp).
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],      # image 0
                            [[-1.0, 0.0], [1.0, 1.0]]])    # image 1
    subcaptions = torch.tensor([[2.0, 0.0],    # caption 0: s = 1 (image 0), 1/sqrt 2 (image 1)
                                [0.0, -1.0],   # caption 0: s = 0 (image 0), 0 (image 1)
                                [0.0, 3.0]])   # caption 1: s = 1 (image 0), 1/sqrt 2 (image 1)
    owner = torch.tensor([0, 0, 1])  # caption 2 has no subcaption
    return subcaptions, owner, patches


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mean_subcaption_scores_by_hand(backend):
    subcaptions, owner, patches = _fine_example()
    fine = metrics.mean_subcaption_scores(subcaptions, owner, 3, patches, k=1, backend=backend)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.5, 1.0, 0.0],
                             [r / 2, r, 0.0]])
    torch.testing.assert_close(fine, expected)
    global_scores = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    reranked = metrics.rerank(global_scores, fine, 0.5)
    torch.testing.assert_close(reranked, global_scores + 0.5 * expected)
    # Text 1 ties between the images on the global score (a miss); its subcaptions pick image 0.
    text_to_image = torch.tensor([0, 0, 1])
    assert metrics.retrieval_ranks(global_scores, text_to_image)[1].tolist() == [1, 1, 1]
    assert metrics.retrieval_ranks(reranked, text_to_image)[1].tolist() == [1, 0, 1]


def test_mean_subcaption_scores_chunks_and_paired_diagonal():
    g = torch.Generator().manual_seed(2)
    B, M, P, d = 5, 3, 11, 8
    subcaptions = torch.randn(B, M, d, generator=g)
    mask = torch.rand(B, M, generator=g) < 0.7
    mask[0] = False  # a caption with no subcaption
    mask[1, 0] = True
    patches = torch.randn(B, P, d, generator=g)
    patch_mask = torch.ones(B, P, dtype=torch.bool)
    patch_mask[2, 7:] = False
    owner = torch.arange(B).repeat_interleave(M).view(B, M)[mask]
    flat = subcaptions[mask]
    whole = metrics.mean_subcaption_scores(flat, owner, B, patches, 4, patch_mask=patch_mask, temperature=0.1,
                                           backend="reference")
    chunked = metrics.mean_subcaption_scores(flat, owner, B, patches, 4, patch_mask=patch_mask, temperature=0.1,
                                             backend="torch", chunk_subcaptions=2, chunk_images=3)
    torch.testing.assert_close(chunked, whole)
    assert whole[:, 0].abs().max() == 0
    paired = metrics.paired_subcaption_scores(subcaptions, mask, patches, 4, patch_mask=patch_mask, temperature=0.1,
                                              backend="torch")
    torch.testing.assert_close(paired, whole.diagonal(), rtol=1e-5, atol=1e-6)


def test_paired_subcaption_scores_in_groups():
    g = torch.Generator().manual_seed(4)
    B, G, M, P, d = 3, 2, 3, 9, 6
    subcaptions = torch.randn(B, G * M, d, generator=g)
    mask = torch.rand(B, G * M, generator=g) < 0.6
    mask[1, :M] = False  # image 1's first caption has no subcaption: scores 0
    mask[:, M] = True
    patches = torch.randn(B, P, d, generator=g)
    grouped = metrics.paired_subcaption_scores(subcaptions, mask, patches, 3, backend="torch", groups=G)
    assert grouped.shape == (B, G) and grouped[1, 0] == 0
    for j in range(G):
        alone = metrics.paired_subcaption_scores(subcaptions[:, j * M:(j + 1) * M], mask[:, j * M:(j + 1) * M],
                                                 patches, 3, backend="torch")
        torch.testing.assert_close(grouped[:, j], alone)
    with pytest.raises(ValueError, match="groups"):
        metrics.paired_subcaption_scores(subcaptions, mask, patches, 3, backend="torch", groups=4)
