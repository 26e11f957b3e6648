"""Publishing a distilled student: a truthful model card and a push that never loses local work.

The card is written with huggingface_hub's ``ModelCard`` / ``ModelCardData`` / ``EvalResult`` rather
than ``Trainer.create_model_card``: the latter infers no task for a ``ViTModel`` and drops metric names
it does not know, so k-NN and linear-probe results would never reach ``model-index``. Every number in
the card comes from the arguments (the metadata and the results table are rendered from the same
records), and anything that could carry a Hub token is passed through :func:`redact`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from .losses import (
    DEFAULT_CLAMP,
    DEFAULT_FUSION_TEMPERATURE,
    DEFAULT_PROJECTOR_LOSS,
    AttnDistillLoss,
)

logger = logging.getLogger(__name__)

CARD_TAGS: tuple[str, ...] = ("attndistill", "knowledge-distillation", "vit")
REDACTED = "<redacted>"

# Files in a training output folder that do not belong in a model repo: intermediate checkpoints,
# optimizer / scheduler / RNG state, and the pickled TrainingArguments (which can hold `hub_token`).
# The patterns are fnmatch-style on paths relative to the folder, where `*` also crosses `/`.
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*",
    "*/checkpoint-*",
    "*.pt",
    "*.pth",
    "training_args.bin",
    "runs/*",
    "__pycache__/*",
)

CITATION_BIBTEX = """@inproceedings{wang2022attention,
  title         = {Attention Distillation: self-supervised vision transformer students need more guidance},
  author        = {Wang, Kai and Yang, Fei and van de Weijer, Joost},
  booktitle     = {British Machine Vision Conference (BMVC)},
  year          = {2022},
  eprint        = {2210.00944},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV}
}"""

# Hub user access tokens ("hf_" + 34 letters/digits today); matched loosely so that older or future
# lengths are caught too. Redaction by pattern covers tokens that reach a message without the caller
# knowing them (a token in an environment variable, a URL, a config file).
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
# `key: value` / `key = value` / `"key": "value"` settings whose key names a credential (`hub_token`,
# `token`, `*secret*`, `*password*`); keys such as `num_prefix_tokens` or `pad_token_id` are left alone.
_SECRET_KEY_PATTERN = re.compile(
    r"""(?P<key>(?<![\w.-])["']?(?:(?:hub|hf|auth|api|access)_)?(?:token|[\w.-]*(?:secret|password)[\w.-]*)"""
    r"""["']?\s*[:=]\s*)(?P<value>[^\s,#}]+)""",
    re.IGNORECASE,
)
# The same credentials as command-line flags: `--hub_token VALUE` or `--hub_token=VALUE`.
_SECRET_FLAG_PATTERN = re.compile(
    r"(?P<key>--(?:[\w-]*_)?(?:token|[\w-]*(?:secret|password)[\w-]*)(?:=|\s+))(?P<value>(?!--)[^\s]+)",
    re.IGNORECASE,
)

_SUMMARY_LABELS: dict[str, str] = {
    "steps": "Optimizer steps",
    "epochs": "Epochs",
    "effective_batch_size": "Effective batch size",
    "skipped_images": "Images skipped (unreadable)",
    "nonfinite_steps": "Steps skipped (non-finite student output)",
    "hardware": "Hardware",
    "wall_time_s": "Wall time",
}


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local output folder is untouched and the message says how to retry."""

    def __init__(self, message: str, *, local_dir: Path, repo_id: str) -> None:
        super().__init__(message)
        self.local_dir = local_dir
        self.repo_id = repo_id


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation result, rendered both into ``model-index`` metadata and the card's results table.

    ``value`` is in percent (e.g. 71.4 for 71.4 % top-1). ``metric_name`` says which evaluation it is
    (e.g. "k-NN top-1 (k=20)"). ``dataset_type`` is the Hub dataset id that the Hub links to; it
    defaults to ``dataset_name``.
    """

    metric_name: str
    value: float
    dataset_name: str
    dataset_split: str
    metric_type: str = "accuracy"
    task_type: str = "image-classification"
    dataset_type: str | None = None
    dataset_config: str | None = None

    def to_eval_result(self) -> EvalResult:
        """The huggingface_hub ``EvalResult`` of this record.

        ``model-index`` groups results by task type and dataset and keeps one task name per group, so
        the task name is derived from the task type and the evaluation is told apart by ``metric_name``:
        that way a card read back with ``ModelCard.load`` gives exactly the results written.
        """
        return EvalResult(
            task_type=self.task_type,
            task_name=self.task_type.replace("-", " ").capitalize(),
            # A local data folder is published by its name only, never by its path.
            dataset_type=public_name(self.dataset_type or self.dataset_name),
            dataset_name=public_name(self.dataset_name),
            dataset_config=self.dataset_config,
            dataset_split=self.dataset_split,
            metric_type=self.metric_type,
            metric_name=self.metric_name,
            metric_value=float(self.value),
        )

    @classmethod
    def from_eval_result(cls, result: EvalResult) -> EvalRecord:
        """The record of a ``model-index`` entry read back from a card (inverse of :meth:`to_eval_result`)."""
        return cls(
            metric_name=result.metric_name or result.metric_type,
            value=float(result.metric_value),
            dataset_name=result.dataset_name,
            dataset_split=result.dataset_split or "",
            metric_type=result.metric_type,
            task_type=result.task_type,
            # to_eval_result fills dataset_type with the dataset name when it was not given.
            dataset_type=None if result.dataset_type == result.dataset_name else result.dataset_type,
            dataset_config=result.dataset_config,
        )


@dataclass(frozen=True)
class LossSettings:
    """The loss one student was trained with, as its model card describes it.

    ``proj_weight`` / ``attn_weight`` weigh the projector and attention-guidance terms (0: the term was
    off); ``projector_loss`` is the projector distance ("mse" or "cosine"); ``projector_widths`` are the
    widths of the projector's linear layers, input first (student width ... teacher width);
    ``fusion_temperature`` is T of the head fusion; ``clamp`` bounds the attention maps before the KL.
    Defaults are the published recipe's. :meth:`of` reads them from a trained ``AttnDistillLoss``.
    """

    proj_weight: float
    attn_weight: float
    projector_widths: tuple[int, ...]
    projector_loss: str = DEFAULT_PROJECTOR_LOSS
    fusion_temperature: float = DEFAULT_FUSION_TEMPERATURE
    clamp: tuple[float, float] = DEFAULT_CLAMP

    @classmethod
    def of(cls, loss: AttnDistillLoss) -> LossSettings:
        """The settings of a student's loss (``trainer.members[name].loss_fn``)."""
        linears = [layer for layer in loss.projector.layers if hasattr(layer, "in_features")]
        return cls(
            proj_weight=float(loss.proj_weight),
            attn_weight=float(loss.attn_weight),
            projector_widths=(*(layer.in_features for layer in linears), linears[-1].out_features),
            projector_loss=loss.projector_loss,
            fusion_temperature=float(loss.fusion_temperature),
            clamp=(float(loss.clamp[0]), float(loss.clamp[1])),
        )

    def describe(self) -> str:
        """Markdown: the loss formula with its weights, then one bullet per term that was on."""
        terms = [(self.proj_weight, "L_proj"), (self.attn_weight, "L_attn")]
        formula = " + ".join(f"{weight:g} × {name}" for weight, name in terms if weight)
        if self.proj_weight and self.attn_weight:
            opening = f"This student was trained with both AttnDistill terms, `L = {formula}`, on its last block:"
        elif self.attn_weight:
            opening = (
                f"This student was trained with the attention-guidance term alone, `L = {formula}`, on its last "
                "block; the projector term was off (weight 0), so no projector was trained:"
            )
        else:
            opening = (
                f"This student was trained with the projector term alone, `L = {formula}`, on its last block; "
                "the attention-guidance term was off (weight 0):"
            )
        bullets = []
        if self.proj_weight:
            distance = {"mse": "the mean squared error", "cosine": "the cosine distance 2 − 2 cos"}[self.projector_loss]
            widths = " → ".join(str(width) for width in self.projector_widths)
            bullets.append(
                f"- `L_proj`: {distance} between the teacher's normalised CLS feature and the student's last-block "
                "CLS token (before its final LayerNorm) passed through a projector: LayerNorm, linear layers "
                f"{widths} with GELU between them, LayerNorm."
            )
        if self.attn_weight:
            bullets.append(
                "- `L_attn`: KL(teacher ‖ student) of the last block's CLS-query attention maps, each clamped to "
                f"[{self.clamp[0]:g}, {self.clamp[1]:g}] and renormalised; where the patch grids differ the "
                "teacher's maps are resized to the student's grid (bicubic), and where the head counts differ both "
                f"sides' heads are fused as softmax(Σ_h log a_h / T) with T = {self.fusion_temperature:g}."
            )
        return opening + "\n\n" + "\n".join(bullets)


def records_from_results(results: Mapping[str, Any], dataset_name: str, dataset_split: str) -> list[EvalRecord]:
    """Card records of a results dict of ``run_knn_eval`` or ``run_linear_eval`` (their JSON output).

    k-NN gives one top-1 record per k. A linear (or semi-supervised) probe gives the final epoch's
    top-1 and, when the heads were scored during training, DINO's best-over-epochs top-1 as a second,
    explicitly named record (it is chosen on the evaluation split itself).
    """
    protocol = results.get("protocol")
    if protocol == "knn":
        return [
            EvalRecord(f"k-NN top-1 (k={k})", score["top1"], dataset_name, dataset_split)
            for k, score in results["knn"].items()
        ]
    if protocol not in ("linear", "semi-supervised"):
        raise ValueError(f"Unknown evaluation protocol {protocol!r}: expected 'knn', 'linear' or 'semi-supervised'.")
    detail = results["kind"]
    if protocol == "semi-supervised":
        detail += f", {100 * results['label_fraction']:g}% labels"
    records = [EvalRecord(f"Linear probe top-1 ({detail})", results["top1"], dataset_name, dataset_split)]
    best = results.get("best_epoch")
    if best and best.get("epoch") != results.get("epochs"):
        name = f"Linear probe top-1 ({detail}, best of the scored epochs)"
        records.append(EvalRecord(name, best["top1"], dataset_name, dataset_split))
    return records


def redact(text: str, token: str | None = None) -> str:
    """``text`` with ``token``, any Hub-token-shaped string, any ``*token*: value`` setting and any
    ``--*token* VALUE`` flag masked.

    Used on everything that may be shown or written (exception messages, cards, inlined configs and
    command lines), so that a token given on the command line or stored in a config never leaves the
    process.
    """
    if token:
        text = text.replace(token, REDACTED)
    text = _TOKEN_PATTERN.sub(REDACTED, text)

    def mask(match: re.Match[str]) -> str:
        value = match.group("value")
        if value.strip("\"'") in {"", "null", "None", "~", "true", "false", REDACTED}:
            return match.group(0)
        return match.group("key") + REDACTED

    return _SECRET_FLAG_PATTERN.sub(mask, _SECRET_KEY_PATTERN.sub(mask, text))


def _looks_like_hub_id(name: str) -> bool:
    """True for ``owner/name`` or ``name`` ids; False for local paths (existing, absolute, relative, home)."""
    if not name or name.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return False
    if Path(name).exists():
        # transformers resolves an existing local folder before the Hub, so this is a path.
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def public_name(name: str) -> str:
    """A name safe to publish: Hub ids as they are, local paths reduced to their last component."""
    return name if _looks_like_hub_id(name) else Path(name.rstrip("/\\")).name or name


# A value in a config file or command line: a quoted string, or a run of characters that YAML, flag
# syntax (`--key=value`) and prose do not use around a value.
_VALUE_PATTERN = re.compile(r"""'(?P<single>[^'\n]*)'|"(?P<double>[^"\n]*)"|(?P<bare>[^\s'"=,\[\]{}()`]+)""")


def _is_local_path(value: str) -> bool:
    """Whether a configuration value names a local file, folder or glob (not a Hub id, URL or number)."""
    if "://" in value or not ("/" in value or value.startswith("~")):
        return False  # a URL, or one name (a Hub id without namespace, a preset): published as it is
    if os.path.isabs(os.path.expanduser(value)) or value.startswith(("./", "../")):
        return True
    if any(char.isspace() for char in value):
        return os.path.exists(value)  # quoted prose that contains a slash is no path
    return not _looks_like_hub_id(value)


def publish_local_paths(text: str) -> str:
    """``text`` with every local path in it replaced by its last component, as model cards name them.

    A config file or command line names the teacher, data and output folders by their local paths;
    published, they would tell where (and often as whom) the run was made. Hub ids and URLs stay.
    """

    def publish(match: re.Match[str]) -> str:
        group = match.lastgroup or "bare"
        value = match.group(group)
        if not _is_local_path(value):
            return match.group(0)
        quote = {"single": "'", "double": '"'}.get(group, "")
        return f"{quote}{public_name(value)}{quote}"

    return _VALUE_PATTERN.sub(publish, text)


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``, so inlined files cannot break out."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _format_duration(seconds: float) -> str:
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} (h:mm:ss)"


