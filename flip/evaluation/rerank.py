"""Re-ranking of contrastive retrieval by the image-text matching (ITM) head, as FLIP and BLIP report it.

The contrastive embeddings rank every candidate cheaply; the ITM head, which reads the caption
word by word against the image, is too slow for all pairs but affordable for each query's top K.
The re-ranked score of a top-K candidate is its ITM "match" logit (column 1 of the head, before
any softmax) plus its contrastive cosine similarity, BLIP's `score + topk_sim`; every top-K
candidate ranks above every other, and the others keep their contrastive order behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from flip.evaluation.features import model_device
from flip.models import FlipModel

# (query indices, candidate indices) of P pairs -> their ITM scores [P]
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reranked_scores(similarity: torch.Tensor, k: int, score_pairs: PairScorer) -> torch.Tensor:
    """`similarity` [Q, C] (cosines) with each row's top-`k` candidates re-scored by
    `score_pairs(query, candidate) + similarity`, shifted above every candidate outside the top k."""
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices
    query = torch.arange(similarity.shape[0]).repeat_interleave(k)
    candidate = top.flatten()
    combined = score_pairs(query, candidate).float().cpu() + similarity[query, candidate]
    out = similarity.clone()
    shift = float(similarity.max()) - float(combined.min()) + 1.0 if len(combined) else 0.0
    out[query, candidate] = combined + shift
    return out


def check_itm_head(model: FlipModel) -> None:
    """Fail early, and say what to do, when `model` cannot re-rank."""
    if getattr(model, "fusion", None) is None:
        raise ValueError(
            "retrieval rerank_k > 0 needs a model with an image-text matching head (trained with "
            "loss=clip_itm or loss=itc_queue_itm, which set model.fusion); this model has none: "
            "set rerank_k=0 for contrastive retrieval only"
        )


@torch.no_grad()
def itm_pair_scorer(
    model: FlipModel, image_batches: Iterable[torch.Tensor], texts: list[str], batch_size: int = 256
) -> tuple[PairScorer, PairScorer]:
    """(image->text, text->image) scorers of `model`'s ITM head on the images of `image_batches`
    (preprocessed, in order) and `texts`; the hidden states of every image and text are computed
    once and kept on the model's device (I x Ni x Wi + T x Nt x Wt values)."""
    check_itm_head(model)
    device = model_device(model)
    image_hidden = torch.cat([model.hidden_states(images=batch.to(device))[0] for batch in image_batches])
    ids = model.tokenize(texts).to(device)
    text_hidden = torch.cat(
        [model.hidden_states(text=ids[s : s + batch_size])[1] for s in range(0, len(ids), batch_size)]
    )

    def score(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(image), batch_size):
            i, t = image[s : s + batch_size].to(device), text[s : s + batch_size].to(device)
            out.append(model.itm_logits(image_hidden[i], text_hidden[t], ids[t])[:, 1].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    return score, lambda text, image: score(image, text)
