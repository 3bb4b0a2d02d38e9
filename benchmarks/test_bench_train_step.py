"""One MulCLIP training step, `--ops reference` against the default (`auto`): memory and time.

Same model, same weights, same batch: the step of `mulclip.train` (forward, global + WPR + SAP
loss, backward, AdamW update). Memory is the peak CUDA allocation of the step on a GPU, and on
any device the bytes autograd saves for backward (model and loss together, and the loss alone).
The model is shaped like MulCLIP's setting where the alignment losses matter: ViT-B/16 geometry
(224 px, 16 px patches: P = 196, d = 512), long captions near 248 tokens with 8 subcaptions,
but thin and shallow towers so that a CPU runs the step in seconds; gradient checkpointing is
on, the memory-bound regime in which the loss's own tensors decide the peak.
"""
import copy
import json

import open_clip
import pytest
import torch

from mulclip.data import Collator
from mulclip.data.synthetic import SyntheticScenes
from mulclip.loss import LossConfig, mulclip_loss
from mulclip.model import create_model, get_tokenizer, image_transform
from mulclip.train import create_optimizer
from mulclip_kernels.memory import record_saved_tensors

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL = "mulclip-bench-b16"
CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "layers": 2, "width": 192, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}
BATCH = {"cpu": 8, "cuda": 64}[DEVICE.type]
SCENES_PER_CAPTION = 5  # five scene descriptions in a row: long captions of about 240 tokens


class _Args:
    lr, wd, beta1, beta2, eps = 1e-5, 0.1, 0.9, 0.98, 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_config")
    (folder / f"{MODEL}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = create_model(MODEL)
    model.clip.set_grad_checkpointing(True)
    scenes = SyntheticScenes(BATCH * SCENES_PER_CAPTION, 224)
    samples = []
    for b in range(BATCH):
        parts = [scenes[b * SCENES_PER_CAPTION + j] for j in range(SCENES_PER_CAPTION)]
        sentences = [s for part in parts for s in part["subcaptions"]]
        samples.append({"image": parts[0]["image"], "caption": " ".join(p["caption"] for p in parts),
                        "short_caption": sentences[0], "subcaptions": sentences[:8]})
    batch = Collator(get_tokenizer(MODEL), image_transform(model), model.context_length, 8)(samples)
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    return model, batch


def _first_step(setup, ops):
    """Run one step on a fresh copy of the weights, recording saved-for-backward bytes.

    Returns (step saved bytes, loss saved bytes, losses, the step function for timing).
    """
    base, batch = setup
    model = copy.deepcopy(base).to(DEVICE)
    optimizer = create_optimizer(model, _Args())
    recorders = {}

    def step():
        with record_saved_tensors() as on_model:
            out = model(batch["images"], batch["long_text"], batch["short_text"], batch["subcaption_text"],
                        batch["subcaption_mask"])
        with record_saved_tensors() as on_loss:
            losses = mulclip_loss(out, LossConfig(wpr_ops=ops, sap_ops=ops))
        recorders.update(model=on_model, loss=on_loss)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    losses = step()
    union = {**recorders["model"].numel, **recorders["loss"].numel}
    step_bytes = sum(key[1] for key in union)
    return step_bytes, recorders["loss"].total_bytes(), losses, step


RESULTS = {}


@pytest.mark.parametrize("ops", ["reference", "auto"])
def test_train_step(benchmark, setup, ops):
    step_bytes, loss_bytes, losses, step = _first_step(setup, ops)
    peak = None
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - start
    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=0)  # the recorded step above warmed up
    RESULTS[ops] = dict(step_saved_bytes=step_bytes, loss_saved_bytes=loss_bytes, peak_cuda_bytes=peak,
                        seconds=benchmark.stats.stats.median, **losses)
    benchmark.extra_info.update(ops=ops, device=str(DEVICE), batch=BATCH, model=MODEL, **RESULTS[ops])


def test_default_uses_clearly_less_memory(setup):
    for ops in ("reference", "auto"):
        if ops not in RESULTS:
            pytest.skip("run together with test_train_step")
    ref, lean = RESULTS["reference"], RESULTS["auto"]
    # Same step, same numbers: the backends agree on the first step's loss.
    assert lean["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    print(f"\ntrain step saved bytes, reference {ref['step_saved_bytes']:,} vs default {lean['step_saved_bytes']:,} "
          f"(ratio {lean['step_saved_bytes'] / ref['step_saved_bytes']:.3f}); loss alone "
          f"{ref['loss_saved_bytes']:,} vs {lean['loss_saved_bytes']:,}; step time {ref['seconds']:.2f} s vs "
          f"{lean['seconds']:.2f} s")
    assert lean["step_saved_bytes"] < 0.75 * ref["step_saved_bytes"]
    assert lean["loss_saved_bytes"] < 0.5 * ref["loss_saved_bytes"]
    if ref["peak_cuda_bytes"] is not None:
        print(f"peak CUDA bytes of the step: reference {ref['peak_cuda_bytes']:,} vs default {lean['peak_cuda_bytes']:,}")
        assert lean["peak_cuda_bytes"] < 0.8 * ref["peak_cuda_bytes"]
