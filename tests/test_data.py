"""Data: sentence splitting, the synthetic scenes, batching, samplers, shards and bad data."""
import io
import re
import tarfile

import pytest
import torch
from PIL import Image

from mulclip.data import Collator, EpochSampler, caption_fields, split_sentences
from mulclip.data.shards import ShardWriter, StreamConfig, ShardStream, count_samples, decode_sample, expand_urls
from mulclip.data.synthetic import SyntheticScenes, scenes_as_records
from mulclip.model import get_tokenizer


@pytest.mark.parametrize("text, expected", [
    ("A red circle. A blue square!", ["A red circle.", "A blue square!"]),
    ("Is it? Yes. it continues here.", ["Is it?", "Yes. it continues here."]),
    ("Dr. Smith met J. Doe at St. Paul, e.g. on Monday. Then left.",
     ["Dr. Smith met J. Doe at St. Paul, e.g. on Monday.", "Then left."]),
    ("Version 3.5 is out. \"Quoted.\" (Bracketed.) Next", ["Version 3.5 is out.", "\"Quoted.\"", "(Bracketed.)", "Next"]),
    ("Line one\nLine two. Three\n\n...", ["Line one", "Line two.", "Three"]),
    ("", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_caption_fields_derive_and_keep():
    long, short, subs = caption_fields("  One. Two. Three. Four.  ", max_subcaptions=3)
    assert (long, short, subs) == ("One. Two. Three. Four.", "One.", ["One.", "Two.", "Three."])
    assert caption_fields("One. Two.", short_caption="Given", subcaptions=["a", " ", "b"]) == ("One. Two.", "Given", ["a", "b"])
    assert caption_fields("no full stop") == ("no full stop", "no full stop", ["no full stop"])


def test_synthetic_scenes_are_deterministic_and_split():
    a = SyntheticScenes(8, 32, seed=3, num_negatives=3)
    b = SyntheticScenes(8, 32, seed=3, num_negatives=3)
    held = SyntheticScenes(8, 32, seed=3, split="heldout")
    for i in range(8):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["negatives"] == y["negatives"]
        assert x["image"].tobytes() == y["image"].tobytes() and x["image"].size == (32, 32)
        scene, _ = a.scene(i)
        sentences = split_sentences(x["caption"])
        assert len(sentences) == len(scene.objects) + 1
        assert x["short_caption"] == sentences[0] and x["subcaptions"] == sentences
        assert len(x["negatives"]) == 3 and x["caption"] not in x["negatives"] and len(set(x["negatives"])) == 3
    assert [held[i]["caption"] for i in range(8)] != [a[i]["caption"] for i in range(8)]
    with pytest.raises(IndexError):
        a[8]


def test_negatives_swap_attributes_or_recolour():
    from mulclip.data.synthetic import COLORS

    def words(text):
        return sorted(re.findall(r"\w+", text))

    data = SyntheticScenes(20, 32, num_negatives=3)
    swaps = 0
    for i in range(20):
        item = data[i]
        for negative in item["negatives"]:
            if words(negative) == words(item["caption"]):
                swaps += 1
            else:  # the fallback: one object takes a colour the scene does not have
                new_colors = {c for c in COLORS if c in words(negative)} - set(words(item["caption"]))
                assert len(new_colors) == 1, negative
    assert swaps > 30


@pytest.fixture(scope="module")
def collate():
    import open_clip

    transform = open_clip.image_transform(32, is_train=False)
    return Collator(get_tokenizer("mulclip-micro"), transform, long_context=248, max_subcaptions=3)


def test_collator_shapes_and_subcaptions(collate):
    samples = [SyntheticScenes(4, 32, num_negatives=2)[i] for i in range(4)]
    samples[1] = dict(samples[1], subcaptions=[])
    batch = collate(samples, skipped=5)
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["long_text"].shape == (4, 248) and batch["short_text"].shape == (4, 77)
    assert batch["subcaption_text"].shape == (4, 3, 77) and batch["negative_text"].shape == (4, 2, 248)
    assert int(batch["skipped"]) == 5
    assert not batch["subcaption_mask"][1].any() and batch["subcaption_mask"][0].all()
    assert torch.equal(batch["subcaption_text"][2, 1], collate.tokenizer([samples[2]["subcaptions"][1]], context_length=77)[0])
    assert not batch["subcaption_text"][1].any()


def test_epoch_sampler_splits_global_batches_over_ranks():
    single = list(EpochSampler(50, 8, seed=1))
    ranks = [list(EpochSampler(50, 4, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert len(single) == 48 and all(len(r) == 24 for r in ranks)
    for b in range(6):
        assert single[8 * b:8 * b + 8] == ranks[0][4 * b:4 * b + 4] + ranks[1][4 * b:4 * b + 4]
    sampler = EpochSampler(50, 8, seed=1)
    sampler.set_epoch(0, start_batch=4)
    assert list(sampler) == single[32:] and len(sampler) == 16
    sampler.set_epoch(1)
    assert list(sampler) != single


def _write_synthetic_shards(folder, count, per_shard):
    data = SyntheticScenes(count, 32)
    with ShardWriter(str(folder), "syn", per_shard) as writer:
        for record in scenes_as_records(data, range(count)):
            writer.write(*record)
    return data


def _stream(urls, batch_size=1, **kw):
    cfg = StreamConfig(urls, batch_size, repeat=False, shuffle=False, **kw)
    return ShardStream(cfg, lambda samples, skipped: (samples, skipped))


def test_shards_round_trip_and_rank_split(tmp_path):
    data = _write_synthetic_shards(tmp_path, 10, 4)
    urls = expand_urls(str(tmp_path))
    assert len(urls) == 3 and count_samples(urls) == 10
    assert expand_urls(str(tmp_path / "syn-{000000..000002}.tar")) == urls
    read = [samples[0] for samples, _ in _stream(urls)]
    assert [s["caption"] for s in read] == [data[i]["caption"] for i in range(10)]
    assert read[3]["image"].tobytes() == data[3]["image"].tobytes()
    assert read[3]["subcaptions"] == data[3]["subcaptions"]
    # Two ranks, fewer shards than ranks x workers is handled too: disjoint and complete.
    for shard_urls in (urls, urls[:1]):
        keys = [[s["key"] for batch, _ in _stream(shard_urls, rank=r, world_size=2) for s in batch] for r in range(2)]
        assert not set(keys[0]) & set(keys[1])
        assert len(keys[0]) + len(keys[1]) == (10 if len(shard_urls) == 3 else 4)


def _png(color=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path):
    with ShardWriter(str(tmp_path), "bad", 100) as writer:
        writer.write("good0", "png", _png(), "A good one. Two.")
        writer.write("corrupt", "jpg", b"not a jpeg at all", "Broken image.")
        writer.write("nojson", "png", _png(), "Caption.", None)
        writer.write("good1", "png", _png(), "Another good one.", {"short_caption": "Short.", "subcaptions": ["x"]})
    # By hand: a sample with no caption, one with malformed json, and a good one; each member
    # takes 1024 bytes (header + one data block).
    members = [("nocap.png", _png()), ("mal.png", _png()), ("mal.txt", b"Text."), ("mal.json", b"{oops"),
               ("good2.png", _png()), ("good2.txt", b"Third good one.")]
    with tarfile.open(tmp_path / "extra.tar", "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    # A copy cut inside the data of its last member: reading it fails part-way.
    (tmp_path / "truncated.tar").write_bytes((tmp_path / "extra.tar").read_bytes()[:5 * 1024 + 512 + 5])
    # The cut copy first: skips are reported with the next batch, and every skip here has one.
    urls = [str(tmp_path / name) for name in ("truncated.tar", "bad-000000.tar", "extra.tar")]
    batches = list(_stream(urls, batch_size=1))
    assert [batch[0]["key"] for batch, _ in batches] == ["good0", "nojson", "good1", "good2"]
    # In the cut copy nocap, mal, the half-read good2 and the unreadable rest; corrupt; nocap and mal.
    assert [skipped for _, skipped in batches] == [4, 1, 0, 2]
    good1 = batches[2][0][0]
    assert good1["short_caption"] == "Short." and good1["subcaptions"] == ["x"]
    assert decode_sample({"__key__": "k", "png": _png()}).reason == "no caption (.txt)"


def test_empty_stream_raises_clear_error(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\0" * 10)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(_stream([str(tmp_path / "junk.tar")]))
