"""`python -m mulclip.eval` end to end on CPU: a checkpoint of a tiny training run, a plain open_clip
state dict, and tiny generated data in every supported layout."""
import json
import os
import re

import open_clip
import pytest
import torch
from PIL import Image

from mulclip import eval as mulclip_eval
from mulclip import eval_data, train

MODEL = "mulclip-micro"
COMMON = ["--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step mulclip.train run that also evaluated 16 held-out scenes itself."""
    logs = tmp_path_factory.mktemp("logs")
    results = train.main(["--model", MODEL, "--epochs", "1", "--batch-size", "8", "--train-num-samples", "32",
                          "--workers", "0", "--val-num-samples", "16", "--topk", "4", "--max-subcaptions", "4",
                          "--warmup", "2", "--no-tensorboard", "--no-eval-at-start", "--logs", str(logs),
                          "--name", "run"])
    return str(logs / "run"), results["epoch 1"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain open_clip state dict with CLIP's 77 text positions (a baseline checkpoint)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("plain") / "plain_clip.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), path)
    return str(path)


def _image(path, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_trained_run_and_plain_baseline_in_one_table(trained, plain, tmp_path, capsys):
    run_dir, from_training = trained
    output = tmp_path / "results.json"
    results = mulclip_eval.main(["--checkpoint", run_dir, plain, "--model", MODEL, "--num-samples", "16",
                                 "--rerank-beta", "0.5", "--output", str(output), *COMMON])
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    ours, baseline = results["models"]["run"], results["models"]["plain_clip.pt"]
    # The same held-out scenes as the training's own evaluation, hence the same numbers.
    for key, value in from_training.items():
        assert ours["metrics"][key] == pytest.approx(value), key
    assert ours["context_length"] == 248 and baseline["context_length"] == 77
    assert ours["rerank_topk"] == 4  # the run's --topk
    for model in (ours, baseline):
        values = model["metrics"]
        assert values["num_images"] == 16 and values["num_captions/long"] == values["num_captions/short"] == 16
        for key in ("long/text_to_image_R@1", "short/image_to_text_R@10", "hard_negative_accuracy",
                    "rerank0.5/long/image_to_text_R@5", "rerank0.5/short/text_to_image_R@1",
                    "rerank0.5/hard_negative_accuracy"):
            assert 0 <= values[key] <= 100, key
    table = capsys.readouterr().out
    assert "run" in table and "plain_clip.pt" in table and "rerank0.5/hard_negative_accuracy" in table


def test_plain_checkpoint_positions(plain):
    device = torch.device("cpu")
    native = mulclip_eval.load_encoder(plain, MODEL, "a", device, stretch=False, topk=None, sap_temperature=None)
    stretched = mulclip_eval.load_encoder(plain, MODEL, "b", device, stretch=True, topk=3, sap_temperature=None)
    assert native.context_length == 77 and stretched.context_length == 248
    assert stretched.topk == 3 and native.topk == mulclip_eval.DEFAULT_TOPK
    # The stretch keeps the first 20 rows, and with them every caption of up to 18 words.
    tokens = native.tokenizer(["a red circle on a white background"], context_length=77)
    torch.testing.assert_close(native.encode_text(tokens), stretched.encode_text(tokens))


def test_coco_karpathy_json(plain, tmp_path):
    root = tmp_path / "coco"
    records = {"images": [
        {"filename": "a.png", "filepath": "val2014", "split": "test",
         "sentences": [{"raw": "A red square."}, {"raw": "Something red. It is square."}, {"raw": "  "}]},
        {"filename": "b.png", "filepath": "val2014", "split": "test", "sentences": [{"raw": "A blue circle."}]},
        {"filename": "c.png", "filepath": "train2014", "split": "train", "sentences": [{"raw": "Not used."}]},
        {"filename": "d.png", "filepath": "val2014", "split": "test", "sentences": []},
    ]}
    os.makedirs(root)
    (root / "dataset_coco.json").write_text(json.dumps(records))
    for i, name in enumerate(("val2014/a.png", "val2014/b.png")):
        _image(str(root / name), i)
    results = mulclip_eval.main(["--checkpoint", plain, "--model", MODEL, "--data", "coco", "--data-path", str(root),
                                 "--rerank-beta", "1", *COMMON])
    values = results["models"]["plain_clip.pt"]["metrics"]
    assert values["num_images"] == 2 and values["num_captions/short"] == 3
    assert "long/image_to_text_R@1" not in values
    # Two images: every query is a hit at 2.
    assert values["short/image_to_text_R@5"] == values["rerank1/short/text_to_image_R@5"] == 100.0

    (root / "val2014" / "b.png").unlink()
    with pytest.raises(SystemExit, match="1 of 2 image files are missing"):
        mulclip_eval.main(["--checkpoint", plain, "--model", MODEL, "--data", "coco", "--data-path", str(root), *COMMON])


def test_imagefolder_zero_shot(trained, tmp_path):
    root = tmp_path / "classes"
    for c, name in enumerate(("red_square", "blue_circle", "green_star")):
        for i in range(2):
            _image(str(root / name / ("sub" if i else "") / f"{i}.png"), 10 * c + i)
    (root / "notes.txt").write_text("not a class")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    results = mulclip_eval.main(["--checkpoint", trained[0], "--data", "imagefolder", "--data-path", str(root),
                                 "--templates", str(templates), *COMMON])
    values = results["models"]["run"]["metrics"]
    assert values["num_images"] == 6 and values["num_classes"] == 3
    assert 0 <= values["zeroshot/top1"] <= 100 and values["zeroshot/top5"] == 100.0  # 3 classes

    data = eval_data.imagefolder(str(root), str(templates))
    assert data.classnames == ["blue circle", "green star", "red square"]
    assert data.labels == [0, 0, 1, 1, 2, 2] and data.templates[1]("cat") == "a drawing of a cat."
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="each with"):
        eval_data.load_templates(str(bad))


def test_long_caption_layouts(tmp_path):
    docci = tmp_path / "docci"
    lines = [{"example_id": "t1", "split": "test", "image_file": "t1.jpg", "description": "A dog. It runs."},
             {"example_id": "q1", "split": "qual_test", "image_file": "q1.jpg", "description": "Not in test."},
             {"example_id": "t2", "split": "test", "image_file": "t2.jpg", "description": "A cat on a mat."}]
    os.makedirs(docci)
    (docci / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    for name in ("t1", "t2"):
        _image(str(docci / "images" / f"{name}.jpg"), 0)
    data = eval_data.docci(str(docci))
    assert list(data.caption_sets) == ["long"] and data.caption_sets["long"].captions[0] == "A dog. It runs."
    assert [os.path.basename(p) for p in data.images] == ["t1.jpg", "t2.jpg"]

    dci = tmp_path / "densely_captioned_images"
    os.makedirs(dci / "complete")
    for i in range(2):
        (dci / "complete" / f"{i}.json").write_text(json.dumps(
            {"image": f"p{i}.jpg", "short_caption": f"Photo {i}.", "extra_caption": f"Detail {i}. More {i}."}))
        _image(str(dci / "photos" / f"p{i}.jpg"), i)
    data = eval_data.dci(str(tmp_path))
    assert data.caption_sets["short"].captions == ["Photo 0.", "Photo 1."]
    assert data.caption_sets["long"].captions[1] == "Photo 1.\nDetail 1. More 1."

    urban = tmp_path / "Urban1k"
    for i in range(3):
        _image(str(urban / "image" / f"{i}.jpg"), i)
        os.makedirs(urban / "caption", exist_ok=True)
        (urban / "caption" / f"{i}.txt").write_text("" if i == 1 else f"Street {i}. Cars.")
    data = eval_data.urban1k(str(tmp_path))
    assert data.caption_sets["long"].captions == ["Street 0. Cars.", "Street 2. Cars."]  # the empty caption is dropped
    assert data.caption_sets["long"].text_to_image == [0, 1]


def test_synthetic_matches_the_training_data():
    from mulclip.data.synthetic import SyntheticScenes

    data = eval_data.synthetic(5, 32, seed=3, num_negatives=2)
    scenes = SyntheticScenes(5, 32, seed=3, split="heldout", num_negatives=2)
    assert data.caption_sets["long"].captions == [scenes[i]["caption"] for i in range(5)]
    assert data.negatives[4] == scenes[4]["negatives"] and len(data.negatives[4]) == 2
    assert data.images[2]().tobytes() == scenes[2]["image"].tobytes()


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/no/such/model.pt"], "--checkpoint: no such file or folder: /no/such/model.pt"),
    (["--checkpoint", "notatag", "--model", MODEL], "neither a file nor a pretrained tag of mulclip-micro"),
    (["--checkpoint", "{run}", "--model", "mulclip-tiny"], "but .* was trained as mulclip-micro"),
    (["--checkpoint", "{plain}"], "give --model"),
    (["--checkpoint", "{empty}"], "not a mulclip.train run"),
    (["--checkpoint", "{run}", "--data", "coco"], "--data coco needs --data-path"),
    (["--checkpoint", "{run}", "--data", "urban1k", "--data-path", "/no/such/urban"], "--data-path: no such file"),
    (["--checkpoint", "{run}", "{plain}", "--label", "one"], "--label needs one name per --checkpoint"),
])
def test_clear_errors(trained, plain, tmp_path, capsys, argv, message):
    names = {"run": trained[0], "plain": plain, "empty": str(tmp_path)}
    argv = [a.format(**names) for a in argv]
    with pytest.raises(SystemExit) as exc:
        mulclip_eval.main([*argv, *COMMON])
    assert exc.value.code != 0
    assert re.search(message, f"{exc.value.code} {capsys.readouterr().err}")


def test_model_that_mulclip_cannot_wrap_is_evaluated_without_the_rerank(tmp_path, caplog):
    # A tiny ResNet CLIP: open_clip's encoders give the global scores; there are no patches to rerank with.
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "eval-test-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "eval-test-rn.json")
    path = tmp_path / "rn.pt"
    torch.save(open_clip.create_model("eval-test-rn").state_dict(), path)
    results = mulclip_eval.main(["--checkpoint", str(path), "--model", "eval-test-rn", "--num-samples", "8",
                                 "--rerank-beta", "1", *COMMON])
    values = results["models"]["rn.pt"]["metrics"]
    assert 0 <= values["long/image_to_text_R@1"] <= 100 and 0 <= values["hard_negative_accuracy"] <= 100
    assert not any(key.startswith("rerank") for key in values)
    assert "without the rerank" in caplog.text
