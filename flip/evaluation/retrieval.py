"""Image <-> text retrieval on a captioned split: Recall@k in both directions, and, with `rerank_k`,
the same recalls after the ITM head re-scores each query's contrastive top K (flip.evaluation.rerank)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flip.evaluation.features import BenchmarkFeatures, SplitFeatures, extract_text_features
from flip.evaluation.rerank import check_itm_head, itm_pair_scorer, reranked_scores
from flip.models import FlipModel

RECALL_AT = (1, 5, 10)
# similarities computed at once up to this many entries (float32: 256 MiB), else in row blocks:
# with ten captions per image (MM-CelebA-HQ), thousands of test images make a matrix of gigabytes
MAX_SIMILARITY_ELEMENTS = 1 << 26


def flatten_captions(
    captions: Sequence[str] | Sequence[Sequence[str]],
) -> tuple[list[str], torch.Tensor | None]:
    """The texts to encode and, when an image has a list of captions, the image of each text.

    One caption per image gives (captions, None): text i belongs to image i.
    """
    if all(isinstance(c, str) for c in captions):
        return list(captions), None
    texts, owner = [], []
    for image, caps in enumerate(captions):
        caps = [caps] if isinstance(caps, str) else list(caps)
        texts += caps
        owner += [image] * len(caps)
    return texts, torch.as_tensor(owner, dtype=torch.int64)


def _ranks(sim: torch.Tensor, query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per query row of `sim`, how many candidates score strictly above its best true candidate
    (true pairs: (query[p], target[p])); 0 means a true candidate is ranked first."""
    best = torch.full((sim.shape[0],), -math.inf, dtype=sim.dtype, device=sim.device)
    best.scatter_reduce_(0, query, sim[query, target], reduce="amax")
    return (sim > best[:, None]).sum(dim=1)


def _blocked_ranks(
    queries: torch.Tensor, candidates: torch.Tensor, query: torch.Tensor, target: torch.Tensor, rows: int
) -> torch.Tensor:
    """`_ranks` of queries @ candidates.T, computed `rows` queries at a time."""
    out = []
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        inside = (query >= start) & (query < stop)
        sim = queries[start:stop] @ candidates.T
        out.append(_ranks(sim, query[inside] - start, target[inside]))
    return torch.cat(out)


