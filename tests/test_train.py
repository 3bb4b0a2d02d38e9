"""The training loop end to end on CPU: a tiny model, the synthetic scenes, a few steps per test."""
import json
import os

import open_clip
import pytest
import torch

from mulclip import train
from mulclip.checkpoint import load
from mulclip.data.shards import ShardWriter
from mulclip.data.synthetic import SyntheticScenes, scenes_as_records

FAST = ["--model", "mulclip-micro", "--epochs", "1", "--batch-size", "8", "--train-num-samples", "32", "--workers", "0",
        "--val-data", "", "--topk", "4", "--max-subcaptions", "4", "--warmup", "2", "--lr", "1e-3",
        "--no-tensorboard", "--log-every-n-steps", "1"]


def run(tmp_path, name, *extra):
    return train.main([*FAST, "--logs", str(tmp_path), "--name", name, *extra])


def metrics(tmp_path, name):
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_one_epoch_writes_checkpoints_metrics_and_results(tmp_path, capsys):
    results = run(tmp_path, "basic", "--val-data", "synthetic", "--val-num-samples", "16")
    assert set(results) == {"untrained", "epoch 1"}
    for key in ("long/image_to_text_R@1", "long/text_to_image_R@10", "short/image_to_text_R@5", "hard_negative_accuracy"):
        assert 0 <= results["epoch 1"][key] <= 100
    assert results["epoch 1"]["num_images"] == 16
    assert "held-out retrieval" in capsys.readouterr().out
    records = [r for r in metrics(tmp_path, "basic") if "loss" in r]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["loss"] > 0 and r["skipped"] == 0 for r in records)
    folder = tmp_path / "basic"
    assert sorted(os.listdir(folder / "checkpoints")) == ["epoch_1.pt", "latest.pt"]
    assert (folder / "out.log").stat().st_size > 0
    assert json.loads((folder / "results.json").read_text())["epoch 1"]["num_images"] == 16

    state = load(str(folder / "checkpoints" / "epoch_1.pt"))
    assert state["step"] == 4 and state["epoch"] == 1 and state["batch_in_epoch"] == 0
    assert state["state_dict"]["positional_embedding"].shape[0] == 248
    plain = open_clip.create_model("mulclip-micro", pretrained=str(folder / "checkpoints" / "epoch_1.pt"),
                                   force_context_length=248)
    assert torch.equal(plain.positional_embedding, state["state_dict"]["positional_embedding"])


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "tb", "--tensorboard", "--stop-at-step", "2")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert {"loss", "wpr_loss", "sap_loss", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [0, 1]


def test_loss_goes_down_on_a_repeated_batch(tmp_path):
    run(tmp_path, "fit", "--train-num-samples", "8", "--epochs", "12")
    losses = [r["loss"] for r in metrics(tmp_path, "fit") if "loss" in r]
    assert len(losses) == 12
    assert losses[-1] < 0.6 * losses[0]


def test_resume_continues_the_same_loss_curve(tmp_path):
    run(tmp_path, "straight", "--epochs", "2", "--train-num-samples", "16")
    run(tmp_path, "split", "--epochs", "2", "--train-num-samples", "16", "--stop-at-step", "3")
    assert len([r for r in metrics(tmp_path, "split") if "loss" in r]) == 3
    assert load(str(tmp_path / "split" / "checkpoints" / "latest.pt"))["batch_in_epoch"] == 1
    run(tmp_path, "split", "--epochs", "2", "--train-num-samples", "16", "--resume", "latest")
    straight = [r for r in metrics(tmp_path, "straight") if "loss" in r]
    resumed = [r for r in metrics(tmp_path, "split") if "loss" in r]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in ("loss", "global_loss", "wpr_loss", "sap_loss", "lr", "logit_scale"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    final = [load(str(tmp_path / n / "checkpoints" / "latest.pt"))["state_dict"] for n in ("straight", "split")]
    for key in final[0]:
        torch.testing.assert_close(final[0][key], final[1][key], rtol=1e-5, atol=1e-6)


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    run(tmp_path, "fresh", "--resume", "latest")
    assert len([r for r in metrics(tmp_path, "fresh") if "loss" in r]) == 4


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    real = train.mulclip_loss
    calls = []

    def poisoned(out, cfg):
        losses = real(out, cfg)
        calls.append(1)
        if len(calls) == 3:
            losses["wpr_loss"] = losses["wpr_loss"] * float("nan")
            losses["loss"] = losses["loss"] + losses["wpr_loss"]
        return losses

    monkeypatch.setattr(train, "mulclip_loss", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 2 .*wpr_loss=nan"):
        run(tmp_path, "nan")
    assert len([r for r in metrics(tmp_path, "nan") if "loss" in r]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--train-data", "/no/such/shard-{000..001}.tar"], "--train-data: no such shard file: /no/such/shard-000.tar"),
    (["--val-data", "/no/such/dir.tar"], "--val-data: no such shard file"),
    (["--model", "ViT-Nope-1"], "--model: unknown model 'ViT-Nope-1'"),
    (["--model", "RN50"], "needs an open_clip ViT"),
    (["--topk", "17"], "--topk 17 exceeds the 16 patches"),
    (["--pretrained", "/no/such/weights.pt"], "--pretrained: '/no/such/weights.pt' is neither a file nor a pretrained tag"),
    (["--resume", "/no/such/ckpt.pt"], "--resume: no such checkpoint file"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_clear_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "err", *flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_latest_needs_name(capsys):
    from mulclip.params import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--resume", "latest"])
    assert "--resume latest needs --name" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        run(tmp_path, "taken")
    assert "exists" in capsys.readouterr().err


def test_training_on_shards_skips_bad_samples(tmp_path):
    data = SyntheticScenes(20, 32)
    with ShardWriter(str(tmp_path / "data"), "train", 10) as writer:
        for i, record in enumerate(scenes_as_records(data, range(20))):
            writer.write(*record)
            if i % 5 == 0:
                writer.write(f"broken{i}", "jpg", b"\xff\xd8 truncated jpeg", "A broken image.")
    run(tmp_path, "shards", "--train-data", str(tmp_path / "data"), "--train-num-samples", "16")
    records = [r for r in metrics(tmp_path, "shards") if "loss" in r]
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    assert sum(r["skipped"] for r in records) >= 2
    assert "skipped" in (tmp_path / "shards" / "out.log").read_text()


def test_reference_and_lean_ops_give_the_same_step(tmp_path):
    run(tmp_path, "ref", "--ops", "reference", "--stop-at-step", "2")
    run(tmp_path, "lean", "--ops", "torch", "--stop-at-step", "2")
    for a, b in zip(metrics(tmp_path, "ref"), metrics(tmp_path, "lean")):
        for key in ("loss", "wpr_loss", "sap_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("flags", [
    ["--calibration-tokens", "4", "--topk", "2"],
    ["--sap-mode", "all", "--precision", "amp_bf16"],
    ["--sap-mode", "cross", "--grad-checkpointing", "--grad-clip-norm", "1.0"],
    ["--lambda-wpr", "0", "--lambda-sap", "0"],
])
def test_variants_train(tmp_path, flags):
    run(tmp_path, "variant", "--stop-at-step", "2", *flags)
    records = [r for r in metrics(tmp_path, "variant") if "loss" in r]
    assert len(records) == 2 and all(r["loss"] > 0 for r in records)
    if "--lambda-wpr" in flags:
        assert all(r["wpr_loss"] == 0 and r["sap_loss"] == 0 for r in records)


def test_lock_image_keeps_the_image_tower(tmp_path):
    run(tmp_path, "locked", "--lock-image", "--stop-at-step", "2", "--save-every", "1")
    state = load(str(tmp_path / "locked" / "checkpoints" / "latest.pt"))
    torch.manual_seed(0)
    from mulclip.model import create_model

    initial = create_model("mulclip-micro").clip.state_dict()
    for key, value in state["state_dict"].items():
        if key.startswith("visual."):
            assert torch.equal(value, initial[key]), key
    assert not torch.equal(state["state_dict"]["text_projection"], initial["text_projection"])


def test_ops_backend_choice(tmp_path, capsys):
    from mulclip.params import op_backends

    assert op_backends("auto") == ("auto", "auto")
    assert op_backends("reference") == ("reference", "reference")
    if torch.cuda.is_available():
        return
    # Not installed (argparse error) or installed but unable to run on CPU tensors (exit message).
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "cuda", "--ops", "cuda")
    assert "--ops cuda" in str(exc.value) + capsys.readouterr().err
