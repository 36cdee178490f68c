"""Models, preprocess, evaluation metrics and a tiny end-to-end training run."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from node.bench import bench_step
from node.evaluation import EvalResult, evaluate, metrics_from_confusion
from node.loaders.base import Batch, epoch_batches
from node.models import MODELS, Preprocess, build_model, build_optimizer
from node.steps import epoch_is_cold, wait_percentiles
from node.telemetry import Sampler
from node.train import Trainer, TrainStep
from shared.results import EPOCHS, RUNS

EPOCH_COLUMNS = set(EPOCHS.names) - {"run_id", "schema_version"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: one intra-op thread is faster, and immune to a busy shared CI box
    # where OpenMP threads spin-wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BrightnessLoader:
    """Two learnable classes: dark (0) and bright (1) noisy images, in the loader contract."""

    def __init__(self, n: int, size: int = 16, batch_size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 2, n)
        base = np.where(self.labels == 1, 170, 85)[:, None, None, None]
        noise = rng.integers(-60, 61, (n, size, size, 3))
        self.images = np.clip(base + noise, 0, 255).astype(np.uint8)
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for pos in epoch_batches(len(self.labels), self.batch_size, self.seed, epoch):
            images = torch.from_numpy(self.images[pos])
            yield Batch(images, torch.from_numpy(self.labels[pos]).long(),
                        torch.from_numpy(pos), bytes_read=images.numel())


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [32, 64])
def test_convnet_shapes(size: int) -> None:
    model = build_model("convnet", 10, size).eval()
    with torch.no_grad():
        assert model(torch.randn(4, 3, size, size)).shape == (4, 10)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("googlenet", 32)])
def test_large_models_forward(name: str, size: int) -> None:
    model = build_model(name, 7, size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_stems_adapt_to_image_size() -> None:
    assert build_model("resnet18", 10, 32).conv1.stride == (1, 1)
    assert build_model("resnet18", 10, 224).conv1.stride == (2, 2)
    assert isinstance(build_model("resnet18", 10, 32).maxpool, nn.Identity)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="convnet, resnet18, googlenet"):
        build_model("vgg", 10, 32)
    with pytest.raises(ValueError, match="sgd, rmsprop"):
        build_optimizer("adam", build_model("convnet", 2, 32).parameters(), 0.1)
    assert MODELS == ("convnet", "resnet18", "googlenet")


def test_optimizers() -> None:
    params = list(build_model("convnet", 2, 32).parameters())
    sgd = build_optimizer("sgd", params, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    assert isinstance(build_optimizer("rmsprop", params), torch.optim.RMSprop)


def test_same_seed_same_init() -> None:
    a = TrainStep.build(model="convnet", num_classes=3, image_size=32, device="cpu", seed=5)
    b = TrainStep.build(model="convnet", num_classes=3, image_size=32, device="cpu", seed=5)
    c = TrainStep.build(model="convnet", num_classes=3, image_size=32, device="cpu", seed=6)
    sa, sb, sc = (t.model.state_dict() for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --------------------------------------------------------------------------- preprocess


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


def test_preprocess_eval_path() -> None:
    images = _images()
    out = Preprocess(32)(images)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expected)


def test_augmentation_is_seeded() -> None:
    images = _images()
    a1, a2 = Preprocess(32, seed=1)(images, augment=True), Preprocess(32, seed=1)(images, augment=True)
    b = Preprocess(32, seed=2)(images, augment=True)
    assert a1.shape == (8, 3, 32, 32)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, b)
    assert not torch.equal(a1, Preprocess(32)(images))


def test_augmentation_without_crop_only_flips() -> None:
    images = _images(16)
    plain = Preprocess(32, pad=0)(images)
    out = Preprocess(32, pad=0, seed=3)(images, augment=True)
    flipped = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain)]
    assert all(f or torch.equal(o, p) for f, o, p in zip(flipped, out, plain))
    assert 0 < sum(flipped) < 16


# --------------------------------------------------------------------------- evaluation


class _Oracle(nn.Module):
    """Predicts the class written in each image's first pixel."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = torch.round(x[:, 0, 0, 0] * 0.25 * 255 + 127.5).long()
        return nn.functional.one_hot(pred, self.k).float() * 5


def test_evaluate_hand_computed() -> None:
    targets = [0, 0, 0, 1, 1, 2, 1]
    preds = [0, 0, 1, 1, 2, 2, 3]  # class 3: predicted once, never true
    images = torch.tensor(preds, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 4, 4, 3)
    labels = torch.tensor(targets)
    batches = [Batch(images[:4].contiguous(), labels[:4], torch.arange(4)),
               Batch(images[4:].contiguous(), labels[4:], torch.arange(4, 7))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(_Oracle(5), batches, 5, Preprocess(4, pad=0))
    assert isinstance(result, EvalResult) and result.samples == 7
    assert result.accuracy == pytest.approx(4 / 7)
    # Per class (0..3; 4 absent from both): P = 1, 1/2, 1/2, 0; R = 2/3, 1/3, 1, 0.
    assert result.precision == pytest.approx(0.5)
    assert result.recall == pytest.approx(0.5)
    assert result.f1 == pytest.approx((0.8 + 0.4 + 2 / 3 + 0) / 4)
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(targets, preds):
        expected[t, p] += 1
    assert result.confusion.dtype == np.int64
    np.testing.assert_array_equal(result.confusion, expected)
    logits = nn.functional.one_hot(torch.tensor(preds), 5).float() * 5
    assert result.loss == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))
    cols = result.columns()
    assert set(cols) <= set(RUNS.names) and cols["confusion_matrix"] == expected.tolist()