def retrieval_recalls(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = RECALL_AT,
    text_image: torch.Tensor | None = None,
    max_elements: int = MAX_SIMILARITY_ELEMENTS,
) -> dict[str, float]:
    """Recall@k of image->text (`i2t_R@k`) and text->image (`t2i_R@k`) retrieval.

    `text_image[t]` is the image text t describes (an image may have several texts, as
    MM-CelebA-HQ's ten captions); None means text i describes image i. A text is found when
    its image ranks within k; an image is found when ANY of its texts ranks within k, so
    i2t is averaged over images and t2i over texts. A tie with a true pair counts in its
    favour (only strictly better candidates rank ahead).
    """
    n_images, n_texts = len(image_features), len(text_features)
    text_image = _text_image(n_images, n_texts, text_image)
    texts = torch.arange(n_texts)
    if n_images * n_texts <= max_elements:  # one matrix, read in both directions
        similarity = image_features @ text_features.T
        i2t = _ranks(similarity, text_image, texts)
        t2i = _ranks(similarity.T, texts, text_image)
    else:
        i2t = _blocked_ranks(
            image_features, text_features, text_image, texts, max(1, max_elements // n_texts)
        )
        t2i = _blocked_ranks(
            text_features, image_features, texts, text_image, max(1, max_elements // n_images)
        )
    return _recalls(i2t, t2i, ks)


def reranked_recalls(
    i2t_scores: torch.Tensor,
    t2i_scores: torch.Tensor,
    ks: Sequence[int] = RECALL_AT,
    text_image: torch.Tensor | None = None,
) -> dict[str, float]:
    """`retrieval_recalls` of given score matrices, one per direction (images x texts and texts x
    images: re-ranking scores each direction's own top K), named `i2t_rerank_R@k` / `t2i_rerank_R@k`."""
    n_images, n_texts = i2t_scores.shape
    text_image = _text_image(n_images, n_texts, text_image)
    texts = torch.arange(n_texts)
    recalls = _recalls(_ranks(i2t_scores, text_image, texts), _ranks(t2i_scores, texts, text_image), ks)
    return {name.replace("_R@", "_rerank_R@"): value for name, value in recalls.items()}


def _recalls(i2t: torch.Tensor, t2i: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    out = {}
    for direction, rank in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{direction}_R@{k}"] = float((rank < k).float().mean())
    return out


def _text_image(n_images: int, n_texts: int, text_image: torch.Tensor | None) -> torch.Tensor:
    """The checked image index of each text."""
    if text_image is None:
        if n_images != n_texts:
            raise ValueError(
                f"{n_images} images and {n_texts} texts: give text_image (the image of each text) "
                "when an image has several texts"
            )
        text_image = torch.arange(n_texts)
    text_image = torch.as_tensor(text_image, dtype=torch.int64)
    if text_image.shape != (n_texts,) or (
        n_texts and not 0 <= int(text_image.min()) <= int(text_image.max()) < n_images
    ):
        raise ValueError(
            f"text_image must give each of the {n_texts} texts an image index in [0, {n_images})"
        )
    uncaptioned = (torch.bincount(text_image, minlength=n_images) == 0).nonzero().flatten()
    if len(uncaptioned):
        raise ValueError(f"{len(uncaptioned)} image(s) have no text, e.g. image {int(uncaptioned[0])}")
    return text_image


def evaluate_retrieval(
    model: FlipModel,
    features: SplitFeatures,
    checkpoint: str | None = None,
    batch_size: int = 256,
    rerank_k: int = 0,
) -> dict[str, Any]:
    """Retrieval metrics of a captioned split, in the metrics.json schema; with `rerank_k` > 0 also
    the recalls after ITM re-ranking of each query's contrastive top `rerank_k` (`*_rerank_R@k`)."""
    if isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or rerank_k < 0:
        raise ValueError(f"rerank_k must be an integer >= 0 (0: no re-ranking), got {rerank_k!r}")
    if rerank_k:
        check_itm_head(model)  # before any work
    split = features.split
    if split.captions is None:
        raise ValueError(
            f"{split.benchmark}/{split.split} has no captions; retrieval needs a captioned split "
            "(faceshapes, labelled shards, or a csv benchmark with a 'caption' column)"
        )
    texts, text_image = flatten_captions(split.captions)
    text_features = extract_text_features(model, texts, batch_size)
    summary = retrieval_recalls(features.features, text_features, text_image=text_image)
    if rerank_k:
        summary.update(_reranked(model, features, texts, text_features, text_image, rerank_k, batch_size))
    return {
        "benchmark": split.benchmark,
        "protocol": "retrieval",
        "task": "retrieval",
        "checkpoint": checkpoint,
        "split": split.split,
        "n_train": 0,
        "n_test": len(split),
        "n_texts": len(texts),
        "labels": [],
        "summary": summary,
        "per_label": {},
        **({"rerank_k": rerank_k} if rerank_k else {}),
    }


def _image_batches(model: FlipModel, features: SplitFeatures, batch_size: int):
    """The split's (readable) images, preprocessed for evaluation, in the order of its features."""
    images = features.split.images
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        yield torch.stack([model.preprocess(images.load(i)) for i in range(start, stop)])


def blocked_reranked_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query: torch.Tensor,
    target: torch.Tensor,
    k: int,
    score_pairs,
    rows: int,
) -> torch.Tensor:
    """`_ranks` of `reranked_scores(queries @ candidates.T, k, score_pairs)`, `rows` queries at a
    time: ten captions per image make a matrix of gigabytes, and re-ranking copies it."""
    out = []
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        inside = (query >= start) & (query < stop)
        scores = reranked_scores(
            queries[start:stop] @ candidates.T, k, lambda q, c, start=start: score_pairs(q + start, c)
        )
        out.append(_ranks(scores, query[inside] - start, target[inside]))
    return torch.cat(out)


@torch.no_grad()
def _reranked(
    model: FlipModel,
    features: SplitFeatures,
    texts: list[str],
    text_features: torch.Tensor,
    text_image: torch.Tensor | None,
    k: int,
    batch_size: int,
    max_elements: int = MAX_SIMILARITY_ELEMENTS,
) -> dict[str, float]:
    i2t_itm, t2i_itm = itm_pair_scorer(model, _image_batches(model, features, batch_size), texts, batch_size)
    images, n_texts = features.features.float(), len(text_features)
    text_image = _text_image(len(images), n_texts, text_image)
    texts_index = torch.arange(n_texts)
    i2t = blocked_reranked_ranks(
        images, text_features, text_image, texts_index, k, i2t_itm, max(1, max_elements // n_texts)
    )
    t2i = blocked_reranked_ranks(
        text_features, images, texts_index, text_image, k, t2i_itm, max(1, max_elements // len(images))
    )
    recalls = _recalls(i2t, t2i, RECALL_AT)
    return {name.replace("_R@", "_rerank_R@"): value for name, value in recalls.items()}


@dataclass
class Retrieval:
    """The retrieval protocol (conf/protocol/retrieval.yaml): Recall@k on the evaluated split's captions;
    `rerank_k` > 0 adds the recalls after re-ranking each query's contrastive top K by the ITM head."""

    rerank_k: int = 0

    def __call__(
        self, model: FlipModel, features: BenchmarkFeatures, checkpoint: str | None = None
    ) -> dict[str, Any]:
        return evaluate_retrieval(model, features(), checkpoint, features.batch_size, self.rerank_k)
