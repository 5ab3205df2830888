"""Retrieval with several captions per image (MM-CelebA-HQ has ten), against rankings done by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flip.benchmarks.base import ImageFiles, LabelledSplit
from flip.evaluation.features import SplitFeatures, extract_text_features
from flip.evaluation.retrieval import flatten_captions, retrieval_recalls
from flip.evaluation.zeroshot import evaluate_zeroshot

KS = (1, 5, 10)


def _integer_features(rng: np.random.Generator, n: int, d: int = 4) -> torch.Tensor:
    """Small integers: every dot product is exact, so ties are real ties in torch and by hand."""
    return torch.as_tensor(rng.integers(-2, 3, size=(n, d)), dtype=torch.float32)


def _by_hand(image: torch.Tensor, text: torch.Tensor, owner: list[int]) -> dict[str, float]:
    """Loops over every pair: a candidate ranks ahead only when strictly more similar."""
    img, txt = image.tolist(), text.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    out = {}
    found_images = {k: 0 for k in KS}
    for i in range(len(img)):
        scores = [dot(img[i], t) for t in txt]
        best_rank = min(sum(s > scores[c] for s in scores) for c in range(len(txt)) if owner[c] == i)
        for k in KS:
            found_images[k] += best_rank < k
    found_texts = {k: 0 for k in KS}
    for t in range(len(txt)):
        scores = [dot(im, txt[t]) for im in img]
        rank = sum(s > scores[owner[t]] for s in scores)
        for k in KS:
            found_texts[k] += rank < k
    for k in KS:
        out[f"i2t_R@{k}"] = found_images[k] / len(img)
        out[f"t2i_R@{k}"] = found_texts[k] / len(txt)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_elements", [1 << 26, 7])  # one matrix, and row blocks of a few rows
def test_several_captions_per_image_equal_a_ranking_by_hand(seed, max_elements):
    rng = np.random.default_rng(seed)
    n_images = 23
    owner = sorted(int(i) for i in np.concatenate([np.arange(n_images), rng.integers(0, n_images, 40)]))
    image = _integer_features(rng, n_images)
    text = _integer_features(rng, len(owner))
    text[::3] = image[torch.as_tensor(owner[::3])]  # some captions point at their image
    image[5] = image[4]  # a duplicated image: ties between images
    got = retrieval_recalls(image, text, text_image=torch.as_tensor(owner), max_elements=max_elements)
    assert got == pytest.approx(_by_hand(image, text, owner))
    assert 0 < got["i2t_R@1"] < 1 and 0 < got["t2i_R@1"] < 1  # neither trivial


def test_an_image_is_found_when_any_of_its_captions_ranks_within_k():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0: its first caption is the worst for it, its second the best; image 1's only caption
    # ties with image 0's best one for image 1 (the tie counts for the true pair)
    text = torch.tensor([[-1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    got = retrieval_recalls(image, text, ks=(1,), text_image=torch.tensor([0, 0, 1]))
    assert got["i2t_R@1"] == 1.0  # image 0 via caption 1, image 1 via caption 2 (tied with caption 1)
    assert got["t2i_R@1"] == pytest.approx(2 / 3)  # caption 0 ranks image 1 (0 > -1) above image 0


def _old_retrieval_recalls(image_features, text_features, ks=KS):
    """retrieval_recalls before several captions per image were supported, verbatim."""
    similarity = image_features @ text_features.T
    truth = torch.arange(len(similarity))
    out = {}
    for direction, sim in (("i2t", similarity), ("t2i", similarity.T)):
        rank = (sim > sim[truth, truth][:, None]).sum(dim=1)
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_one_caption_per_image_is_what_it_was(seed):
    torch.manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    text[:12] = image[:12]
    text[20] = text[21]  # a tie between texts
    old = _old_retrieval_recalls(image, text)
    assert retrieval_recalls(image, text) == old
    assert retrieval_recalls(image, text, text_image=torch.arange(40)) == old
    ints = _integer_features(np.random.default_rng(seed), 40)
    assert retrieval_recalls(ints, ints.flip(0)) == pytest.approx(
        _by_hand(ints, ints.flip(0), list(range(40)))
    )


def test_flattening_keeps_plain_captions_as_they_are_and_numbers_lists_by_image():
    assert flatten_captions(["a", "b"]) == (["a", "b"], None)
    texts, owner = flatten_captions([["a", "b"], ["c"], ["d", "e", "f"]])
    assert texts == list("abcdef") and owner.tolist() == [0, 0, 1, 2, 2, 2]


def test_retrieval_refuses_images_without_texts_and_unpaired_counts():
    image, text = torch.eye(3), torch.eye(3)[:2]
    with pytest.raises(ValueError, match="give text_image"):
        retrieval_recalls(image, text)
    with pytest.raises(ValueError, match=r"1 image\(s\) have no text, e.g. image 2"):
        retrieval_recalls(image, text, text_image=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"an image index in \[0, 3\)"):
        retrieval_recalls(image, text, text_image=torch.tensor([0, 3]))


def test_zeroshot_reports_retrieval_over_every_caption_of_a_split(tiny_model):
    captions = [["a red face", "a smiling face"], ["a blue face"], ["a face", "a face with a hat", "hat"]]
    split = LabelledSplit(
        benchmark="toy",
        split="test",
        task="attributes",
        label_names=["red"],
        targets=np.array([[1], [0], [0]], dtype=np.int8),
        images=ImageFiles(("a.png", "b.png", "c.png")),
        keys=["a", "b", "c"],
        captions=captions,
    )
    image = torch.nn.functional.normalize(
        torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    metrics = evaluate_zeroshot(tiny_model, SplitFeatures(image, split), {"binary": None})
    text = extract_text_features(tiny_model, [c for caps in captions for c in caps])
    assert metrics["retrieval"] == pytest.approx(_by_hand(image, text, [0, 0, 1, 2, 2, 2]))
