"""Image-text matching: the fusion encoder, hard negatives (never a positive, drawn from the masked
contrastive softmax, on one process and on two gloo ranks), the loss written out, a train.py run
with loss=clip_itm reloaded by flip.load, and retrieval's ITM re-ranking against brute force."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn

import flip
from flip.evaluation.clip_benchmark import _retrieval as clip_benchmark_retrieval
from flip.evaluation.features import SplitFeatures
from flip.evaluation.rerank import reranked_scores
from flip.evaluation.retrieval import (
    Retrieval,
    blocked_reranked_ranks,
    evaluate_retrieval,
    reranked_recalls,
    retrieval_recalls,
)
from flip.evaluation.run import build_protocols
from flip.export.safetensors_format import write_safetensors_folder
from flip.losses import ItmLoss, build_loss
from flip.losses.itm import negative_distribution, positive_mask, sample_negatives
from flip.models import build_model
from flip.models.fusion import BertCrossFusion, ItmFusion
from flip.training.run import train

from .helpers import compose_eval, free_port, loss_file
from .helpers.bert import bert_arch, write_tiny_bert
from .helpers.configs import TINY_ARCH


class Recorder(nn.Module):
    """A stand-in for a model with an ITM head: scores a pair from the markers in its hidden states
    (image b's states are all b, caption b's all b: global indices) and records every pair."""

    def __init__(self) -> None:
        super().__init__()
        self.fusion = nn.Linear(2, 2)  # what ItmLoss.bind looks for
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def itm_logits(self, images: torch.Tensor, texts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self.pairs.append((images[:, 0, 0].detach().long(), texts[:, 0, 0].detach().long(), ids.clone()))
        return self.fusion(torch.stack([images.mean(dim=(1, 2)), texts.mean(dim=(1, 2))], dim=1))


def marked(indices: torch.Tensor, n: int = 2) -> torch.Tensor:
    return indices.float()[:, None, None].expand(-1, n, 3).clone().requires_grad_()


# captions (as token ids) of a batch of 8: rows 0 and 1 are the same caption (a duplicated sample),
# rows 2, 3 and 4 too; 5, 6, 7 are unique
IDS = torch.tensor([[5, 1], [5, 1], [7, 2], [7, 2], [7, 2], [9, 3], [9, 4], [8, 8]])


def features(seed: int, n: int = 8, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(2))


def test_positives_are_the_own_pair_every_equal_caption_and_every_equal_key():
    keys = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6])  # 5 and 6: one image, two captions
    mask = positive_mask(IDS, IDS)
    same = {(0, 1), (1, 0), (2, 3), (3, 2), (2, 4), (4, 2), (3, 4), (4, 3)}
    expected = torch.tensor([[i == j or (i, j) in same for j in range(8)] for i in range(8)])
    assert torch.equal(mask, expected)
    with_keys = positive_mask(IDS, IDS, local_keys=keys, all_keys=keys)
    expected[5, 6] = expected[6, 5] = True
    assert torch.equal(with_keys, expected)
    # rank 1 of 2: row i's own column is 4 + i
    assert torch.equal(positive_mask(IDS[4:], IDS)[:, 4:].diagonal(), torch.ones(4, dtype=torch.bool))


def test_the_sampling_distribution_is_the_masked_softmax():
    image, text = features(0)
    logits = 10.0 * image @ text.T
    positives = positive_mask(IDS, IDS)
    direct = logits.softmax(dim=1).masked_fill(positives, 0.0)
    direct = direct / direct.sum(dim=1, keepdim=True)
    weights = negative_distribution(logits, positives)
    torch.testing.assert_close(weights, direct)
    # what torch.multinomial draws from: frequencies of 20,000 draws per row within 4 sigma
    draws = 20_000
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros_like(weights)
    for _ in range(draws // 1000):
        index, valid = sample_negatives(weights.repeat_interleave(1000, dim=0), g)
        assert valid.all()
        counts += F.one_hot(index, 8).float().view(8, 1000, 8).sum(dim=1)
    frequency = counts / draws
    sigma = (direct * (1 - direct) / draws).sqrt()
    assert ((frequency - direct).abs() <= 4 * sigma + 1e-9).all()
    assert counts[positives].sum() == 0


def test_a_row_whose_every_column_is_positive_has_no_negative():
    positives = torch.ones(3, 3, dtype=torch.bool)
    positives[0, 2] = False
    weights = negative_distribution(torch.randn(3, 3), positives)
    assert torch.equal(weights[1:], torch.zeros(2, 3)) and weights[0, 2] == 1
    index, valid = sample_negatives(weights)
    assert valid.tolist() == [True, False, False] and index[0] == 2


def test_no_negative_is_ever_a_positive_and_the_weights_are_the_masked_softmax(monkeypatch):
    seen = []
    multinomial = torch.multinomial
    monkeypatch.setattr(
        torch, "multinomial", lambda w, *a, **k: seen.append(w.clone()) or multinomial(w, *a, **k)
    )
    model, loss = Recorder(), ItmLoss()
    loss.bind(model)
    image, text = features(2)
    scale = torch.tensor(20.0)
    positives = positive_mask(IDS, IDS)
    for _ in range(50):
        loss(image, text, scale, marked(torch.arange(8)), marked(torch.arange(8)), IDS)
    for images, texts, ids in model.pairs:
        assert torch.equal(images[:8], torch.arange(8)) and torch.equal(texts[:8], torch.arange(8))
        negative_texts, negative_images = texts[8:16], images[16:]
        assert torch.equal(ids[8:16], IDS[negative_texts])  # ids travel with their caption
        assert not positives[torch.arange(8), negative_texts].any()
        assert not positives[torch.arange(8), negative_images].any()
    torch.testing.assert_close(seen[0], negative_distribution(scale * image @ text.T, positives))
    torch.testing.assert_close(seen[1], negative_distribution(scale * text @ image.T, positives))


def test_the_loss_is_the_cross_entropy_of_positives_and_both_negatives_written_out():
    model, loss = Recorder(), ItmLoss()
    loss.bind(model)
    loss.generator = torch.Generator().manual_seed(3)
    image, text = features(4)
    value = loss(image, text, torch.tensor(5.0), marked(torch.arange(8)), marked(torch.arange(8)), IDS)
    images, texts, _ = model.pairs[0]
    assert len(images) == 24
    w, b = model.fusion.weight.detach(), model.fusion.bias.detach()
    total = 0.0
    for n, (i, t) in enumerate(zip(images.tolist(), texts.tolist(), strict=True)):
        logits = [float(w[c, 0] * i + w[c, 1] * t + b[c]) for c in range(2)]
        label = 1 if n < 8 else 0
        total -= logits[label] - math.log(sum(math.exp(x) for x in logits))
    assert value.item() == pytest.approx(total / 24, rel=1e-5)
    value.backward()
    assert model.fusion.weight.grad is not None


def test_a_batch_of_one_caption_has_positives_only():
    model, loss = Recorder(), ItmLoss()
    loss.bind(model)
    ids = torch.tensor([[4, 4]] * 3)
    image, text = features(5, n=3)
    value = loss(image, text, torch.tensor(5.0), marked(torch.arange(3)), marked(torch.arange(3)), ids)
    assert len(model.pairs[0][0]) == 3 and torch.isfinite(value)


def test_a_model_without_fusion_is_refused_by_the_loss_with_what_to_set(tiny_model):
    with pytest.raises(ValueError, match=r"model.fusion.*loss=clip_itm"):
        build_loss(loss_file("clip_itm")[0]).bind(tiny_model)


# ---------------------------------------------------------------- two gloo ranks

LOCAL = 3
# 6 captions over 2 ranks: rank 0's row 0 and rank 1's row 2 (global 5) are the same caption
GLOBAL_IDS = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4], [6, 6], [1, 1]])


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    image, text = features(6, n=LOCAL * world)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    model, loss = Recorder(), ItmLoss(rank=rank, world_size=world)
    loss.bind(model)
    marks = torch.arange(rank * LOCAL, (rank + 1) * LOCAL)
    for _ in range(20):
        value = loss(
            image[rows], text[rows], torch.tensor(10.0), marked(marks), marked(marks), GLOBAL_IDS[rows]
        )
        value.backward()
    torch.save(model.pairs, f"{path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_on_two_ranks_negatives_come_from_every_rank_in_rank_order_and_never_a_positive(tmp_path):
    path = str(tmp_path / "pairs")
    mp.spawn(_worker, args=(2, free_port(), path), nprocs=2, join=True)
    positives = positive_mask(GLOBAL_IDS, GLOBAL_IDS)
    drawn = set()
    for rank in range(2):
        own = torch.arange(rank * LOCAL, (rank + 1) * LOCAL)
        for images, texts, ids in torch.load(f"{path}.{rank}"):
            negative_texts, negative_images = texts[LOCAL : 2 * LOCAL], images[2 * LOCAL :]
            assert torch.equal(ids[LOCAL : 2 * LOCAL], GLOBAL_IDS[negative_texts])  # rank order
            assert not positives[own, negative_texts].any() and not positives[own, negative_images].any()
            drawn |= {(rank, int(t)) for t in negative_texts}
    assert {t for rank, t in drawn if t // LOCAL != rank}  # the other rank's captions are drawn too


# ---------------------------------------------------------------- the fusion


def test_fusion_gives_one_pair_score_and_padding_changes_nothing():
    torch.manual_seed(0)
    fusion = ItmFusion(text_width=16, image_width=12, layers=2, heads=2).eval()
    image, text = torch.randn(3, 5, 12), torch.randn(3, 7, 16)
    padding = torch.arange(7)[None] >= torch.tensor([[7], [4], [2]])
    logits = fusion(image, text, padding)
    assert logits.shape == (3, 2)
    changed = text.clone()
    changed[padding] = torch.randn(int(padding.sum()), 16) * 100
    torch.testing.assert_close(fusion(image, changed, padding), logits)
    assert not torch.allclose(fusion(image.flip(0), text, padding), logits)  # the image is read


def test_the_model_fuses_unprojected_states_and_masks_its_padding():
    torch.manual_seed(0)
    model = build_model("flip-test-tiny", TINY_ARCH, fusion={"layers": 1, "heads": 2}).eval()
    text = model.tokenize(["a face", "a face with a red hat and glasses"])
    images = torch.randn(2, 3, 32, 32)
    out = model(images, text, return_tokens=True)
    assert out.image_hidden.shape == (2, 16, 32) and out.text_hidden.shape == (2, 24, 32)
    assert torch.equal(out.text_ids, text)
    assert model(images, text).image_hidden is None  # the contrastive path is unchanged
    logits = model.itm_logits(out.image_hidden, out.text_hidden, text)
    changed = out.text_hidden.clone()
    changed[text == model.pad_token_id] = 7.0
    torch.testing.assert_close(model.itm_logits(out.image_hidden, changed, text), logits)
    with pytest.raises(ValueError, match=r"model.fusion.heads=5 does not divide the text width 32"):
        build_model("flip-test-tiny", TINY_ARCH, fusion={"layers": 1, "heads": 5})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth'\] in model.fusion"):
        build_model("flip-test-tiny", TINY_ARCH, fusion={"depth": 1})


# ---------------------------------------------------------------- re-ranking


def _brute_force_ranks(similarity, itm, k, query_of, target_of):
    """Rank of each query's best true candidate: its top k by similarity ordered by itm + similarity,
    then the rest by similarity."""
    ranks = []
    for q in range(similarity.shape[0]):
        order = similarity[q].argsort(descending=True).tolist()
        top, rest = order[:k], order[k:]
        top.sort(key=lambda c: -(itm[q, c] + similarity[q, c]))
        full = top + rest
        true = [c for c in range(similarity.shape[1]) if target_of(q, c)]
        ranks.append(min(full.index(c) for c in true))
    return torch.tensor(ranks)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_reranked_recalls_equal_brute_force_with_the_same_scores(k):
    g = torch.Generator().manual_seed(k)
    n_images, text_image = 6, torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 5])
    similarity = torch.rand(n_images, len(text_image), generator=g) * 2 - 1
    itm = torch.randn(n_images, len(text_image), generator=g) * 3
    i2t = reranked_scores(similarity, k, lambda q, c: itm[q, c])
    t2i = reranked_scores(similarity.T.contiguous(), k, lambda q, c: itm.T[q, c])
    got = reranked_recalls(i2t, t2i, ks=(1, 2, 5), text_image=text_image)
    i2t_rank = _brute_force_ranks(similarity, itm, k, None, lambda q, c: int(text_image[c]) == q)
    t2i_rank = _brute_force_ranks(similarity.T, itm.T, k, None, lambda q, c: int(text_image[q]) == c)
    for at in (1, 2, 5):
        assert got[f"i2t_rerank_R@{at}"] == pytest.approx(float((i2t_rank < at).float().mean()))
        assert got[f"t2i_rerank_R@{at}"] == pytest.approx(float((t2i_rank < at).float().mean()))


def test_reranking_in_row_blocks_gives_the_ranks_of_the_whole_matrix():
    g = torch.Generator().manual_seed(9)
    image, text = (
        F.normalize(torch.randn(5, 4, generator=g), dim=-1),
        F.normalize(torch.randn(8, 4, generator=g), dim=-1),
    )
    text_image = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    itm = torch.randn(5, 8, generator=g)
    whole = reranked_recalls(
        reranked_scores(image @ text.T, 3, lambda q, c: itm[q, c]),
        reranked_scores(text @ image.T, 3, lambda q, c: itm.T[q, c]),
        ks=(1, 2, 5),
        text_image=text_image,
    )
    texts = torch.arange(8)
    for rows in (1, 2, 5):
        i2t = blocked_reranked_ranks(image, text, text_image, texts, 3, lambda q, c: itm[q, c], rows)
        t2i = blocked_reranked_ranks(text, image, texts, text_image, 3, lambda q, c: itm.T[q, c], rows)
        for at in (1, 2, 5):
            assert whole[f"i2t_rerank_R@{at}"] == float((i2t < at).float().mean())
            assert whole[f"t2i_rerank_R@{at}"] == float((t2i < at).float().mean())


def test_reranking_nothing_but_the_first_changes_no_recall():
    g = torch.Generator().manual_seed(0)
    image, text = (
        F.normalize(torch.randn(5, 4, generator=g), dim=-1),
        F.normalize(torch.randn(5, 4, generator=g), dim=-1),
    )
    similarity = image @ text.T
    same = reranked_recalls(
        reranked_scores(similarity, 1, lambda q, c: torch.randn(len(q))),
        reranked_scores(similarity.T.contiguous(), 1, lambda q, c: torch.randn(len(q))),
    )
    assert {k.replace("_rerank", ""): v for k, v in same.items()} == retrieval_recalls(image, text)


def test_the_eval_config_sets_rerank_k(tmp_path):
    cfg = compose_eval("eval_retrieval", tmp_path, "protocols.retrieval.rerank_k=16")
    assert build_protocols(cfg.protocols)["retrieval"] == Retrieval(rerank_k=16)
    assert build_protocols(compose_eval("eval_retrieval", tmp_path).protocols)["retrieval"].rerank_k == 0


def test_rerank_k_without_an_itm_head_fails_with_what_to_do(tiny_model):
    with pytest.raises(ValueError, match=r"rerank_k > 0 needs a model with an image-text matching head"):
        evaluate_retrieval(tiny_model, SplitFeatures(torch.zeros(0, 32), split=None), rerank_k=5)
    with pytest.raises(ValueError, match=r"rerank_k must be an integer >= 0"):
        evaluate_retrieval(tiny_model, SplitFeatures(torch.zeros(0, 32), split=None), rerank_k=-1)
    assert Retrieval().rerank_k == 0


# ---------------------------------------------------------------- through train.py


@pytest.mark.parametrize(
    ("loss", "terms"), [("clip_itm", {"clip", "itm"}), ("itc_queue_itm", {"itc", "itm"})]
)
@pytest.mark.slow
def test_itm_losses_train_through_train_py_and_reload_with_their_head(train_config, tmp_path, loss, terms):
    cfg = train_config(
        f"loss={loss}", "evaluate=false", "trainer.max_steps=2", "model.fusion.layers=1", "micro_batches=2"
    )
    results = train(cfg)
    logged = {k.split("/")[1] for k in results["train"] if k.startswith("train/") and "logit" not in k}
    assert logged == terms | {"loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results["train"].values())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = flip.load(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    fusion = {k[len("model.fusion.") :]: v for k, v in saved.items() if k.startswith("model.fusion.")}
    assert fusion and len(model.fusion.blocks) == 1
    for name, value in model.fusion.state_dict().items():
        torch.testing.assert_close(value, fusion[name])
    (tmp_path / "export").mkdir()
    write_safetensors_folder(model, tmp_path / "export")  # the export carries the head too
    exported = flip.load(tmp_path / "export")
    for name, value in exported.fusion.state_dict().items():
        torch.testing.assert_close(value, fusion[name])
    # the reloaded head re-ranks a split: every candidate re-scored equals brute force over all pairs
    split = _Split(["a face", "a face with glasses", "a face with a red hat", "a bald face"])
    with torch.no_grad():
        images = torch.stack([model.preprocess(split.images.load(i)) for i in range(4)])
        ids = model.tokenize(split.captions)
        out = model(images, ids, return_tokens=True)
        image_hidden = out.image_hidden.repeat_interleave(4, dim=0)
        text_hidden, pair_ids = out.text_hidden.repeat(4, 1, 1), ids.repeat(4, 1)
        itm = model.itm_logits(image_hidden, text_hidden, pair_ids)[:, 1].view(4, 4)
    features = SplitFeatures(out.image_features, split)
    result = evaluate_retrieval(model, features, rerank_k=4, batch_size=3)
    metrics = result["summary"]
    similarity = out.image_features @ out.text_features.T
    for at in (1, 5):
        i2t = _brute_force_ranks(similarity, itm, 4, None, lambda q, c: q == c)
        t2i = _brute_force_ranks(similarity.T, itm.T, 4, None, lambda q, c: q == c)
        assert metrics[f"i2t_rerank_R@{at}"] == pytest.approx(float((i2t < at).float().mean()))
        assert metrics[f"t2i_rerank_R@{at}"] == pytest.approx(float((t2i < at).float().mean()))
    assert result["rerank_k"] == 4 and "i2t_R@1" in metrics
    # CLIP_benchmark has no name for re-ranked recalls: its file keeps the contrastive ones
    assert set(clip_benchmark_retrieval(metrics)) == set(
        clip_benchmark_retrieval({k: v for k, v in metrics.items() if "rerank" not in k})
    )


class _Images:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Image.Image:
        return Image.new("RGB", (40, 40), ((60 * index) % 256, 30 * index, 200 - 40 * index))


class _Split:
    """What retrieval reads of a captioned split."""

    benchmark, split = "toy", "test"

    def __init__(self, captions: list[str]) -> None:
        self.captions, self.images = captions, _Images(len(captions))

    def __len__(self) -> int:
        return len(self.captions)


def test_the_itm_loss_configs_give_the_model_a_fusion():
    for name, terms in (("clip_itm", {"clip", "itm"}), ("itc_queue_itm", {"itc", "itm"})):
        cfg, model_settings = loss_file(name)
        assert set(build_loss(cfg).terms) == terms
        assert model_settings["fusion"]["layers"] >= 1 and model_settings["fusion"]["style"] == "auto"


# ---------------------------------------------------------------- BLIP's fusion on a BERT tower


def test_a_bert_tower_fuses_blip_style_on_its_own_weights_and_exports_with_them(tmp_path):
    write_tiny_bert(tmp_path / "bert")
    torch.manual_seed(0)
    model = build_model("flip-test-bert-itm", bert_arch(tmp_path / "bert"), fusion={"layers": 2}).eval()
    bert = model.clip.text.transformer
    assert isinstance(model.fusion, BertCrossFusion) and len(model.fusion.cross) == len(bert.encoder.layer)
    shared = {id(p) for p in bert.parameters()}
    assert not any(id(p) in shared for p in model.fusion.parameters())  # BERT is saved once, as the tower
    assert not [k for k in model.state_dict() if k.startswith("fusion.") and "embeddings" in k]
    text = model.tokenize(["a person with a red hat", "a face"])
    images = torch.randn(2, 3, 32, 32)
    out = model(images, text, return_tokens=True)
    logits = model.itm_logits(out.image_hidden, out.text_hidden, text)
    assert logits.shape == (2, 2)
    # padding changes nothing: the same captions with fewer pad positions score the same
    length = int((text != model.pad_token_id).sum(dim=1).max())
    short = model.fusion(out.image_hidden, text[:, :length], text[:, :length] == model.pad_token_id, bert)
    torch.testing.assert_close(short, logits, atol=1e-5, rtol=1e-5)
    # the matching loss trains BERT's own weights, as BLIP's shared text encoder
    logits[:, 1].sum().backward()
    assert bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    (tmp_path / "export").mkdir()
    write_safetensors_folder(model, tmp_path / "export")
    again = flip.load(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.itm_logits(out.image_hidden, None, text), logits.detach())
    with pytest.raises(ValueError, match=r"style=blip inserts cross-attention into a Hugging Face BERT"):
        build_model("flip-test-tiny", TINY_ARCH, fusion={"style": "blip"})
