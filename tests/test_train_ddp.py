"""torchrun DDP on CPU (gloo): two processes of batch 4 follow one process of batch 8."""
import json
import os
import subprocess
import sys

import pytest

from mulclip import train

COMMON = ["--model", "mulclip-micro", "--epochs", "1", "--train-num-samples", "24", "--workers", "0", "--val-data", "",
          "--topk", "4", "--max-subcaptions", "4", "--warmup", "1", "--lr", "1e-3", "--no-tensorboard",
          "--log-every-n-steps", "1", "--seed", "3"]


def losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "loss" in json.loads(line)]


@pytest.mark.parametrize("flags", [["--lambda-sap", "0"], ["--sap-mode", "slot"]], ids=["global+wpr", "full"])
def test_two_process_ddp_matches_one_process(tmp_path, flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mulclip.train", *COMMON, "--batch-size", "4", *flags, "--logs-dir", str(tmp_path),
               "--name", "ddp", "--save-every", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout

    train.main([*COMMON, "--batch-size", "8", *flags, "--logs", str(tmp_path), "--name", "single"])
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [0, 1, 2]
    for a, b in zip(ddp, single):
        for key in ("loss", "global_loss", "wpr_loss", "sap_loss"):
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), (a["step"], key)
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["epoch_1.pt", "latest.pt"]
