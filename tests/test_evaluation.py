"""Evaluation protocols: parity with plain reference implementations, and sane numbers on real Fashion-MNIST."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import DeiTConfig, DeiTModel, ViTConfig, ViTForImageClassification, ViTModel

from attndistill_hf.data import DataArguments, probe_train_transform
from attndistill_hf.demo.fashion_mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    balanced_subset_indices,
    read_fashion_mnist_split,
)
from attndistill_hf.evaluation import (
    KNNEvaluationCallback,
    LinearProbeConfig,
    balanced_label_subset,
    card_records,
    compute_features,
    default_feature_model,
    extract_features,
    knn_accuracy,
    knn_ks_used,
    probe_feature_kind,
    run_knn_eval,
    run_linear_eval,
    train_linear_probe,
    train_linear_probe_on_images,
)

from helpers import load_recipe, run_two_processes, skip_without_real, tiny_student, write_image_folder


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_clean_accelerate():
    """Tiny models run fastest on one thread (two spin against each other on a busy machine); Accelerate's
    process-wide state created here must not leak into other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    reset_accelerate_state()


def tiny_vit_config(
    layers: int = 4, hidden: int = 32, channels: int = 1, image: int = 28, patch: int = 7, **extra: Any
) -> ViTConfig:
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        image_size=image,
        patch_size=patch,
        num_channels=channels,
        layer_norm_eps=1e-6,
        **extra,
    )


def tiny_vit(layers: int = 4, hidden: int = 32, channels: int = 1, image: int = 28, patch: int = 7) -> ViTModel:
    return ViTModel(tiny_vit_config(layers, hidden, channels, image, patch), add_pooling_layer=False).eval()


def clustered_features(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed class centres: k-NN is neither trivial nor hopeless on them."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + spread * torch.randn(n, dim, generator=gen), labels


# ---- independent reference: per test sample, plain Python, float64 ------------------------------


def reference_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    train = [row / np.linalg.norm(row) for row in train_x.double().numpy()]
    train_y = train_y.tolist()
    top1 = top5 = 0
    for query, target in zip(test_x.double().numpy(), test_y.tolist(), strict=True):
        query = query / np.linalg.norm(query)
        sims = [float(np.dot(query, row)) for row in train]
        neighbours = sorted(range(len(train)), key=lambda j: -sims[j])[: min(k, len(train))]
        votes = [0.0] * num_classes
        for j in neighbours:
            votes[train_y[j]] += math.exp(sims[j] / temperature)
        # DINO sorts the whole vote vector: classes without votes rank too (equal votes by class index).
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranking[0] == target
        top5 += target in ranking[: min(5, k)]
    n = len(test_y)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_knn_matches_reference(temperature: float) -> None:
    train_x, train_y = clustered_features(300, 10, 16, spread=1.6, seed=0)
    test_x, test_y = clustered_features(120, 10, 16, spread=1.6, seed=1)
    ks = (1, 2, 3, 10, 20, 50)
    result = knn_accuracy(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature)
    assert sorted(result) == list(ks)
    for k in ks:
        top1, top5 = reference_knn(train_x, train_y, test_x, test_y, k, temperature, 10)
        assert result[k]["top1"] == pytest.approx(top1, abs=1e-9), k
        assert result[k]["top5"] == pytest.approx(top5, abs=1e-9), k
    # The data is neither trivial nor hopeless, so the comparison means something.
    assert 30 < result[20]["top1"] < 95


def test_knn_top5_ranks_classes_without_votes_as_dino() -> None:
    """Fewer voted classes than top-5 slots: DINO's sorted vote vector fills them with zero-vote classes."""
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([2, 2, 1])
    test_x = torch.tensor([[1.0, 0.05]] * 3)  # both nearest neighbours are class 2
    # k=2 ranks class 2 (votes), then class 0 (no votes, lowest index): top-2 holds {2, 0}, not 1.
    result = knn_accuracy(train_x, train_y, test_x, torch.tensor([2, 0, 1]), ks=(1, 2, 3), num_classes=3)
    assert result[1] == pytest.approx({"top1": 100 / 3, "top5": 100 / 3})  # top-5 of k=1 is its top-1
    assert result[2] == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})
    assert result[3]["top5"] == 100.0  # 3 classes, 3 slots
    # The same on random data with many classes and small k, against the plain reference.
    train_x, train_y = clustered_features(200, 40, 8, spread=0.8, seed=6)
    test_x, test_y = clustered_features(150, 40, 8, spread=0.8, seed=7)
    result = knn_accuracy(train_x, train_y, test_x, test_y, ks=(2, 3, 4), num_classes=40)
    for k in (2, 3, 4):
        top1, top5 = reference_knn(train_x, train_y, test_x, test_y, k, 0.07, 40)
        assert result[k] == {"top1": pytest.approx(top1, abs=1e-9), "top5": pytest.approx(top5, abs=1e-9)}, k


def test_knn_chunked_equals_unchunked() -> None:
    train_x, train_y = clustered_features(500, 12, 8, spread=1.2, seed=2)
    test_x, test_y = clustered_features(203, 12, 8, spread=1.2, seed=3)
    kwargs = {"ks": (5, 20, 200), "temperature": 0.07, "num_classes": 15}
    whole = knn_accuracy(train_x, train_y, test_x, test_y, chunk_size=10_000, **kwargs)
    for chunk in (1, 7, 64, None):
        assert knn_accuracy(train_x, train_y, test_x, test_y, chunk_size=chunk, **kwargs) == whole


