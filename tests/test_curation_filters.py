"""The filters of `flip-data curate` that need no model, against plain references: caption rules,
perceptual-hash search (multi-index hashing vs a brute-force scan) and MetaCLIP-style balancing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from flip.prepare.balance import Entry, EntryMatcher, balance, read_entries
from flip.prepare.caption_rules import CaptionRules, words
from flip.prepare.dedup import NearDuplicates, embedding_duplicates, hamming, perceptual_hash, pixel_digest


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("A smiling woman with round glasses", None),
        ("戴眼镜的微笑女人", None),  # Chinese: one word per character, all letters
        ("मुस्कुराता हुआ आदमी", None),  # Devanagari: its vowel signs are marks, not junk
        ("Ein lächelnder Mann mit Bart", None),
        ("photo from https://example.org/img/123.jpg", "caption_url"),
        ("see www.faces.example for more", "caption_url"),
        ("buy now at facestore.com", "caption_url"),
        ("mail me: someone@example.net", "caption_url"),
        ("1234 5678 90 -- 11", "caption_few_letters"),
        ("a b c !!!!!!!!!!", "caption_few_letters"),  # few letters is checked before repeats
        ("sooooooo cute face", "caption_repeats"),
        ("a face", "caption_too_short"),  # with min_words=3 below
        (" ".join(["word"] * 40), "caption_too_long"),  # with max_words=30 below
    ],
)
def test_caption_rules_name_the_rule_a_caption_breaks(caption, reason):
    rules = CaptionRules(min_words=3, max_words=30)
    found = rules.check(caption)
    assert (found and found[0]) == reason, found


def test_words_are_runs_of_letters_and_each_cjk_character():
    assert words("Blond-haired WOMAN, 30 yrs") == ["blond", "haired", "woman", "30", "yrs"]
    assert words("戴眼镜 man") == ["戴", "眼", "镜", "man"]
    assert CaptionRules(min_chars=10).check("short")[0] == "caption_too_short"
    with pytest.raises(ValueError, match="max_words=1 is under min_words=2"):
        CaptionRules(min_words=2, max_words=1)


def _random_hashes(rng: np.random.Generator, n: int) -> list[int]:
    return [int(v) for v in rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)]


@pytest.mark.parametrize("max_distance", [0, 3, 8, 12])
def test_near_duplicate_search_finds_exactly_what_a_brute_force_scan_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = _random_hashes(rng, 300)
    for i in range(0, 300, 7):  # plant copies 0..max_distance+2 bits away from an earlier hash
        flips = rng.choice(64, size=int(rng.integers(0, max_distance + 3)), replace=False)
        hashes.append(hashes[i] ^ int(sum(1 << int(b) for b in flips)))
    index, found = NearDuplicates(max_distance), []
    for i, value in enumerate(hashes):
        j = index.find(value)
        found.append(j)
        if j is None:
            index.add(value, i)
    kept: list[int] = []  # the reference: compare with every kept hash, in order
    for i, value in enumerate(hashes):
        close = [j for j in kept if bin(hashes[j] ^ value).count("1") <= max_distance]
        assert found[i] == (close[0] if close else None), i
        if not close:
            kept.append(i)
    assert sum(f is not None for f in found) >= 10  # not vacuous: planted copies were found
    if max_distance:  # exactly d bits, spread as evenly as possible over every band: still found
        spread = NearDuplicates(max_distance)
        spread.add(hashes[0], 0)
        bits = {round(k * 64 / max_distance) % 64 for k in range(max_distance)}
        assert len(bits) == max_distance and spread.find(hashes[0] ^ sum(1 << b for b in bits)) == 0
        assert spread.find(hashes[0] ^ sum(1 << b for b in range(max_distance + 1))) is None
    values = np.array(hashes[:5], dtype=np.uint64)
    assert hamming(values, hashes[0]).tolist() == [bin(h ^ hashes[0]).count("1") for h in hashes[:5]]


def test_edited_copies_hash_close_and_identical_pixels_digest_equal():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
    other = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
    buffer = io.BytesIO()
    base.save(buffer, format="JPEG", quality=60)
    copies = [
        Image.open(buffer).convert("RGB"),
        base.resize((48, 48)),
        ImageEnhance.Brightness(base).enhance(1.1),
    ]
    h = perceptual_hash(base)
    assert all(bin(perceptual_hash(c) ^ h).count("1") <= 8 for c in copies)
    assert bin(perceptual_hash(other) ^ h).count("1") > 8
    png = io.BytesIO()
    base.save(png, format="PNG")
    assert pixel_digest(Image.open(png).convert("RGB")) == pixel_digest(base) != pixel_digest(copies[0])


def test_embedding_duplicates_are_greedy_against_kept_rows():
    x = np.array([[1, 0], [0.99, 0.141], [0.96, 0.28], [0, 1]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # row 1 is close to row 0; row 2 is close to row 1 (dropped) but not to row 0 at 0.98
    assert embedding_duplicates(x, 0.98) == {1: 0}
    assert embedding_duplicates(x, 0.95) == {1: 0, 2: 0}
    assert embedding_duplicates(x, 0.95, groups=["a", "b", "a", "a"]) == {2: 0}


def test_entries_file_and_whole_word_matching(tmp_path):
    path = tmp_path / "entries.txt"
    path.write_text("# face attributes\nbeard | bearded\nhat\nblond hair\n眼镜\n\n")
    entries = read_entries(path)
    assert [e.name for e in entries] == ["beard", "hat", "blond hair", "眼 镜"]
    matcher = EntryMatcher(entries)
    assert matcher.match("A Bearded man with a HAT and blond hair") == [0, 1, 2]
    assert matcher.match("that man is blond, with long hair") == []  # 'hat' is not a word of 'that'
    assert matcher.match("戴眼镜的女人") == [3]
    path.write_text("hat\nHat\n")
    with pytest.raises(ValueError, match="line 2: entry 'hat' is also on line 1"):
        read_entries(path)


def _random_matches(rng, n: int, weights: np.ndarray) -> list[list[int]]:
    """Each sample matches each entry independently with that entry's probability."""
    return [sorted(np.flatnonzero(rng.random(len(weights)) < weights).tolist()) for _ in range(n)]