def test_metrics_all_wrong_has_no_nan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = metrics_from_confusion(np.array([[0, 3], [0, 0]]))
    assert (r.accuracy, r.precision, r.recall, r.f1) == (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- training


def test_tiny_training_run_learns() -> None:
    train, val = BrightnessLoader(256, seed=0), BrightnessLoader(64, seed=1)
    trainer = Trainer(TrainStep.build(model="convnet", num_classes=2, image_size=16,
                                      device="cpu", seed=0, lr=0.05), device="cpu")
    seen: list[int] = []
    with Sampler() as sampler:
        trainer.sampler = sampler
        result = trainer.fit(train, 3, val_loader=val, before_epoch=seen.append)
    assert seen == [0, 1, 2]
    assert result.val is not None and result.val.accuracy >= 0.9
    for i, row in enumerate(result.epochs):
        assert set(row) <= EPOCH_COLUMNS
        # In-memory batches read nothing from storage: no epoch is cold, not even the first.
        assert row["epoch"] == i and row["cold"] is False
        assert row["data_time_s"] + row["compute_time_s"] <= row["epoch_time_s"]
        assert row["samples"] == 256 and row["steps"] == len(train)
        assert row["bytes_read"] == 256 * 16 * 16 * 3
        assert row["peak_ram_bytes"] > 0 and row["cpu_util_mean_pct"] > 0
        assert row["peak_vram_bytes"] is None and row["torch_peak_vram_bytes"] is None
    assert result.epochs[-1]["train_accuracy"] > 0.8
    run = result.run_columns()
    assert set(run) <= set(RUNS.names)
    assert 0 < run["data_wait_fraction"] < 1 and 0 < run["accelerator_utilization"] <= 1
    assert run["val_accuracy"] == result.val.accuracy
    assert result.telemetry is not None and result.telemetry.samples > 0


def test_max_steps_and_cold_unverified(capsys: pytest.CaptureFixture[str]) -> None:
    """--cold over batches already in memory: reads show no storage, so every epoch is
    recorded warm, each with one line on stderr."""
    # 64x64 images: the 2 steps consume 768 KiB, so stray reads (a first import) cannot
    # pass for the epoch's data. A first fit pages in the code a first step runs (torch's
    # kernels, read from disk on a fresh machine, count as this process's reads).
    def step() -> TrainStep:
        return TrainStep.build(model="convnet", num_classes=2, image_size=64, device="cpu",
                               seed=0, optimizer="rmsprop")

    Trainer(step(), device="cpu", max_steps=2).fit(BrightnessLoader(256, size=64), 2)
    trainer = Trainer(step(), device="cpu", max_steps=2, cold=True)
    result = trainer.fit(BrightnessLoader(256, size=64), 2)
    assert [r["steps"] for r in result.epochs] == [2, 2]
    assert [r["samples"] for r in result.epochs] == [64, 64]
    assert [r["cold"] for r in result.epochs] == [False, False]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err if "recorded warm" in line] == ["epoch 0",
                                                                              "epoch 1"]
    assert all(r["val_accuracy"] is None for r in result.epochs)
    for r in result.epochs:  # measured (Linux), and far below what the epoch consumed
        assert r["disk_read_bytes"] is not None and r["disk_read_bytes"] < r["bytes_read"] / 2
    assert result.val is None


def test_epoch_is_cold() -> None:
    assert epoch_is_cold(None, 100) is None  # unmeasurable: never true by default
    assert epoch_is_cold(50, 100) is True and epoch_is_cold(49, 100) is False
    assert epoch_is_cold(0, 0) is False
    # bytes consumed twice (a chunk serving several batches) need reading only once
    assert epoch_is_cold(50, 400, data_bytes=100) is True
    assert epoch_is_cold(49, 400, data_bytes=100) is False


class StagedLoader(BrightnessLoader):
    """Batches that report fixed stage times (None where ``missing``)."""

    def __init__(self, *args: Any, missing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missing = missing

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for k, batch in enumerate(super().epoch(epoch)):
            batch.read_s, batch.decode_s, batch.h2d_s = 0.25, 0.5, 0.125
            if self.missing and k == 1:
                batch.decode_s = None
            yield batch


def test_stage_times_and_wait_percentiles() -> None:
    for missing in (False, True):
        bencher = Trainer(bench_step(), device="cpu")
        loader = StagedLoader(64, batch_size=16, missing=missing)  # 4 steps
        result = bencher.fit(loader, 2)
        for row in result.epochs:
            assert row["read_time_s"] == 4 * 0.25 and row["h2d_time_s"] == 4 * 0.125
            assert row["decode_time_s"] == (None if missing else 4 * 0.5)
            assert row["time_to_first_batch_s"] <= row["batch_wait_max_s"]
            assert row["batch_wait_p50_s"] <= row["batch_wait_p95_s"] <= row["batch_wait_p99_s"] \
                <= row["batch_wait_max_s"] <= row["data_time_s"]
        assert len(result.waits) == 8  # every step of both epochs
        run = result.run_columns()
        assert run["batch_wait_max_s"] == max(r["batch_wait_max_s"] for r in result.epochs)
        assert run["time_to_first_batch_s"] == result.epochs[0]["time_to_first_batch_s"]
        assert run["cold_epochs"] == 0


def test_wait_percentiles_values() -> None:
    got = wait_percentiles([float(i) for i in range(1, 101)])  # 1..100 s
    assert got == {"batch_wait_p50_s": pytest.approx(50.5), "batch_wait_p95_s": pytest.approx(95.05),
                   "batch_wait_p99_s": pytest.approx(99.01), "batch_wait_max_s": 100.0}
    assert set(wait_percentiles([]).values()) == {None}
