"""Model cards that parse and carry the measured numbers; pushes that call the Hub right and fail safely."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoImageProcessor, AutoModel, ViTImageProcessor, ViTModel

from attndistill_hf import hub
from attndistill_hf.evaluation import LinearProbeConfig, train_linear_probe
from attndistill_hf.figures import plot_attention_maps, plot_training_curves
from attndistill_hf.hub import (
    CARD_TAGS,
    DEFAULT_IGNORE_PATTERNS,
    EvalRecord,
    HubPushError,
    LossSettings,
    add_eval_records,
    build_model_card,
    model_class_name,
    push_output_dir,
    records_from_results,
    redact,
    write_model_card,
)

from helpers import distill_command, tiny_student, tiny_teacher, write_image_folder

FAKE_TOKEN = "hf_" + "Zq8" * 12  # token-shaped, never valid
TEACHER = "facebook/dino-vits16"
# The published loss (both terms, weights 1 / 0.1, MSE, T = 10); the projector of a 32-wide student, 384-wide teacher.
PUBLISHED_LOSS = LossSettings(proj_weight=1.0, attn_weight=0.1, projector_widths=(32, 64, 32, 64, 384))


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int) -> float:
    """Weighted cosine k-NN top-1 in percent (DINO's vote, T = 0.07), as the evaluation computes it."""
    sims = torch.nn.functional.normalize(test_x, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(test_x), int(train_y.max()) + 1).scatter_add_(1, train_y[idx], (top / 0.07).exp())
    return float((votes.argmax(1) == test_y).float().mean() * 100)


def measured_records() -> list[EvalRecord]:
    """k-NN results on random, class-structured features: numbers no test could hard-code."""
    centres = torch.randn(5, 16)
    train_y, test_y = torch.randint(0, 5, (200,)), torch.randint(0, 5, (60,))
    train_x = centres[train_y] + 1.5 * torch.randn(200, 16)
    test_x = centres[test_y] + 1.5 * torch.randn(60, 16)
    return [
        EvalRecord(
            f"k-NN top-1 (k={k})", knn_top1(train_x, train_y, test_x, test_y, k), "ILSVRC/imagenet-1k", "validation"
        )
        for k in (10, 20)
    ]


def card_kwargs(records: list[EvalRecord], figures: dict[str, str], **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model_id_or_name": "someone/vit-tiny-attndistill",
        "teacher": TEACHER,
        "student_config": tiny_student().config.to_dict(),
        "dataset_name": "ILSVRC/imagenet-1k",
        "dataset_split": "train",
        "eval_results": records,
        "recipe_text": f"teacher: {TEACHER}\nstudent: vit-tiny-patch16\nhub_token: {FAKE_TOKEN}\nw_attn: 0.1\n",
        "training_summary": {
            "steps": 1234,
            "epochs": 3.5,
            "effective_batch_size": 4096,
            "skipped_images": 2,
            "nonfinite_steps": 1,
            "hardware": "1x accelerator",
            "wall_time_s": 3725.4,
        },
        "figures": figures,
        "extra_tags": ("demo", "vit"),
        "limitations": "Trained for a few steps on a tiny demo subset: not a useful feature extractor.",
        "loss": PUBLISHED_LOSS,
    }
    kwargs.update(overrides)
    return kwargs


def make_figures(folder: Path) -> dict[str, str]:
    history = [{"step": s, "loss": 1.0 / s, "loss_proj": 0.8 / s, "loss_attn": 0.2 / s} for s in range(1, 8)]
    plot_training_curves(history, folder / "figures" / "curves.png")
    maps = torch.rand(2, 2, 17).softmax(-1)
    plot_attention_maps(torch.rand(2, 3, 32, 32), maps, maps, (4, 4), (4, 4), folder / "figures" / "attention.png")
    return {"Training curves": "figures/curves.png", "Teacher vs student CLS attention": "figures/attention.png"}


def test_redact_masks_given_and_token_shaped_secrets() -> None:
    assert redact(f"Bearer {FAKE_TOKEN} failed", None) == "Bearer <redacted> failed"
    assert redact("auth with abc-123 failed", "abc-123") == "auth with <redacted> failed"
    assert redact("hub_token: s3cr3t\nnum_prefix_tokens: 1\npad_token_id: 0") == (
        "hub_token: <redacted>\nnum_prefix_tokens: 1\npad_token_id: 0"
    )
    assert redact("hub_token: null") == "hub_token: null"


def test_card_parses_and_carries_the_measured_numbers(tmp_path: Path) -> None:
    records = measured_records()
    figures = make_figures(tmp_path)
    path = write_model_card(tmp_path, **card_kwargs(records, figures))
    assert path == tmp_path / "README.md"

    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0"
    assert data.base_model == TEACHER
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    assert data.tags == [*CARD_TAGS, "demo"]  # de-duplicated, library tags first
    assert data.model_name == "someone/vit-tiny-attndistill"

    loaded = data.eval_results
    assert [r.metric_value for r in loaded] == [r.value for r in records]
    assert [r.metric_name for r in loaded] == [r.metric_name for r in records]
    assert {(r.metric_type, r.task_type, r.dataset_type, r.dataset_split) for r in loaded} == {
        ("accuracy", "image-classification", "ILSVRC/imagenet-1k", "validation")
    }

    text = card.text
    # The results table shows the same numbers as the metadata.
    for r in records:
        assert f"| {r.metric_name} | ILSVRC/imagenet-1k | validation | accuracy | {r.value:.2f} |" in text
    for caption, rel in figures.items():
        assert f"![{caption}]({rel})" in text
        assert (tmp_path / rel).is_file()
    assert "```yaml\nteacher: facebook/dino-vits16\nstudent: vit-tiny-patch16\nhub_token: <redacted>\n" in text
    assert "| Optimizer steps | 1,234 |" in text
    assert "| Effective batch size | 4,096 |" in text
    assert "| Wall time | 1:02:05 (h:mm:ss) |" in text
    assert "| Steps skipped (non-finite student output) | 1 |" in text
    assert 'AutoModel.from_pretrained("someone/vit-tiny-attndistill")' in text
    assert "last_hidden_state[:, 0]" in text
    assert "tiny demo subset" in text
    assert "arXiv" in text and "2210.00944" in text and "van de Weijer, Joost" in text
    assert FAKE_TOKEN not in path.read_text()


def test_card_without_evaluations_or_hub_teacher_stays_truthful(tmp_path: Path) -> None:
    local_teacher = tmp_path / "teachers" / "my-mugs-vits16"
    local_teacher.mkdir(parents=True)
    card = build_model_card(
        **card_kwargs([], {}, teacher=str(local_teacher), model_id_or_name=str(tmp_path / "out" / "student"))
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.eval_results is None
    assert loaded.data.base_model is None  # a local path is no Hub model
    assert "No evaluation was run" in loaded.text
    assert "my-mugs-vits16" in loaded.text
    assert str(tmp_path) not in str(loaded)  # no local path is published


def test_card_publishes_local_paths_by_their_last_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "demo-teacher").mkdir(parents=True)
    recipe = (
        "teacher_name_or_path: outputs/demo-teacher  # the demo teacher\n"
        f"output_dir: {tmp_path}/runs/first\n"
        "data_files: [data/fashion_mnist/train-*.parquet]\n"
        "# base model: facebook/dino-vits16, see https://github.com/facebookresearch/dino\n"
        "# command-line overrides\n"
        f"--train_dir '{tmp_path}/my images/train' --eval_dir=~/val --output_dir {tmp_path}/runs/second/\n"
    )
    local = tmp_path / "data"
    card = build_model_card(
        **card_kwargs([], {}, recipe_text=recipe, teacher="outputs/demo-teacher", dataset_name=str(local)),
        hub_dataset=False,
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert str(tmp_path) not in loaded.content and "~/" not in loaded.content
    block = loaded.text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (
        "teacher_name_or_path: demo-teacher  # the demo teacher\n"
        "output_dir: first\n"
        "data_files: [train-*.parquet]\n"
        "# base model: facebook/dino-vits16, see https://github.com/facebookresearch/dino\n"
        "# command-line overrides\n"
        "--train_dir 'train' --eval_dir=val --output_dir second\n"
    )
    assert loaded.data.datasets is None  # a local folder is named in the text only
    assert "on `data` images" in loaded.text
    # A Hub dataset id is listed; a local path given as a Hub dataset still is not.
    assert build_model_card(**card_kwargs([], {})).data.datasets == ["ILSVRC/imagenet-1k"]
    assert build_model_card(**card_kwargs([], {}, dataset_name=str(local))).data.datasets is None
    # Results added later still replace the card's "no evaluation" limitations.
    add_eval_records(tmp_path, measured_records())
    assert "No evaluation was run" not in ModelCard.load(tmp_path / "README.md").text


def linear_results(epochs: int = 6) -> dict[str, Any]:
    """A real probe's report on noisy class-structured features, shaped like run_linear_eval's JSON."""
    centres = torch.randn(4, 12)
    train_y, test_y = torch.randint(0, 4, (160,)), torch.randint(0, 4, (80,))
    train_x, test_x = centres[train_y] + 2.0 * torch.randn(160, 12), centres[test_y] + 2.0 * torch.randn(80, 12)
    config = LinearProbeConfig(epochs=epochs, batch_size=32, base_lr=2.0, progress=False)
    report = train_linear_probe(train_x, train_y, test_x, test_y, config)
    return {"protocol": "linear", "kind": "last4_cls", **report}


def table_rows(text: str) -> list[list[str]]:
    """The rows of the card's results table, as cells."""
    section = text.split("## Results\n", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()[3:] if line]


def test_results_become_card_records() -> None:
    knn = {"protocol": "knn", "knn": {"10": {"top1": 61.25, "top5": 90.0}, "20": {"top1": 62.5, "top5": 91.0}}}
    assert [(r.metric_name, r.value) for r in records_from_results(knn, "data", "test")] == [
        ("k-NN top-1 (k=10)", 61.25),
        ("k-NN top-1 (k=20)", 62.5),
    ]
    linear = linear_results()
    at_epoch_3 = {**linear, "best_epoch": {**linear["best_epoch"], "epoch": 3, "top1": linear["top1"] + 2.5}}
    assert [(r.metric_name, r.value) for r in records_from_results(at_epoch_3, "data", "test")] == [
        ("Linear probe top-1 (last4_cls)", linear["top1"]),
        ("Linear probe top-1 (last4_cls, best of the scored epochs)", linear["top1"] + 2.5),
    ]
    at_the_end = {**linear, "best_epoch": {**linear["best_epoch"], "epoch": linear["epochs"]}}
    assert len(records_from_results(at_the_end, "data", "test")) == 1  # the best epoch is the final one
    semi = {**linear, "protocol": "semi-supervised", "label_fraction": 0.01, "best_epoch": {"epoch": 6, "top1": 1.0}}
    assert [r.metric_name for r in records_from_results(semi, "data", "test")] == [
        "Linear probe top-1 (last4_cls, 1% labels)"
    ]
    with pytest.raises(ValueError, match="protocol"):
        records_from_results({"protocol": "finetune"}, "data", "test")


def test_added_results_reach_model_index_and_table_once(tmp_path: Path) -> None:
    knn_records = measured_records()
    write_model_card(tmp_path, **card_kwargs(knn_records, make_figures(tmp_path)))
    linear = records_from_results(linear_results(), "ILSVRC/imagenet-1k", "validation")
    add_eval_records(tmp_path, linear)
    # Re-running an evaluation replaces its record: k=20 measured again, the linear probe added again.
    remeasured = EvalRecord("k-NN top-1 (k=20)", knn_records[1].value + 1.5, "ILSVRC/imagenet-1k", "validation")
    add_eval_records(tmp_path, [remeasured, *linear])

    card = ModelCard.load(tmp_path / "README.md")
    expected = [knn_records[0], remeasured, *linear]  # a re-measured result keeps its place
    assert [EvalRecord.from_eval_result(r) for r in card.data.eval_results] == expected
    assert table_rows(card.text) == [
        [r.metric_name, "ILSVRC/imagenet-1k", "validation", "accuracy", f"{r.value:.2f}"] for r in expected
    ]
    assert "## Limitations" in card.text and card.text.count("## Results") == 1
    assert FAKE_TOKEN not in card.content  # the recipe's token stays redacted after the rewrite


def test_results_added_to_a_card_without_evaluations_update_its_limitations(tmp_path: Path) -> None:
    write_model_card(tmp_path, **card_kwargs([], {}))
    add_eval_records(tmp_path, records_from_results(linear_results(), "ILSVRC/imagenet-1k", "validation"))
    card = ModelCard.load(tmp_path / "README.md")
    assert "No evaluation was run" not in card.text
    assert "measurements of frozen features" in card.text
    assert f"{card.data.eval_results[0].metric_value:.2f}" == table_rows(card.text)[0][-1]
    with pytest.raises(FileNotFoundError, match="No model card"):
        add_eval_records(tmp_path / "elsewhere", [])


def test_card_refuses_missing_or_escaping_figures(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"curves\.png"):
        write_model_card(tmp_path, **card_kwargs([], {"Training curves": "curves.png"}))
    assert not (tmp_path / "README.md").exists()
    with pytest.raises(ValueError, match="relative"):
        build_model_card(**card_kwargs([], {"x": "../elsewhere.png"}))


def test_output_folder_loads_with_plain_transformers(tmp_path: Path) -> None:
    student = tiny_student()
    student.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    write_model_card(tmp_path, **card_kwargs(measured_records(), make_figures(tmp_path)))

    model = AutoModel.from_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(model) is ViTModel
    assert processor.size == {"height": 32, "width": 32}
    pixels = processor(images=[torch.rand(3, 40, 40)], return_tensors="pt", do_rescale=False)["pixel_values"]
    with torch.no_grad():
        expected = student.eval()(pixels).last_hidden_state[:, 0]
        got = model.eval()(pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(got, expected)


class RecordingApi:
    """Stands in for ``HfApi``: records the calls a push makes, optionally failing on upload."""

    instances: ClassVar[list[RecordingApi]] = []
    fail_with: ClassVar[Exception | None] = None

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        RecordingApi.instances.append(self)

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("upload_folder", args, kwargs))
        if RecordingApi.fail_with is not None:
            raise RecordingApi.fail_with


@pytest.fixture
def recording_api(monkeypatch: pytest.MonkeyPatch) -> type[RecordingApi]:
    RecordingApi.instances = []
    RecordingApi.fail_with = None
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    return RecordingApi


def output_folder(root: Path) -> Path:
    folder = root / "run"
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old weights")
    (folder / "figures").mkdir()
    (folder / "figures" / "curves.png").write_bytes(b"png")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        (folder / name).write_text(name)
    (folder / "training_args.bin").write_bytes(b"pickled args with a token")
    (folder / "projector.pt").write_bytes(b"training-time head")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_creates_repo_then_uploads_the_folder(tmp_path: Path, recording_api: type[RecordingApi]) -> None:
    folder = output_folder(tmp_path)
    url = push_output_dir(folder, "someone/student", private=True, token=FAKE_TOKEN, commit_message="v1")
    assert url == "https://huggingface.co/someone/student"
    (api,) = recording_api.instances
    assert api.token == FAKE_TOKEN
    (create_name, create_args, create_kwargs), (upload_name, upload_args, upload_kwargs) = api.calls
    assert (create_name, create_args) == ("create_repo", ("someone/student",))
    assert create_kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert upload_name == "upload_folder" and upload_args == ()
    assert upload_kwargs["repo_id"] == "someone/student"
    assert Path(upload_kwargs["folder_path"]) == folder.resolve()
    assert upload_kwargs["repo_type"] == "model"
    assert upload_kwargs["commit_message"] == "v1"
    # The patterns keep exactly the publishable files of a real output folder.
    uploaded = set(filter_repo_objects(list(snapshot(folder)), ignore_patterns=upload_kwargs["ignore_patterns"]))
    assert uploaded == {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "figures/curves.png",
    }

    push_output_dir(folder, "someone/student")  # default: public, standard login
    assert recording_api.instances[-1].token is None
    assert recording_api.instances[-1].calls[0][2]["private"] is False


def test_failed_push_keeps_folder_and_hides_the_token(
    tmp_path: Path, recording_api: type[RecordingApi], caplog: pytest.LogCaptureFixture
) -> None:
    folder = output_folder(tmp_path)
    before = snapshot(folder)
    recording_api.fail_with = ConnectionError(f"401 Unauthorized for token {FAKE_TOKEN} at https://huggingface.co")
    with caplog.at_level(logging.DEBUG), pytest.raises(HubPushError) as excinfo:
        push_output_dir(folder, "someone/student", private=True, token=FAKE_TOKEN)
    err = excinfo.value
    message = str(err)
    assert "401 Unauthorized" in message and "<redacted>" in message
    assert f"intact at {folder.resolve()}" in message
    assert f"hf upload someone/student {folder.resolve()} . --private" in message
    assert "push_output_dir(" in message
    assert err.local_dir == folder.resolve() and err.repo_id == "someone/student"
    rendered = "".join(traceback.format_exception(err))
    assert FAKE_TOKEN not in rendered and FAKE_TOKEN not in repr(err)
    assert err.__cause__ is None and err.__suppress_context__
    assert FAKE_TOKEN not in caplog.text
    assert snapshot(folder) == before


def test_push_offline_fails_with_retry_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real client, refused before any request
    folder = output_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(HubPushError, match="hf upload someone/student") as excinfo:
        push_output_dir(folder, "someone/student", token=FAKE_TOKEN)
    assert FAKE_TOKEN not in "".join(traceback.format_exception(excinfo.value))
    assert snapshot(folder) == before


def test_push_of_a_missing_folder_is_a_local_error(tmp_path: Path, recording_api: type[RecordingApi]) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push_output_dir(tmp_path / "nope", "someone/student")
    assert recording_api.instances == []
    assert "checkpoint-*" in DEFAULT_IGNORE_PATTERNS


def test_the_card_names_the_students_class_as_saved_or_from_its_model_type() -> None:
    assert model_class_name({"model_type": "dinov3_vit"}) == "DINOv3ViTModel"
    assert model_class_name({"model_type": "vit"}) == "ViTModel"
    assert model_class_name({"model_type": "vit", "architectures": ["ViTForImageClassification"]}) == (
        "ViTForImageClassification"
    )


def card_section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def test_the_card_describes_the_loss_this_student_was_trained_with() -> None:
    both = build_model_card(**card_kwargs([], {}))
    assert card_section(both.text, "Distillation loss") == (
        "This student was trained with both AttnDistill terms, `L = 1 × L_proj + 0.1 × L_attn`, on its last "
        "block:\n\n"
        "- `L_proj`: the mean squared error between the teacher's normalised CLS feature and the student's "
        "last-block CLS token (before its final LayerNorm) passed through a projector: LayerNorm, linear layers "
        "32 → 64 → 32 → 64 → 384 with GELU between them, LayerNorm.\n"
        "- `L_attn`: KL(teacher ‖ student) of the last block's CLS-query attention maps, each clamped to "
        "[1e-05, 0.996] and renormalised; where the patch grids differ the teacher's maps are resized to the "
        "student's grid (bicubic), and where the head counts differ both sides' heads are fused as "
        "softmax(Σ_h log a_h / T) with T = 10."
    )
    assert "The projector used during training is not part of this model." in both.text

    attention_only = LossSettings(proj_weight=0.0, attn_weight=0.5, fusion_temperature=4.0, projector_widths=(32, 384))
    text = build_model_card(**card_kwargs([], {}, loss=attention_only)).text
    section = card_section(text, "Distillation loss")
    assert section.startswith(
        "This student was trained with the attention-guidance term alone, `L = 0.5 × L_attn`, on its last block; "
        "the projector term was off (weight 0), so no projector was trained:"
    )
    assert "T = 4." in section and "L_proj`:" not in section
    assert "MSE" not in text and "mean squared error" not in text and "projector used during training" not in text

    projector_only = LossSettings(
        proj_weight=2.0, attn_weight=0.0, projector_loss="cosine", projector_widths=(32, 64, 384)
    )
    section = card_section(build_model_card(**card_kwargs([], {}, loss=projector_only)).text, "Distillation loss")
    assert section.startswith(
        "This student was trained with the projector term alone, `L = 2 × L_proj`, on its last block; the "
        "attention-guidance term was off (weight 0):"
    )
    assert "the cosine distance 2 − 2 cos between" in section and "32 → 64 → 384" in section
    assert "KL" not in section and "L_attn`:" not in section


@pytest.mark.slow
def test_each_student_of_a_run_gets_the_card_of_its_own_loss(tmp_path: Path) -> None:
    """Three students with their own loss settings in one run: each card states its own loss, and the run's
    flags fill in what an entry leaves out (here attn_loss_weight 0.3)."""
    tiny_teacher(tmp_path / "teacher")  # 48 wide
    config = tmp_path / "run.yaml"
    config.write_text(
        "students:\n"
        "  - {name: both, student_preset: vit-mini-patch4}\n"
        "  - {name: attn, student_preset: vit-mini-2heads-patch4, proj_loss_weight: 0.0, fusion_temperature: 4.0}\n"
        "  - {name: proj, student_preset: vit-mini-patch4, attn_loss_weight: 0.0, projector_loss: cosine}\n"
    )
    distill_command(
        [str(config), "--teacher_name_or_path", str(tmp_path / "teacher"), "--image_size", "32", "--use_cpu", "true"]
        + ["--train_dir", str(write_image_folder(tmp_path / "images", per_class=2)), "--max_steps", "1"]
        + ["--per_device_train_batch_size", "2", "--attn_loss_weight", "0.3", "--final_knn_eval", "false"]
        + ["--attention_figure_images", "0", "--report_to", "none", "--output_dir", str(tmp_path / "out")]
    )
    cards = {name: (tmp_path / "out" / name / "README.md").read_text() for name in ("both", "attn", "proj")}
    # Neither single-term student is described with the term it was trained without.
    assert "MSE" not in cards["attn"] and "mean squared error" not in cards["attn"]
    assert "KL" not in cards["proj"]
    sections = {name: card_section(card, "Distillation loss") for name, card in cards.items()}
    assert "`L = 1 × L_proj + 0.3 × L_attn`" in sections["both"]
    assert "mean squared error" in sections["both"] and "T = 10." in sections["both"]
    assert "64 → 128 → 64 → 128 → 48 with GELU" in sections["both"]  # the mini student's projector
    assert "`L = 0.3 × L_attn`" in sections["attn"] and "T = 4." in sections["attn"]
    assert "L_proj`:" not in sections["attn"] and "no projector was trained" in sections["attn"]
    assert "`L = 1 × L_proj`" in sections["proj"] and "cosine distance" in sections["proj"]