def _format_summary_value(key: str, value: Any) -> str:
    if key == "wall_time_s" and isinstance(value, int | float) and not isinstance(value, bool):
        return _format_duration(float(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _md_cell(value: Any) -> str:
    """A markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _check_figure_path(rel: str) -> str:
    path = Path(rel)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"Figure paths must be relative to the model folder, got {rel!r}.")
    if path.suffix.lower() != ".png":
        raise ValueError(f"Figures must be PNG files, got {rel!r}.")
    return path.as_posix()


def _architecture_line(config: Mapping[str, Any]) -> str:
    fields = [
        ("num_hidden_layers", "layers"),
        ("hidden_size", "width"),
        ("num_attention_heads", "heads"),
        ("patch_size", "patch size"),
        ("image_size", "image size"),
    ]
    parts = [f"{label} {config[key]}" for key, label in fields if key in config]
    return ", ".join(parts) if parts else "see `config.json`"


@dataclass(frozen=True)
class License:
    """A Hub license: an id from the Hub's list, or ``"other"`` with a name and a link."""

    id: str
    name: str | None = None
    link: str | None = None

    def describe(self) -> str:
        name = self.name or self.id
        return f"[{name}]({self.link})" if self.link else f"`{name}`"


# Teacher families whose released weights come under a license of their own. A student distilled from
# such a teacher is derived from it, so its card names that license.
FAMILY_LICENSES: dict[str, License] = {
    "dinov3_vit": License(
        "other", "dinov3-license", "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
    ),
}


def model_class_name(config: Mapping[str, Any]) -> str:
    """The transformers class of a model config: as saved (``architectures``), else its type's base model."""
    architectures = config.get("architectures")
    return architectures[0] if architectures else MODEL_MAPPING_NAMES[config.get("model_type", "vit")]


def teacher_license(teacher: str, model_type: str) -> License | None:
    """The teacher's license: from the model card of a local teacher folder, else its family's known license."""
    readme = Path(teacher).expanduser() / "README.md"
    if readme.is_file():
        data = ModelCard.load(readme).data
        if data.license:
            return License(data.license, data.get("license_name"), data.get("license_link"))
    return FAMILY_LICENSES.get(model_type)


def teacher_text(teacher: str, dtype: str, target_cache: str | None) -> str:
    """The card's Teacher section: the teacher, the precision of its weights, and where its targets came from."""
    if target_cache is not None:
        return (
            f"`{teacher}`, with its weights in {dtype}. It did not run during this student's training: its targets "
            f"came from {target_cache}"
        )
    if dtype == "float32":
        return f"`{teacher}`, frozen during training, with its weights in float32."
    return (
        f"`{teacher}`, frozen during training, with its weights in {dtype}: its CLS targets were computed in that "
        "precision, its last-layer CLS attention row in float32 from the queries and keys it computed."
    )


def build_model_card(
    *,
    model_id_or_name: str,
    teacher: str,
    student_config: Mapping[str, Any],
    dataset_name: str,
    dataset_split: str,
    eval_results: Sequence[EvalRecord],
    recipe_text: str,
    training_summary: Mapping[str, Any],
    figures: Mapping[str, str],
    license: str = "apache-2.0",
    extra_tags: Iterable[str] = (),
    limitations: str | None = None,
    loss: LossSettings,
    teacher_license: License | None = None,
    hub_dataset: bool = True,
    teacher_dtype: str = "float32",
    target_cache: str | None = None,
) -> ModelCard:
    """The model card of a distilled student: Hub metadata, ``model-index`` and a body that explains it.

    ``loss`` is this student's own loss (in a run of several students, each has its own), described in
    the card's "Distillation loss" section.

    ``eval_results`` become one ``EvalResult`` each and the results table; ``recipe_text`` (the config
    file) is inlined verbatim apart from redacted secrets and local paths, which it names by their last
    component (:func:`publish_local_paths`); ``figures`` maps captions to PNG paths relative to the
    model folder; ``limitations`` is stated as given (say so when the run was a demo on a tiny
    dataset). The teacher becomes ``base_model`` when it is a Hub id; a local teacher path is reduced
    to its folder name so that no local path is published. ``dataset_name`` is listed in the
    ``datasets`` metadata only when ``hub_dataset`` says it is a Hub dataset id (and it is no local
    path): local data is named in the text alone. A ``teacher_license`` other than Apache-2.0 is named
    in a License section, and becomes the card's license unless ``license`` was set to something other
    than the default. ``teacher_dtype`` is the precision the teacher's weights were loaded in;
    ``target_cache`` describes the teacher-target cache a run without a teacher trained from.
    """
    records = list(eval_results)
    teacher_public = public_name(teacher)
    dataset_public = public_name(dataset_name)
    tags = list(dict.fromkeys([*CARD_TAGS, *extra_tags]))
    inherited = teacher_license if teacher_license is not None and teacher_license.id != "apache-2.0" else None
    card_license = License(license) if inherited is None or license != "apache-2.0" else inherited
    license_fields = {"license_name": card_license.name, "license_link": card_license.link} if card_license.name else {}
    card_data = ModelCardData(
        model_name=public_name(model_id_or_name),
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=card_license.id,
        **license_fields,
        datasets=[dataset_name] if hub_dataset and _looks_like_hub_id(dataset_name) else None,
        base_model=teacher if _looks_like_hub_id(teacher) else None,
        tags=tags,
        eval_results=[record.to_eval_result() for record in records] or None,
    )

    model_ref = model_id_or_name if _looks_like_hub_id(model_id_or_name) else "path/to/this/folder"
    sections = [
        f"# {public_name(model_id_or_name)}",
        (
            f"A Vision Transformer student ({_architecture_line(student_config)}) distilled without labels "
            f"from the teacher `{teacher_public}` with **AttnDistill** on `{dataset_public}` images "
            f"(evaluations use its `{dataset_split}` split). It is a plain transformers "
            f"`{model_class_name(student_config)}`: the "
            "features are the last layer's CLS token after the final LayerNorm, which distillation leaves "
            "untrained (as in the published method, the loss reads the last block before it)."
            + (" The projector used during training is not part of this model." if loss.proj_weight else "")
        ),
        "## Teacher",
        teacher_text(teacher_public, teacher_dtype, target_cache),
        "## Distillation loss",
        loss.describe(),
        "## Training recipe",
        "The exact configuration of this run:",
        code_block(publish_local_paths(recipe_text), "yaml"),  # redacted with the whole card below
        "## Training summary",
        summary_table(training_summary),
    ]
    if figures:
        sections.append("## Figures")
        for caption, rel in figures.items():
            sections.append(f"![{caption}]({_check_figure_path(rel)})\n\n*{caption}*")
    if inherited is not None:
        sections += [
            "## License",
            (
                f"The teacher `{teacher_public}` is released under {inherited.describe()}. This student is "
                "derived from it by distillation: its use is subject to those terms too. This card's license "
                f"field is `{card_license.name or card_license.id}`."
            ),
        ]
    sections += [
        "## How to use",
        code_block(usage_snippet(model_ref), "python"),
        "## Results",
        results_table(records),
        "## Limitations",
        _limitations_text(limitations, dataset_public, records),
        "## Citation",
        code_block(CITATION_BIBTEX, "bibtex"),
    ]
    body = "\n\n".join(sections) + "\n"
    content = f"---\n{card_data.to_yaml()}\n---\n\n{body}"
    return ModelCard(redact(content))


def code_block(text: str, language: str) -> str:
    """``text`` as a fenced Markdown code block in ``language``, fenced so that nothing in it can close it."""
    fence = _fence(text)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def summary_table(summary: Mapping[str, Any]) -> str:
    """A card's training-summary table: one row per key, labelled and formatted (durations, thousands)."""
    if not summary:
        return "No training summary was recorded."
    lines = ["| | |", "|---|---|"]
    for key, value in summary.items():
        label = _SUMMARY_LABELS.get(key, key.replace("_", " ").capitalize())
        lines.append(f"| {_md_cell(label)} | {_md_cell(_format_summary_value(key, value))} |")
    return "\n".join(lines)


def results_table(records: Sequence[EvalRecord]) -> str:
    """A card's results table, one row per record: the numbers of its ``model-index`` metadata."""
    if not records:
        return "No evaluation was run for this model."
    lines = ["| Evaluation | Dataset | Split | Metric | Value (%) |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(
            f"| {_md_cell(r.metric_name)} | {_md_cell(public_name(r.dataset_name))} | "
            f"{_md_cell(r.dataset_split)} | {_md_cell(r.metric_type)} | {float(r.value):.2f} |"
        )
    return "\n".join(lines)


def usage_snippet(model_ref: str) -> str:
    """Python that loads the model ``model_ref`` (a Hub id or a folder), extracts features and fine-tunes it."""
    ref = json.dumps(model_ref)
    return (
        "import torch\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        "\n"
        f"processor = AutoImageProcessor.from_pretrained({ref})\n"
        f"model = AutoModel.from_pretrained({ref}).eval()\n"
        "\n"
        'image = Image.open("example.jpg").convert("RGB")\n'
        "with torch.no_grad():\n"
        '    outputs = model(**processor(images=image, return_tensors="pt"))\n'
        "features = outputs.last_hidden_state[:, 0]  # CLS token after the final LayerNorm\n"
        "\n"
        "# Fine-tuning on a labelled dataset: a fresh classification head on this backbone.\n"
        "from transformers import ViTForImageClassification\n"
        f"classifier = ViTForImageClassification.from_pretrained({ref}, num_labels=10)"
    )


def _limitations_text(limitations: str | None, dataset: str, records: Sequence[EvalRecord]) -> str:
    general = (
        "The student learns whatever the teacher encodes, biases included, and is only as good as the "
        f"images of `{dataset}` it was distilled on. The numbers above are k-NN / linear-probe "
        "measurements of frozen features on the listed splits; they say nothing about other domains."
    )
    if not records:
        general = (
            "No evaluation was run, so the quality of the features is unmeasured. The student learns "
            f"whatever the teacher encodes, biases included, and only saw the images of `{dataset}`."
        )
    return f"{limitations.strip()}\n\n{general}" if limitations else general


def write_model_card(output_dir: str | Path, **card_kwargs: Any) -> Path:
    """Build the card (see :func:`build_model_card`) and save it as ``output_dir/README.md``.

    Figures must already exist in ``output_dir``: a card that links to missing images is refused.
    """
    out = Path(output_dir)
    missing = [rel for rel in card_kwargs.get("figures", {}).values() if not (out / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"Figures linked by the model card are missing from {out}: {missing}.")
    card = build_model_card(**card_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "README.md"
    card.save(path)
    return path


def add_eval_records(model_dir: str | Path, records: Sequence[EvalRecord]) -> Path:
    """Add evaluation results to the model card of a local model folder (``model_dir/README.md``).

    Each record goes into ``model-index`` and the card's results table; a record with the same
    evaluation, dataset and split as one already there replaces it in place, so re-running an
    evaluation updates the card instead of listing the result twice.
    """
    path = Path(model_dir) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(
            f"No model card at {path}: only a folder written by recipes/distill.py (with --model_card true) "
            "has a card to add results to."
        )
    card = ModelCard.load(path)
    before = [EvalRecord.from_eval_result(result) for result in card.data.eval_results or []]

    def key(record: EvalRecord) -> tuple[str, str, str]:
        return record.metric_name, record.dataset_name, record.dataset_split

    new = {key(record): record for record in records}
    merged = [new.pop(key(record), record) for record in before]  # re-measured results keep their place
    merged += list(new.values())
    card.data.eval_results = [record.to_eval_result() for record in merged] or None
    text = set_section(card.text, "Results", results_table(merged))
    if merged and not before:  # the card said no evaluation was run; local data is named in the text only
        unmeasured = re.escape(_limitations_text(None, "DATASET", [])).replace("DATASET", "(?P<dataset>[^`]*)")
        text = re.sub(unmeasured, lambda match: _limitations_text(None, match["dataset"], merged), text)
    card.text = text
    ModelCard(redact(card.content)).save(path)
    return path


def set_section(text: str, title: str, body: str, *, before: str | None = None) -> str:
    """Markdown ``text`` with the body of its ``## title`` section replaced.

    A missing section is inserted before the ``## before`` section when ``text`` has one, else appended;
    setting a section twice therefore replaces it rather than adding a copy.
    """
    heading = f"## {title}\n"
    start = text.find(heading)
    if start < 0:
        anchor = text.find(f"## {before}\n") if before else -1
        if anchor < 0:
            return f"{text.rstrip()}\n\n{heading}\n{body}\n"
        return f"{text[:anchor]}{heading}\n{body}\n\n{text[anchor:]}"
    end = text.find("\n## ", start + len(heading))
    rest = text[end:] if end >= 0 else "\n"
    return f"{text[:start]}{heading}\n{body}\n{rest}"


def _retry_hint(local_dir: Path, repo_id: str, private: bool, ignore_patterns: Sequence[str]) -> str:
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in ignore_patterns)
    private_flag = " --private" if private else ""
    return (
        f"The local folder is intact at {local_dir}. To retry, log in (`hf auth login`) and run\n"
        f"  hf upload {shlex.quote(repo_id)} {shlex.quote(str(local_dir))} .{private_flag} {excludes}\n"
        f"or call attndistill_hf.hub.push_output_dir({str(local_dir)!r}, {repo_id!r}"
        f"{', private=True' if private else ''}) again."
    )


def push_output_dir(
    output_dir: str | Path,
    hub_model_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload AttnDistill student",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    repo_type: str = "model",
) -> str:
    """Create (or reuse) the ``repo_type`` repo ``hub_model_id`` and upload ``output_dir`` to it; return its URL.

    ``token=None`` uses the standard login (``hf auth login`` / ``HF_TOKEN``). Checkpoints, optimizer
    state and the pickled training arguments are left out (``ignore_patterns``). Nothing local is
    modified: on any failure a :class:`HubPushError` says where the folder is and how to retry, with
    every token redacted and the original exception detached (its text could hold the token).
    """
    local_dir = Path(output_dir).resolve()
    if not local_dir.is_dir():
        raise FileNotFoundError(f"Nothing to push: {local_dir} is not a folder.")
    try:
        api = HfApi(token=token)
        repo_url = api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type=repo_type)
        api.upload_folder(
            repo_id=hub_model_id,
            folder_path=local_dir,
            repo_type=repo_type,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
        )
    except Exception as exc:
        known_token = token or _logged_in_token()
        reason = redact(f"{type(exc).__name__}: {exc}", known_token)
        message = (
            f"Pushing {local_dir} to the Hub repo {hub_model_id!r} failed ({reason}).\n"
            f"{_retry_hint(local_dir, hub_model_id, private, ignore_patterns)}"
        )
        message = redact(message, known_token)
        # `from None`: the original exception (and its traceback text) may contain the token.
        raise HubPushError(message, local_dir=local_dir, repo_id=hub_model_id) from None
    url = str(repo_url)
    logger.info("Pushed %s to %s", local_dir, url)
    return url


def _logged_in_token() -> str | None:
    """The standard login's token, only to redact it from messages; None when there is none."""
    try:
        return get_token()
    except Exception:
        return None