def test_knn_keys_a_clipped_k_by_the_k_it_used_and_validates_input() -> None:
    train_x, train_y = clustered_features(40, 4, 8, spread=1.0, seed=4)
    test_x, test_y = clustered_features(30, 4, 8, spread=1.0, seed=5)
    with pytest.warns(UserWarning, match=r"k=100, 200 exceed the 40 train features; k=40 is reported instead"):
        clipped = knn_accuracy(train_x, train_y, test_x, test_y, ks=(10, 100, 200))
    # A result never carries a k the train set could not give: 100 and 200 both ran as k=40.
    assert list(clipped) == [10, 40]
    assert clipped[40] == knn_accuracy(train_x, train_y, test_x, test_y, ks=(40,))[40]
    assert clipped[10] == knn_accuracy(train_x, train_y, test_x, test_y, ks=(10,))[10]
    assert knn_ks_used((10, 20, 100, 200), 64) == {10: 10, 20: 20, 100: 64, 200: 64}
    # Identical train and test sets with k=1: every test point finds itself.
    assert knn_accuracy(train_x, train_y, train_x, train_y, ks=(1,))[1] == {"top1": 100.0, "top5": 100.0}

    with pytest.raises(ValueError, match="dimension"):
        knn_accuracy(train_x, train_y, test_x[:, :4], test_y)
    with pytest.raises(ValueError, match="negative"):
        knn_accuracy(train_x, train_y - 1, test_x, test_y)
    with pytest.raises(ValueError, match="one label per feature"):
        knn_accuracy(train_x, train_y[:-1], test_x, test_y)
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(train_x, train_y, test_x, test_y, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_accuracy(train_x, train_y, test_x, test_y, num_classes=2)
    with pytest.raises(ValueError, match="integer"):
        knn_accuracy(train_x, train_y.float(), test_x, test_y)


# ---- real Fashion-MNIST ------------------------------------------------------------------------------

MEAN, STD = 0.286, 0.353


@pytest.fixture(scope="module")
def fmnist() -> dict[str, torch.Tensor]:
    """2000 train / 500 test images (class-balanced), normalised, [N, 1, 28, 28]."""
    skip_without_real()
    data = {}
    for split, count, seed in (("train", 2000, 0), ("test", 500, 1)):
        images, labels = read_fashion_mnist_split(DEBIAN_FASHION_MNIST_DIR, split)
        keep = balanced_subset_indices(labels, count, seed)
        data[f"{split}_x"] = ((torch.from_numpy(images[keep]).float() / 255 - MEAN) / STD).unsqueeze(1)
        data[f"{split}_y"] = torch.from_numpy(labels[keep])
    return data


def loaders(data: dict[str, torch.Tensor], batch_size: int = 250) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(TensorDataset(data["train_x"], data["train_y"]), batch_size=batch_size),
        DataLoader(TensorDataset(data["test_x"], data["test_y"]), batch_size=batch_size),
    )