def test_the_cap_rule_caps_every_entry_and_removes_only_samples_that_hit_a_full_entry():
    rng = np.random.default_rng(1)
    weights = np.array([0.6, 0.3, 0.1, 0.01, 0.005])  # entries 3 and 4 have under 40 samples
    matches = _random_matches(rng, 2000, weights)
    keys = [f"k{i}" for i in range(2000)]
    result = balance(matches, keys, 5, max_per_entry=40, rule="cap", seed=3)
    before = np.zeros(5, int)
    after = np.zeros(5, int)
    for m, d in zip(matches, result.decisions, strict=True):
        before[m] += 1
        after[m] += d is None and bool(m)
    assert result.before == before.tolist() and result.after == after.tolist()
    assert (after <= 40).all() and after[0] == 40
    # the tail is taken before the head entries it shares are full: every rare sample kept
    assert after[3] == before[3] and after[4] == before[4]
    for m, d in zip(matches, result.decisions, strict=True):
        if not m:
            assert d is None  # unmatched samples are kept by default
        elif d is not None:
            assert d == "entry_full" and any(after[e] == 40 for e in m)
    # the same seed gives the same decisions whatever the order of the samples
    order = rng.permutation(2000)
    shuffled = balance([matches[i] for i in order], [keys[i] for i in order], 5, 40, "cap", seed=3)
    assert [shuffled.decisions[k] for k in np.argsort(order)] == result.decisions
    dropped = balance(matches, keys, 5, 40, "cap", seed=3, keep_unmatched=False)
    assert {d for m, d in zip(matches, dropped.decisions, strict=True) if not m} == {"no_entry"}


def test_the_metaclip_rule_keeps_samples_with_metaclips_probability():
    rng = np.random.default_rng(2)
    weights = np.array([0.5, 0.2, 0.004])
    n, t = 20000, 500
    matches = _random_matches(rng, n, weights)
    result = balance(matches, [f"k{i}" for i in range(n)], 3, max_per_entry=t, rule="metaclip", seed=0)
    before = np.array(result.before)
    p = np.minimum(1.0, t / before)
    expected = np.array([1 - np.prod(1 - p[m]) if m else 1.0 for m in matches])
    kept = np.array([d is None for d in result.decisions])
    # kept count within 5 standard deviations of its expectation (a sum of Bernoulli draws)
    assert abs(kept.sum() - expected.sum()) < 5 * np.sqrt((expected * (1 - expected)).sum())
    # an entry with at most t matches draws with probability 1: every one of its samples is kept
    assert result.before[2] <= t
    assert all(result.decisions[i] is None for i, m in enumerate(matches) if 2 in m)
    assert result.after[2] == result.before[2] and result.after[0] < result.before[0]


def test_balance_refuses_unknown_rules_and_caps():
    with pytest.raises(ValueError, match="accepted: cap, metaclip"):
        balance([[0]], ["a"], 1, 1, rule="random")
    with pytest.raises(ValueError, match="max_per_entry=0"):
        balance([[0]], ["a"], 1, 0)
    assert Entry("a", (("a",),)).name == "a"
