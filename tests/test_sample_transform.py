"""The training transform's batched path and reduced-scale JPEG decoding (flip.data.transform)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from flip.data.faceshapes.generate import make_sample
from flip.data.shards import decode_sample
from flip.data.transform import SampleTransform, seeded_augmentation

# measured on FaceShapes faces (sharp edges, the worst case for resampling) stored at 448-1024 px
# for a 224 px crop: mean |diff| 0.0025-0.0037, 99th percentile 0.031-0.043 in [0, 1] pixel units
MEAN_TOLERANCE, P99_TOLERANCE = 0.006, 0.06


def transform_for(model_size: int) -> SampleTransform:
    return SampleTransform(
        open_clip.image_transform(model_size, is_train=True), open_clip.get_tokenizer("ViT-B-16")
    )


def decoded(stored: int, index: int, at_least=None) -> dict:
    sample = decode_sample(make_sample("t", index, seed=0, image_size=stored), at_least=at_least)
    sample["__seed__"] = 7919 * index + 1
    return sample


def test_a_batch_equals_the_per_sample_transform_bit_for_bit():
    transform = transform_for(64)
    samples = [decoded(64, i) for i in range(6)]
    images, tokens = transform.collate([transform.prepare(s) for s in samples])
    for row, sample in enumerate(samples):
        with seeded_augmentation(sample["__seed__"]):
            expected = transform.preprocess(sample["image"])
        assert torch.equal(images[row], expected)
        assert torch.equal(tokens[row], transform.tokenizer([sample["text"]])[0])
    assert images.is_contiguous() and images.dtype == torch.float32


@pytest.mark.parametrize("stored, model_size", [(64, 64), (256, 224), (400, 224)])
def test_reduced_decode_is_a_no_op_below_twice_the_crop_size(stored, model_size):
    transform = transform_for(model_size)
    full, reduced = decoded(stored, 3), decoded(stored, 3, at_least=transform.decode_size)
    assert "full_size" not in reduced and reduced["image"].size == (stored, stored)
    assert torch.equal(transform(full)[0], transform(reduced)[0])


@pytest.mark.parametrize("stored, drafted", [(448, 224), (512, 256), (1024, 256)])
def test_reduced_decode_stays_within_the_stated_tolerance_of_the_full_decode(stored, drafted):
    transform = transform_for(224)
    std = torch.tensor(transform.normalize.std).view(3, 1, 1)
    differences = []
    for index in range(8):
        full, reduced = decoded(stored, index), decoded(stored, index, at_least=transform.decode_size)
        assert reduced["image"].size == (drafted, drafted) and reduced["full_size"] == (stored, stored)
        # the same crop region (drawn on the stored geometry), so only the resampling differs
        differences.append(((transform(reduced)[0] - transform(full)[0]) * std).abs().flatten())
    difference = torch.cat(differences)
    assert difference.mean() < MEAN_TOLERANCE
    assert difference.quantile(0.99) < P99_TOLERANCE


def test_only_a_leading_random_resized_crop_allows_a_reduced_decode():
    evaluation = SampleTransform(
        open_clip.image_transform(224, is_train=False), open_clip.get_tokenizer("ViT-B-16")
    )
    assert evaluation.decode_size is None
    assert transform_for(224).decode_size == (224, 224)