def model_knn_top1(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    train_loader, test_loader = loaders(data)
    train = extract_features(model, train_loader, progress=False)
    test = extract_features(model, test_loader, progress=False)
    return knn_accuracy(*train, *test, ks=(20,))[20]["top1"]


@pytest.fixture(scope="module")
def trained_vit(fmnist: dict[str, torch.Tensor]) -> tuple[ViTModel, ViTModel]:
    """A random tiny ViT and a copy trained briefly (supervised, linear head on CLS)."""
    torch.manual_seed(0)
    random_model = tiny_vit(layers=4)
    model = tiny_vit(layers=4)
    model.load_state_dict(random_model.state_dict())
    head = nn.Linear(model.config.hidden_size, 10)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        index = torch.randint(0, fmnist["train_x"].shape[0], (128,), generator=gen)
        cls = model(pixel_values=fmnist["train_x"][index]).last_hidden_state[:, 0]
        loss = F.cross_entropy(head(cls), fmnist["train_y"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return random_model.eval(), model.eval()


def test_knn_on_raw_pixels_is_sane(fmnist: dict[str, torch.Tensor]) -> None:
    result = knn_accuracy(
        fmnist["train_x"].flatten(1), fmnist["train_y"], fmnist["test_x"].flatten(1), fmnist["test_y"]
    )
    assert 72.0 < result[20]["top1"] < 90.0  # published full-set pixel k-NN is ~85%; 2k train costs a few points
    assert result[20]["top5"] > 95.0
    assert all(result[k]["top5"] >= result[k]["top1"] for k in result)


def test_trained_model_beats_random_model(
    fmnist: dict[str, torch.Tensor], trained_vit: tuple[ViTModel, ViTModel]
) -> None:
    random_model, trained = trained_vit
    random_top1, trained_top1 = model_knn_top1(random_model, fmnist), model_knn_top1(trained, fmnist)
    assert 20.0 < random_top1 < trained_top1 - 5.0
    assert trained_top1 > 72.0


# ---- feature extraction ------------------------------------------------------------------------------


def test_feature_kinds_dims_and_manual_values() -> None:
    model = tiny_vit(layers=5, hidden=32)
    pixels = torch.randn(6, 1, 28, 28)
    labels = torch.arange(6)
    loader = DataLoader(TensorDataset(pixels, labels), batch_size=4)

    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in model.layers]
    with torch.no_grad():
        final = model(pixel_values=pixels).last_hidden_state
        manual_last4 = torch.cat([model.layernorm(out[:, 0]) for out in captured[-4:]], dim=-1)
    for hook in hooks:
        hook.remove()
    manual_avg = torch.cat([final[:, 0], final[:, 1:].mean(dim=1)], dim=-1)

    expected = {"cls": final[:, 0], "last4_cls": manual_last4, "cls+avgpool": manual_avg}
    dims = {"cls": 32, "last4_cls": 128, "cls+avgpool": 64}
    for kind, manual in expected.items():
        features, got_labels = extract_features(model, loader, kind=kind, progress=False)
        assert features.shape == (6, dims[kind]) and features.dtype == torch.float32
        torch.testing.assert_close(features, manual, atol=1e-5, rtol=1e-5)
        assert got_labels.tolist() == list(range(6)) and got_labels.dtype == torch.long
    # Batching does not change the values (dataset order kept across batches).
    one_batch = extract_features(model, DataLoader(TensorDataset(pixels, labels), batch_size=6), progress=False)
    torch.testing.assert_close(one_batch[0], extract_features(model, loader, progress=False)[0])


def test_avgpool_excludes_all_prefix_tokens() -> None:
    """DeiT has CLS + distillation token before the patches: neither may enter the patch average."""
    config = DeiTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
        num_channels=1,
    )
    model = DeiTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state
        features = compute_features(model, pixels, "cls+avgpool")
    assert tokens.shape[1] == 2 + 16
    torch.testing.assert_close(features, torch.cat([tokens[:, 0], tokens[:, 2:].mean(1)], -1))


def test_extract_features_batch_formats_and_errors() -> None:
    model = tiny_vit(layers=2)
    pixels = torch.randn(5, 1, 28, 28)

    class DictDataset(Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": pixels[i], "labels": torch.tensor(i % 2)}

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ((pixels[i], i) for i in range(5))

    streamed, stream_labels = extract_features(model, DataLoader(Stream(), batch_size=2), progress=False)
    assert stream_labels.tolist() == list(range(5))
    from_dicts, labels = extract_features(model, DataLoader(DictDataset(), batch_size=2), progress=False)
    torch.testing.assert_close(streamed, from_dicts)
    from_tensors, no_labels = extract_features(model, DataLoader(pixels, batch_size=3), progress=False)
    torch.testing.assert_close(from_dicts, from_tensors)
    assert labels.tolist() == [0, 1, 0, 1, 0]
    assert no_labels.tolist() == [-1] * 5  # unlabelled batches are marked, and k-NN refuses them

    with pytest.raises(ValueError, match="at least 4 transformer blocks"):
        extract_features(model, DataLoader(pixels, batch_size=3), kind="last4_cls", progress=False)
    with pytest.raises(ValueError, match="Unknown feature kind"):
        extract_features(model, DataLoader(pixels, batch_size=3), kind="pooler", progress=False)
    with pytest.raises(ValueError, match="no images"):
        extract_features(model, [], progress=False)
    # Batches from the collator carry a count of undecodable images; all-failed batches have 0 rows.
    batches = [
        {"pixel_values": pixels[:2], "labels": torch.tensor([1, 2]), "skipped_images": torch.tensor(1)},
        {"pixel_values": pixels[:0], "labels": torch.zeros(0, dtype=torch.long), "skipped_images": torch.tensor(2)},
    ]
    with pytest.warns(UserWarning, match="3 image"):
        features, labels = extract_features(model, batches, progress=False)
    assert features.shape[0] == 2 and labels.tolist() == [1, 2]


def test_feature_cache_is_reused_without_running_the_model(tmp_path: Path) -> None:
    model = tiny_vit(layers=4)
    loader = DataLoader(TensorDataset(torch.randn(7, 1, 28, 28), torch.arange(7)), batch_size=3)
    cache = tmp_path / "cache" / "train.safetensors"
    first = extract_features(model, loader, kind="last4_cls", cache_path=cache, progress=False)
    assert cache.is_file()

    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    second = extract_features(model, loader, kind="last4_cls", cache_path=cache, progress=False)
    assert calls == []  # loaded, not recomputed
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    hook.remove()

    with pytest.raises(ValueError, match="'last4_cls' features, not 'cls'"):
        extract_features(model, loader, kind="cls", cache_path=cache, progress=False)
    with torch.no_grad():
        model.layernorm.weight.add_(1.0)
    with pytest.raises(ValueError, match="different model weights"):
        extract_features(model, loader, kind="last4_cls", cache_path=cache, progress=False)
    with torch.no_grad():
        model.layernorm.weight.sub_(1.0)
    smaller = DataLoader(TensorDataset(torch.randn(5, 1, 28, 28), torch.arange(5)), batch_size=3)
    with pytest.raises(ValueError, match="dataset of 7 items"):
        extract_features(model, smaller, kind="last4_cls", cache_path=cache, progress=False)


def test_extract_with_single_process_accelerator() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_vit(layers=2)
    loader = DataLoader(TensorDataset(torch.randn(11, 1, 28, 28), torch.arange(11)), batch_size=4)
    plain = extract_features(model, loader, progress=False)
    gathered = extract_features(model, accelerator.prepare(loader), accelerator=accelerator, progress=False)
    torch.testing.assert_close(gathered[0], plain[0])
    assert gathered[1].tolist() == list(range(11))


GATHER_WORKER = """
import sys
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTConfig, ViTModel
from attndistill_hf.evaluation import extract_features

torch.manual_seed(0)
accelerator = Accelerator(cpu=True)
config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   image_size=28, patch_size=7, num_channels=1)
model = ViTModel(config, add_pooling_layer=False).eval()
# 11 items in batches of 2 over 2 processes: the last round is uneven and padded by Accelerate.
loader = DataLoader(TensorDataset(torch.randn(11, 1, 28, 28), torch.arange(11)), batch_size=2)
features, labels = extract_features(model, accelerator.prepare(loader), accelerator=accelerator, progress=False)
reference, _ = extract_features(model, loader, progress=False)
torch.save({"features": features, "labels": labels, "reference": reference},
           f"{sys.argv[1]}/rank{accelerator.process_index}.pt")
"""


@pytest.mark.slow
def test_extract_gathers_across_processes_in_dataset_order(tmp_path: Path) -> None:
    """Two CPU processes (gloo) launched by torchrun: every rank gets all features, in order, no duplicates."""
    run_two_processes(GATHER_WORKER, tmp_path, timeout=150)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["labels"].tolist() == list(range(11))
        torch.testing.assert_close(result["features"], result["reference"])


# ---- balanced label subsets --------------------------------------------------------------------------


def test_balanced_label_subset() -> None:
    labels = torch.tensor([0] * 200 + [1] * 100 + [2] * 30 + [3] * 1)[torch.randperm(331)]
    keep = balanced_label_subset(labels, 0.1, seed=3)
    counts = torch.bincount(labels[keep], minlength=4).tolist()
    assert counts == [20, 10, 3, 1]  # per class round(10%), at least one
    assert keep.unique().numel() == keep.numel() and torch.all(keep[1:] > keep[:-1])
    assert torch.equal(keep, balanced_label_subset(labels, 0.1, seed=3))
    assert not torch.equal(keep, balanced_label_subset(labels, 0.1, seed=4))
    assert torch.bincount(labels[balanced_label_subset(labels, 0.01, seed=0)], minlength=4).tolist() == [2, 1, 1, 1]
    assert torch.equal(balanced_label_subset(labels, 1.0, seed=0), torch.arange(331))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            balanced_label_subset(labels, bad)


# ---- linear probe ------------------------------------------------------------------------------------


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose class is the arg-max of the first 10 coordinates: linearly separable by construction."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    features = 0.3 * torch.randn(n, 24, generator=gen)
    features[torch.arange(n), labels] += 3.0
    return features, labels


def test_linear_probe_separable_reaches_100_percent() -> None:
    train_x, train_y = separable(1000, 0)
    test_x, test_y = separable(400, 1)
    config = LinearProbeConfig(epochs=15, batch_size=64, lr_sweep=(1e-3, 10.0, 100.0), progress=False)
    assert config.learning_rates() == pytest.approx([2.5e-4, 2.5, 25.0])  # lr x batch / 256
    report = train_linear_probe(train_x, train_y, test_x, test_y, config)
    assert report["top1"] >= 99.5 and report["top5"] == 100.0
    assert sorted(report["per_lr"]) == ["0.00025", "2.5", "25"]
    assert report["num_train"] == 1000 and report["feature_dim"] == 24 and report["num_classes"] == 10


def reference_probe(train_x, train_y, test_x, test_y, lr, epochs, batch, seed, classes) -> list[float]:
    """DINO's probe from its description: N(0, 0.01) init, SGD momentum 0.9, cosine per epoch, reshuffle each epoch.

    Returns the test top-1 after every epoch.
    """
    accuracies = []
    init = torch.Generator().manual_seed(seed)
    weight = (torch.randn(classes, train_x.shape[1], generator=init) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    order_gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        epoch_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(train_x.shape[0], generator=order_gen)
        for start in range(0, train_x.shape[0], batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(train_x[index] @ weight.T + bias, train_y[index])
            grads = torch.autograd.grad(loss, [weight, bias])
            with torch.no_grad():
                for param, grad, vel in zip((weight, bias), grads, velocity, strict=True):
                    vel.mul_(0.9).add_(grad)
                    param.sub_(epoch_lr * vel)
        with torch.no_grad():
            predictions = (test_x @ weight.T + bias).argmax(1)
        accuracies.append(100.0 * float((predictions == test_y).float().mean()))
    return accuracies


def test_linear_probe_matches_reference_and_sweep_heads_are_independent() -> None:
    train_x, train_y = clustered_features(600, 6, 12, spread=2.0, seed=7)
    test_x, test_y = clustered_features(300, 6, 12, spread=2.0, seed=8)
    single = LinearProbeConfig(epochs=8, batch_size=32, base_lr=0.5, seed=5, progress=False)
    report = train_linear_probe(train_x, train_y, test_x, test_y, single)
    per_epoch = reference_probe(train_x, train_y, test_x, test_y, 0.5 * 32 / 256, 8, 32, 5, 6)
    expected = per_epoch[-1]
    assert 40 < expected < 98  # not saturated, so the comparison is informative
    assert report["top1"] == pytest.approx(expected, abs=100 / 300 + 1e-9)  # at most one borderline sample
    # DINO's number: the best epoch, scored on the test set after every epoch (eval_every=1).
    assert report["best_epoch"]["top1"] == pytest.approx(max(per_epoch), abs=100 / 300 + 1e-9)
    assert report["best_epoch"]["lr"] == report["lr"] and 1 <= report["best_epoch"]["epoch"] <= 8

    # In a sweep, the first head sees the same init and batches as a single run: identical result.
    sweep = LinearProbeConfig(epochs=8, batch_size=32, lr_sweep=(0.5, 0.01), seed=5, progress=False)
    swept = train_linear_probe(train_x, train_y, test_x, test_y, sweep)
    assert swept["per_lr"][f"{0.5 * 32 / 256:g}"] == {"top1": report["top1"], "top5": report["top5"]}


def test_linear_probe_best_epoch_only_counts_the_scored_epochs() -> None:
    train_x, train_y = clustered_features(600, 6, 12, spread=2.0, seed=7)
    test_x, test_y = clustered_features(300, 6, 12, spread=2.0, seed=8)
    per_epoch = reference_probe(train_x, train_y, test_x, test_y, 0.5 * 32 / 256, 8, 32, 5, 6)

    def probe(eval_every: int) -> dict:
        config = LinearProbeConfig(epochs=8, batch_size=32, base_lr=0.5, seed=5, eval_every=eval_every, progress=False)
        return train_linear_probe(train_x, train_y, test_x, test_y, config)

    final_only = probe(0)
    assert final_only["best_epoch"] == {
        "top1": final_only["top1"],
        "top5": final_only["top5"],
        "lr": 0.0625,
        "epoch": 8,
    }
    every_third = probe(3)["best_epoch"]  # scored after epochs 3, 6 and 8
    assert every_third["epoch"] in (3, 6, 8)
    scored = [per_epoch[2], per_epoch[5], per_epoch[7]]
    assert every_third["top1"] == pytest.approx(max(scored), abs=100 / 300 + 1e-9)
    with pytest.raises(ValueError, match="eval_every"):
        LinearProbeConfig(eval_every=-1)


def test_linear_probe_semi_supervised_and_config_checks() -> None:
    train_x, train_y = separable(1000, 2)
    test_x, test_y = separable(200, 3)
    config = LinearProbeConfig(epochs=10, batch_size=16, lr=1.0, label_fraction=0.05, progress=False)
    report = train_linear_probe(train_x, train_y, test_x, test_y, config)
    assert report["num_train"] == len(balanced_label_subset(train_y, 0.05, 0))
    assert 45 <= report["num_train"] <= 55
    assert report["top1"] > 95.0 and report["label_fraction"] == 0.05
    with pytest.raises(ValueError, match="lr_sweep"):
        LinearProbeConfig(lr=0.1, lr_sweep=(0.1,))
    with pytest.raises(ValueError, match="label_fraction"):
        LinearProbeConfig(label_fraction=2.0)
    with pytest.raises(ValueError, match="epochs"):
        LinearProbeConfig(epochs=0)


def test_linear_probe_refuses_labels_beyond_num_classes() -> None:
    """As knn_accuracy does: a test label the heads cannot predict would be counted as a miss."""
    train_x, train_y = separable(400, 4)
    test_x, test_y = separable(100, 5)
    keep = train_y < 5  # the training labels fit 5 classes, the test labels go up to 9
    config = LinearProbeConfig(epochs=1, batch_size=64, lr=1.0, progress=False)
    with pytest.raises(ValueError, match="num_classes=5 but labels go up to 9"):
        train_linear_probe(train_x[keep], train_y[keep], test_x, test_y, config, num_classes=5)
    model = tiny_student()
    pixels = torch.randn(6, 3, 32, 32)
    loader = DataLoader(
        [{"pixel_values": image, "labels": label} for image, label in zip(pixels, [0, 1, 0, 1, 2, 3], strict=True)],
        batch_size=3,
    )
    with pytest.raises(ValueError, match="num_classes=2 but labels go up to 3"):
        train_linear_probe_on_images(model, loader, loader, "cls", config, num_classes=2)


def test_probe_train_transform_is_dinos_eval_linear_view() -> None:
    """Seed for seed, the same tensors as DINO's eval_linear.py training transform (torchvision v1 defaults)."""
    from PIL import Image
    from torchvision import transforms as v1

    from attndistill_hf.data import IMAGENET_MEAN, IMAGENET_STD, train_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8))
    for size in (224, 32):
        dino = v1.Compose(
            [
                v1.RandomResizedCrop(size),
                v1.RandomHorizontalFlip(),
                v1.ToTensor(),
                v1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        ours = probe_train_transform(size)
        for seed in range(6):
            torch.manual_seed(seed)
            expected = dino(image)
            torch.manual_seed(seed)
            got = ours(image)
            assert got.shape == (3, size, size) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected)
    # The distillation view (scale 0.2-1, bicubic) draws other crops: it is not the probe's view.
    torch.manual_seed(0)
    distill_view = train_transform(224)(image)
    torch.manual_seed(0)
    assert not torch.allclose(distill_view, probe_train_transform(224)(image), atol=1e-3)
    # Any PIL mode becomes normalised RGB with the given statistics: a constant grey image stays constant.
    grey = probe_train_transform(16, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))(Image.new("L", (40, 30), 255))
    torch.testing.assert_close(grey, torch.tensor([1.0, 3.0, 1.0])[:, None, None].expand(3, 16, 16))
    with pytest.raises(ValueError, match="std must be a finite number > 0"):
        probe_train_transform(16, (0.5,) * 3, (0.0,) * 3)


def test_probe_feature_kind_auto_follows_dinos_per_model_choice() -> None:
    for hidden, expected in ((64, "last4_cls"), (192, "last4_cls"), (384, "last4_cls"), (768, "cls+avgpool")):
        config = ViTConfig(hidden_size=hidden, num_attention_heads=hidden // 64)
        assert probe_feature_kind("auto", config) == expected, hidden
    assert probe_feature_kind("auto", ViTConfig(hidden_size=1024, num_attention_heads=16)) == "cls+avgpool"
    # Explicit choices win, whatever the model.
    base = ViTConfig(hidden_size=768)
    assert [probe_feature_kind(kind, base) for kind in ("cls", "last4_cls")] == ["cls", "last4_cls"]
    assert probe_feature_kind("cls+avgpool", None) == "cls+avgpool"
    with pytest.raises(ValueError, match="Unknown feature kind"):
        probe_feature_kind("pooled", base)
    with pytest.raises(ValueError, match="no integer hidden_size"):
        probe_feature_kind("auto", None)


def test_run_linear_eval_resolves_and_records_auto_kind(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    pixels, labels = torch.randn(20, 1, 28, 28), torch.arange(20) % 4
    loader = DataLoader(TensorDataset(pixels, labels), batch_size=10)
    config = LinearProbeConfig(epochs=1, batch_size=10, eval_every=0, progress=False)
    wide = ViTModel(tiny_vit_config(layers=1, hidden=768), add_pooling_layer=False).eval()
    cases = ((tiny_vit(layers=4), {}, "last4_cls", 4 * 32), (wide, {}, "cls+avgpool", 2 * 768))
    cases += ((tiny_vit(layers=4), {"kind": "cls"}, "cls", 32),)
    for model, kwargs, expected, dim in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="attndistill_hf.evaluation"):
            results = run_linear_eval(model, loader, loader, config=config, augment=False, print_table=False, **kwargs)
        assert results["kind"] == expected and results["feature_dim"] == dim
        assert f"Linear-probe features: {expected}" in caplog.text


class FlipDataset(Dataset):
    """Images with a random horizontal flip: the augmentation the faithful path must apply every epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.calls = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        image = self.images[i]
        return (image.flip(-1) if torch.rand(()) < 0.5 else image), self.labels[i]


def test_linear_probe_on_images(fmnist: dict[str, torch.Tensor], trained_vit: tuple[ViTModel, ViTModel]) -> None:
    _, model = trained_vit
    model.train()  # the probe must evaluate the backbone in eval mode and hand it back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = FlipDataset(fmnist["train_x"][:800], fmnist["train_y"][:800])
    train_loader = DataLoader(dataset, batch_size=100, shuffle=True)
    test_loader = DataLoader(TensorDataset(fmnist["test_x"], fmnist["test_y"]), batch_size=250)
    config = LinearProbeConfig(epochs=4, batch_size=100, lr_sweep=(0.3, 3.0, 30.0), progress=False)
    report = train_linear_probe_on_images(model, train_loader, test_loader, "last4_cls", config)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen
    assert dataset.calls == 4 * 800  # images (and their augmentation) are drawn anew every epoch
    assert report["feature_dim"] == 4 * 32 and report["num_train"] == 800
    assert report["top1"] > 65.0, report["per_lr"]

    semi = LinearProbeConfig(epochs=2, batch_size=20, lr=1.0, label_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="train_labels"):
        train_linear_probe_on_images(model, train_loader, test_loader, "cls", semi)
    semi_report = train_linear_probe_on_images(
        model, train_loader, test_loader, "cls", semi, train_labels=fmnist["train_y"][:800]
    )
    assert semi_report["num_train"] == 80 and semi_report["top1"] > 40.0
    model.eval()


# ---- Trainer callback --------------------------------------------------------------------------------


class DictTensorDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


@pytest.mark.parametrize("attach", [True, False])
def test_knn_callback_logs_during_training(fmnist: dict[str, torch.Tensor], tmp_path: Path, attach: bool) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(layers=2, num_labels=10))
    knn_train = DataLoader(TensorDataset(fmnist["train_x"][:400], fmnist["train_y"][:400]), batch_size=200)
    knn_test = DataLoader(TensorDataset(fmnist["test_x"][:200], fmnist["test_y"][:200]), batch_size=200)
    callback = KNNEvaluationCallback(knn_train, knn_test, every_n_steps=4, feature_model=lambda m: m.vit)

    modes = []

    class ModeSpy(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            modes.append(model.training)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=32,
        logging_steps=4,
        learning_rate=3e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=DictTensorDataset(fmnist["train_x"], fmnist["train_y"]),
        callbacks=[ModeSpy()] + ([] if attach else [callback]),
    )
    if attach:
        callback.attach(trainer)
    trainer.train()

    knn_logs = [entry for entry in trainer.state.log_history if "eval_knn_top1" in entry]
    assert [entry["step"] for entry in knn_logs] == [4, 8]  # every 4 steps; the end of training is step 8 again
    assert [entry["eval_knn_top1"] for entry in knn_logs] == [h["eval_knn_top1"] for h in callback.history]
    loss_steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert loss_steps == [4, 8]  # the regular logging is not disturbed
    assert all(modes) and len(modes) == 8  # training resumed in train mode after each evaluation

    # The last value is the k-NN top-1 of the final model, computed independently.
    model.eval()
    expected = knn_accuracy(
        *extract_features(model.vit, knn_train, progress=False),
        *extract_features(model.vit, knn_test, progress=False),
        ks=(20,),
    )[20]["top1"]
    assert knn_logs[-1]["eval_knn_top1"] == pytest.approx(expected)
    assert 10.0 < expected <= 100.0


def test_knn_callback_with_precomputed_labels() -> None:
    """Loaders of bare pixels plus label tensors: the callback's value is the k-NN top-1 of the model."""
    model = tiny_vit(layers=2).train()
    train_x, test_x = torch.randn(60, 1, 28, 28), torch.randn(20, 1, 28, 28)
    train_y, test_y = torch.arange(60) % 3, torch.arange(20) % 3
    callback = KNNEvaluationCallback(
        DataLoader(train_x, batch_size=25),
        DataLoader(test_x, batch_size=25),
        k=5,
        train_labels=train_y,
        test_labels=test_y,
    )
    value = callback.evaluate(model)
    assert model.training
    model.eval()
    with torch.no_grad():
        train_f, test_f = (
            model(pixel_values=train_x).last_hidden_state[:, 0],
            model(pixel_values=test_x).last_hidden_state[:, 0],
        )
    assert value == knn_accuracy(train_f, train_y, test_f, test_y, ks=(5,))[5]["top1"]
    unlabeled = KNNEvaluationCallback(DataLoader(train_x, batch_size=25), DataLoader(test_x, batch_size=25))
    with pytest.raises(ValueError, match="train_labels="):
        unlabeled.evaluate(model)


def test_default_feature_model_unwraps_wrappers() -> None:
    student = tiny_vit(layers=1)

    class Distiller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = student, tiny_vit(layers=1)

    class DataParallelLike(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert default_feature_model(DataParallelLike(Distiller())) is student
    assert default_feature_model(DataParallelLike(student)) is student
    assert default_feature_model(student) is student
    with pytest.raises(ValueError, match="every_n_steps"):
        KNNEvaluationCallback([], [], every_n_steps=0)


# ---- complete evaluations and recipes ----------------------------------------------------------------


def test_run_knn_eval_writes_json_and_table(
    fmnist: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_vit(layers=4).train()
    train_loader, test_loader = loaders({k: v[:500] for k, v in fmnist.items()})
    out = tmp_path / "knn.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k=200 on 500 train features is fine; no clipping here anyway
        results = run_knn_eval(
            model, train_loader, test_loader, ks=(10, 20), cache_dir=tmp_path / "cache", output_json=out, progress=False
        )
    assert model.training  # restored
    assert json.loads(out.read_text()) == results
    assert sorted((tmp_path / "cache").iterdir()) == [
        tmp_path / "cache" / "test-cls.safetensors",
        tmp_path / "cache" / "train-cls.safetensors",
    ]
    model.eval()
    direct = knn_accuracy(
        *extract_features(model, train_loader, progress=False),
        *extract_features(model, test_loader, progress=False),
        ks=(10, 20),
    )
    assert results["knn"] == {str(k): v for k, v in direct.items()}
    assert results["num_train"] == 500 and results["feature_dim"] == 32
    table = capsys.readouterr().out
    assert "top-1 (%)" in table and f"{direct[20]['top1']:.2f}" in table


def test_run_knn_eval_reports_the_k_the_memory_bank_could_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bank of 12 images cannot give k=20, 100 or 200: results, JSON, table and card say k=12."""
    model = tiny_vit(layers=2)
    train_x, test_x = torch.randn(12, 1, 28, 28), torch.randn(9, 1, 28, 28)
    train_y, test_y = torch.arange(12) % 3, torch.arange(9) % 3
    bank = DataLoader(TensorDataset(train_x, train_y), batch_size=5)
    queries = DataLoader(TensorDataset(test_x, test_y), batch_size=5)
    with pytest.warns(UserWarning, match="k=20, 100, 200 exceed the 12 train features"):
        results = run_knn_eval(model, bank, queries, output_json=tmp_path / "knn.json", progress=False)
    assert list(results["knn"]) == ["10", "12"]
    assert results["ks_requested"] == [10, 20, 100, 200]
    assert results["clipped_ks"] == {"20": 12, "100": 12, "200": 12}
    assert json.loads((tmp_path / "knn.json").read_text()) == results
    direct = knn_accuracy(
        *extract_features(model, bank, progress=False), *extract_features(model, queries, progress=False), ks=(10, 12)
    )
    assert results["knn"] == {str(k): score for k, score in direct.items()}
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["10", "12"]
    data_args = DataArguments(dataset_name="someone/images")
    assert [r.metric_name for r in card_records(results, data_args)] == ["k-NN top-1 (k=10)", "k-NN top-1 (k=12)"]
    # The monitor during training asks for k=20 and gets the 12-neighbour vote, the only one there is.
    monitor = KNNEvaluationCallback(bank, queries, k=20)
    with pytest.warns(UserWarning, match="k=20 exceeds the 12 train features"):
        assert monitor.evaluate(model) == direct[12]["top1"]


def test_run_linear_eval_fast_path(
    fmnist: dict[str, torch.Tensor], trained_vit: tuple[ViTModel, ViTModel], tmp_path: Path
) -> None:
    model = trained_vit[1]
    train_loader, test_loader = loaders({k: v[:500] for k, v in fmnist.items()})
    config = LinearProbeConfig(epochs=5, batch_size=50, lr_sweep=(1.0, 10.0), progress=False)
    results = run_linear_eval(
        model,
        train_loader,
        test_loader,
        kind="last4_cls",
        config=config,
        augment=False,
        cache_dir=tmp_path,
        output_json=tmp_path / "linear.json",
        print_table=False,
    )
    train = extract_features(model, train_loader, kind="last4_cls", progress=False)
    test = extract_features(model, test_loader, kind="last4_cls", progress=False)
    direct = train_linear_probe(*train, *test, config)
    assert results["top1"] == direct["top1"] and results["protocol"] == "linear"
    assert json.loads((tmp_path / "linear.json").read_text())["top1"] == direct["top1"]
    assert results["top1"] > 65.0 and results["lr"] == direct["lr"]


@pytest.fixture(scope="module")
def recipe_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fashion-MNIST shards (300 train / 100 test) and a saved tiny RGB ViT at 32 px with its image processor."""
    skip_without_real()
    from transformers import ViTImageProcessor

    from attndistill_hf.demo.fashion_mnist import prepare_fashion_mnist

    root = tmp_path_factory.mktemp("recipes")
    prepare_fashion_mnist(
        root / "data", max_train=300, max_test=100, num_train_shards=2, num_test_shards=1, progress=False
    )
    torch.manual_seed(0)
    model = tiny_vit(layers=4, channels=3, image=32, patch=8)
    model.save_pretrained(root / "model")
    ViTImageProcessor(image_mean=[MEAN] * 3, image_std=[STD] * 3, size={"height": 32, "width": 32}).save_pretrained(
        root / "model"
    )
    return {"data": root / "data", "model": root / "model", "root": root}


def manual_eval_features(setup: dict[str, Path], split: str, kind: str = "cls") -> tuple[torch.Tensor, torch.Tensor]:
    """Features computed by hand: datasets' decoded images -> the eval view -> the saved model."""
    from datasets import load_dataset

    from attndistill_hf.data import eval_transform

    model = ViTModel.from_pretrained(setup["model"]).eval()
    dataset = load_dataset(str(setup["data"]), split=split)
    view = eval_transform(32, [MEAN] * 3, [STD] * 3)
    pixels = torch.stack([view(item["image"].convert("RGB")) for item in dataset])
    with torch.no_grad():
        features = compute_features(model, pixels, kind)
    return features, torch.tensor(dataset["label"])


def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.mark.slow
def test_eval_knn_recipe_matches_manual_pipeline(recipe_setup: dict[str, Path], tmp_path: Path) -> None:
    recipe = load_recipe("eval_knn")
    config = tmp_path / "knn.yaml"
    config.write_text(
        f"model_name_or_path: {recipe_setup['model']}\ndataset_name: {recipe_setup['data']}\nimage_size: 32\n"
        "ks: [5, 200]\nnum_workers: 0\nbatch_size: 64\nprogress: false\n"
    )
    out = tmp_path / "knn.json"
    reset_accelerate_state()
    try:
        results = recipe.main([str(config), "--ks", "10", "20", "--output_json", str(out)])  # flags override the file
    finally:
        reset_accelerate_state()
    assert json.loads(out.read_text()) == results
    assert sorted(results["knn"], key=int) == ["10", "20"]
    assert results["num_train"] == 300 and results["num_test"] == 100 and results["kind"] == "cls"
    expected = knn_accuracy(
        *manual_eval_features(recipe_setup, "train"), *manual_eval_features(recipe_setup, "test"), ks=(10, 20)
    )
    for k in (10, 20):
        assert results["knn"][str(k)]["top1"] == pytest.approx(expected[k]["top1"])
        assert results["knn"][str(k)]["top5"] == pytest.approx(expected[k]["top5"])


@pytest.mark.slow
def test_eval_linear_recipe_fast_and_semi_supervised(recipe_setup: dict[str, Path], tmp_path: Path) -> None:
    recipe = load_recipe("eval_linear")
    common = [
        "--model_name_or_path",
        str(recipe_setup["model"]),
        "--dataset_name",
        str(recipe_setup["data"]),
        "--image_size",
        "32",
        "--num_workers",
        "0",
        "--batch_size",
        "50",
        "--no_progress",
    ]
    fast = recipe.main(
        [
            *common,
            "--no_augment",
            "--epochs",
            "5",
            "--lr",
            "0.5",
            "--feature_cache_dir",
            str(tmp_path / "cache"),
            "--output_json",
            str(tmp_path / "fast.json"),
        ]
    )
    train = manual_eval_features(recipe_setup, "train", "last4_cls")
    test = manual_eval_features(recipe_setup, "test", "last4_cls")
    direct = train_linear_probe(*train, *test, LinearProbeConfig(epochs=5, batch_size=50, lr=0.5, progress=False))
    assert fast["top1"] == pytest.approx(direct["top1"], abs=1.0 + 1e-9)  # one borderline test image at most
    assert fast["kind"] == "last4_cls" and fast["feature_dim"] == 128 and fast["num_classes"] == 10
    assert (tmp_path / "cache" / "train-last4_cls.safetensors").is_file()
    assert json.loads((tmp_path / "fast.json").read_text())["top1"] == fast["top1"]

    semi = recipe.main([*common, "--epochs", "1", "--label_fraction", "0.1", "--feature_kind", "cls"])
    assert semi["protocol"] == "semi-supervised" and semi["augment"] is True
    assert semi["num_train"] == 30 and semi["feature_dim"] == 32  # 10% of 300, 3 per class


@pytest.mark.slow
def test_eval_recipes_add_their_results_to_the_model_card(recipe_setup: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from huggingface_hub import ModelCard

    from attndistill_hf.hub import LossSettings, write_model_card

    folder = tmp_path / "student"
    shutil.copytree(recipe_setup["model"], folder)
    card_fields = {"teacher": "teacher", "dataset_name": "data", "dataset_split": "test", "recipe_text": ""}
    card_fields["loss"] = LossSettings(proj_weight=1.0, attn_weight=0.1, projector_widths=(32, 64, 32, 64, 48))
    write_model_card(
        folder,
        model_id_or_name="student",
        student_config=ViTModel.from_pretrained(folder).config.to_dict(),
        eval_results=[],
        training_summary={},
        figures={},
        **card_fields,
    )
    common = ["--model_name_or_path", str(folder), "--dataset_name", str(recipe_setup["data"]), "--image_size", "32"]
    common += ["--num_workers", "0", "--batch_size", "50", "--no_progress", "--add_to_card"]
    linear = load_recipe("eval_linear").main([*common, "--no_augment", "--epochs", "3", "--lr", "0.5"])
    reset_accelerate_state()
    try:
        knn = load_recipe("eval_knn").main([*common, "--ks", "20"])
    finally:
        reset_accelerate_state()
    results = {r.metric_name: r for r in ModelCard.load(folder / "README.md").data.eval_results}
    assert results["Linear probe top-1 (last4_cls)"].metric_value == pytest.approx(linear["top1"])
    assert results["k-NN top-1 (k=20)"].metric_value == pytest.approx(knn["knn"]["20"]["top1"])
    assert {(r.dataset_name, r.dataset_split) for r in results.values()} == {("data", "test")}

    # A folder without a card is refused before any evaluation runs.
    with pytest.raises(ValueError, match="--add_to_card needs a local model folder with a model card"):
        load_recipe("eval_linear").main([*common[:1], str(recipe_setup["model"]), *common[2:]])


def test_eval_recipes_help_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for name, fields in (
        (
            "eval_knn",
            (
                "--model_name_or_path",
                "--feature_kind",
                "--ks",
                "--temperature",
                "--output_json",
                "--feature_cache_dir",
                "--dataset_name",
                "--image_size",
            ),
        ),
        ("eval_linear", ("--epochs", "--base_lr", "--lr_sweep", "--label_fraction", "--no_augment", "--momentum")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            load_recipe(name).main(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for flag in fields:
            assert flag in text, (name, flag)
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        load_recipe("eval_knn").main(["--dataset_name", "x"])
    with pytest.raises(ValueError, match="Unknown feature kind"):
        load_recipe("eval_knn").main(["--model_name_or_path", "m", "--feature_kind", "pooled"])


# ---- the recipes on image folders (no download) -------------------------------------------------------


@pytest.fixture(scope="module")
def folder_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Class folders (12 train / 6 val images), a saved 32 px ViT with its image processor, and a tiny CNN."""
    from transformers import ResNetConfig, ResNetModel, ViTImageProcessor

    root = tmp_path_factory.mktemp("folders")
    write_image_folder(root / "train", per_class=4, classes=3)
    write_image_folder(root / "val", per_class=2, classes=3)
    torch.manual_seed(0)
    tiny_vit(layers=4, channels=3, image=32, patch=8).save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(root / "resnet")
    return {"root": root, "model": root / "model", "resnet": root / "resnet"}


def folder_flags(setup: dict[str, Path], model: Path | None = None) -> list[str]:
    data = ["--train_dir", str(setup["root"] / "train"), "--eval_dir", str(setup["root"] / "val")]
    return ["--model_name_or_path", str(model or setup["model"]), *data, "--num_workers", "0", "--no_progress"]


def run_knn_recipe(argv: list[str]) -> dict[str, Any]:
    reset_accelerate_state()
    try:
        return load_recipe("eval_knn").main(argv)
    finally:
        reset_accelerate_state()


@pytest.mark.slow
def test_eval_recipes_default_to_the_models_image_size(folder_setup: dict[str, Path]) -> None:
    """Without --image_size a 32 px model is evaluated at 32 px, exactly as with --image_size 32."""
    flags = folder_flags(folder_setup)
    default, explicit = (
        run_knn_recipe([*flags, "--ks", "5"]),
        run_knn_recipe([*flags, "--ks", "5", "--image_size", "32"]),
    )
    assert default["data"]["image_size"] == 32
    assert default["knn"] == explicit["knn"]
    probe = [*flags, "--no_augment", "--epochs", "2", "--lr", "0.5", "--batch_size", "6"]
    linear = load_recipe("eval_linear")
    default, explicit = linear.main(probe), linear.main([*probe, "--image_size", "32"])
    assert default["data"]["image_size"] == 32
    assert default["per_lr"] == explicit["per_lr"]


@pytest.mark.slow
def test_eval_recipes_card_rows_name_the_k_used_and_the_evaluation_subset(
    folder_setup: dict[str, Path], tmp_path: Path
) -> None:
    """A 12-image bank with the default ks and 3 of the 6 val images: the card claims neither more neighbours
    nor more queries than were used."""
    import shutil

    from huggingface_hub import ModelCard

    from attndistill_hf.hub import LossSettings, write_model_card

    folder = tmp_path / "student"
    shutil.copytree(folder_setup["model"], folder)
    write_model_card(
        folder,
        model_id_or_name="student",
        teacher="teacher",
        student_config=ViTModel.from_pretrained(folder).config.to_dict(),
        dataset_name="train",
        dataset_split="val",
        eval_results=[],
        recipe_text="",
        training_summary={},
        figures={},
        loss=LossSettings(proj_weight=1.0, attn_weight=0.1, projector_widths=(32, 64, 32, 64, 48)),
    )
    flags = [*folder_flags(folder_setup, folder), "--max_eval_samples", "3", "--add_to_card"]
    with pytest.warns(UserWarning, match="k=20, 100, 200 exceed the 12 train features"):
        knn = run_knn_recipe(flags)
    assert (knn["num_train"], knn["num_test"], list(knn["knn"])) == (12, 3, ["10", "12"])
    linear = load_recipe("eval_linear").main([*flags, "--no_augment", "--epochs", "2", "--lr", "0.5"])
    assert linear["num_test"] == 3
    card = ModelCard.load(folder / "README.md")
    rows = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert rows == {
        "k-NN top-1 (k=10), evaluated on 3 of 6 val images": pytest.approx(knn["knn"]["10"]["top1"]),
        "k-NN top-1 (k=12), evaluated on 3 of 6 val images": pytest.approx(knn["knn"]["12"]["top1"]),
        "Linear probe top-1 (last4_cls), evaluated on 3 of 6 val images": pytest.approx(linear["top1"]),
    }
    assert "k=20" not in card.content and "k=200" not in card.content


def recipe_error(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``python recipes/<name>.py ARGV`` in this process: it must stop with exit status 2 and one ``error:``
    line on stderr, which is returned."""
    from attndistill_hf.cli import run_recipe

    recipe = load_recipe(name)
    reset_accelerate_state()
    try:
        with pytest.raises(SystemExit) as stopped:
            run_recipe(lambda: recipe.main(argv))
    finally:
        reset_accelerate_state()
    assert stopped.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize("name", ["eval_knn", "eval_linear"])
def test_eval_recipes_refuse_a_cnn_as_not_a_vit_family_encoder(
    name: str, folder_setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    line = recipe_error(name, folder_flags(folder_setup, folder_setup["resnet"]), capsys)
    assert line.startswith("error: Unsupported model: ResNetModel is not supported: it is not a ViT-family encoder")
    assert "scaled_dot_product_attention" not in line and "attn_implementation" not in line


def test_a_label_column_of_images_is_named_not_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Parquet shards whose image column holds the PNG bytes: --label_column image names the column and its
    type, and prints none of the bytes."""
    import datasets
    from transformers import ViTImageProcessor

    images = write_image_folder(tmp_path / "images", per_class=2, classes=2)
    files = sorted(images.rglob("*.png"))
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
            "label": [int(f.parent.name[-1]) for f in files],
        }
    )
    (tmp_path / "shards").mkdir()
    for split in ("train", "test"):
        table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "shards" / f"{split}.parquet"))
    tiny_vit(layers=1, channels=3, image=32, patch=8).save_pretrained(tmp_path / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "shards")]
    line = recipe_error("eval_knn", [*argv, "--num_workers", "0", "--no_progress", "--label_column", "image"], capsys)
    assert line == "error: Label column 'image' holds dict values, not class indices."
