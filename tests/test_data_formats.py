"""Readers and the shard converter on small hand-made copies of DOCCI, DCI, Urban1k and ShareGPT4V."""
import json

import pytest
from PIL import Image

from mulclip.data.formats import READERS, convert, main, read_dci, read_docci, read_sharegpt4v, read_urban1k
from mulclip.data.shards import ShardStream, StreamConfig, count_samples, expand_urls


def _image(path, color=(10, 200, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), color).save(path, format=fmt)


def make_docci(root):
    _image(root / "images" / "test_00001.jpg")
    _image(root / "images" / "train_00002.jpg")
    records = [
        {"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg",
         "description": "A green wall. A door on the left."},
        {"example_id": "train_00002", "split": "train", "image_file": "train_00002.jpg", "description": "A train sample."},
        {"example_id": "test_00003", "split": "test", "image_file": "test_00003.jpg", "description": "Image missing."},
    ]
    (root / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def make_dci(root):
    base = root / "densely_captioned_images"
    _image(base / "photos" / "sa_1.jpg")
    _image(base / "photos" / "sa_2.png", fmt="PNG")
    (base / "complete").mkdir(parents=True)
    for name, image, short, extra in [("sa_1.json", "sa_1.jpg", "A street.", "Cars are parked. A tree grows."),
                                      ("sa_2.json", "sa_2.png", "A room.", "")]:
        (base / "complete" / name).write_text(json.dumps(
            {"image": image, "short_caption": short, "extra_caption": extra, "mask_data": {}, "mask_keys": []}))


def make_urban1k(root):
    base = root / "Urban1k"
    for i in (1, 2):
        _image(base / "image" / f"{i}.jpg")
    (base / "caption").mkdir(parents=True)
    (base / "caption" / "1.txt").write_text("A busy city street. People cross the road.\n")
    (base / "caption" / "2.txt").write_text("")  # an empty caption is skipped


def make_sharegpt4v(root):
    _image(root / "coco" / "train2017" / "000000000009.jpg")
    (root / "sam").mkdir(parents=True)
    (root / "sam" / "broken.jpg").write_bytes(b"not an image")
    records = [
        {"id": "000000000009", "image": "coco/train2017/000000000009.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                           {"from": "gpt", "value": "A plate of food.\nBroccoli on the side."}]},
        {"id": "sa_broken", "image": "sam/broken.jpg",
         "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Unreadable."}]},
    ]
    (root / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(records))


def test_readers_follow_the_published_layouts(tmp_path):
    make_docci(tmp_path / "docci")
    docci = list(read_docci(str(tmp_path / "docci")))
    assert [s.key for s in docci] == ["test_00001", "test_00003"]
    assert docci[0].caption == "A green wall. A door on the left."
    assert docci[0].image_path.endswith("images/test_00001.jpg")
    assert [s.key for s in read_docci(str(tmp_path / "docci"), split=None)] == ["test_00001", "train_00002", "test_00003"]

    make_dci(tmp_path / "dci")
    dci = list(read_dci(str(tmp_path / "dci")))
    assert [(s.key, s.caption, s.short_caption) for s in dci] == [
        ("sa_1", "A street.\nCars are parked. A tree grows.", "A street."), ("sa_2", "A room.", "A room.")]

    make_urban1k(tmp_path / "urban")
    urban = list(read_urban1k(str(tmp_path / "urban")))
    assert [(s.key, s.caption.strip()) for s in urban] == [("1", "A busy city street. People cross the road."), ("2", "")]

    make_sharegpt4v(tmp_path / "sg")
    sg = list(read_sharegpt4v(str(tmp_path / "sg")))
    assert sg[0].caption == "A plate of food. Broccoli on the side." and sg[0].key == "000000000009"


@pytest.mark.parametrize("fmt, maker, expected", [
    ("docci", make_docci, {"written": 1, "skipped": 1}),
    ("dci", make_dci, {"written": 2, "skipped": 0}),
    ("urban1k", make_urban1k, {"written": 1, "skipped": 1}),
    ("sharegpt4v", make_sharegpt4v, {"written": 1, "skipped": 1}),
])
def test_convert_to_shards_and_read_back(tmp_path, fmt, maker, expected):
    maker(tmp_path / "src")
    out = tmp_path / "shards"
    counts = main([fmt, str(tmp_path / "src"), str(out), "--shard-size", "1", "--max-subcaptions", "2"])
    assert counts == expected
    urls = expand_urls(str(out))
    assert count_samples(urls) == expected["written"] == len(urls)
    stream = ShardStream(StreamConfig(urls, 1, repeat=False, shuffle=False), lambda samples, skipped: samples[0])
    samples = list(stream)
    assert len(samples) == expected["written"]
    for sample in samples:
        assert sample["image"].size == (12, 9)
        assert sample["short_caption"] and len(sample["subcaptions"]) <= 2
    if fmt == "dci":
        assert samples[0]["short_caption"] == "A street."
        assert samples[0]["subcaptions"] == ["A street.", "Cars are parked."]


def test_converter_rejects_missing_root(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["urban1k", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "no such folder" in capsys.readouterr().err
    assert sorted(READERS) == ["dci", "docci", "sharegpt4v", "urban1k"]


def test_convert_reencodes_other_formats(tmp_path):
    from mulclip.data.formats import RawSample

    _image(tmp_path / "a.bmp", fmt="BMP")
    counts = convert(iter([RawSample("a", str(tmp_path / "a.bmp"), "A bitmap.")]), str(tmp_path / "out"))
    assert counts == {"written": 1, "skipped": 0}
    import tarfile

    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["a.json", "a.png", "a.txt"]
