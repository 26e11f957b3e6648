"""DINO's evaluation protocols for any teacher or student: weighted k-NN, linear probe, semi-supervised probe.

The paper reports k-NN and linear-probe top-1 measured as DINO measures them (method.md, "Evaluation
protocol"). The protocols work on models and dataloaders (or on already extracted features), so they are
independent of how data is loaded; :mod:`.runs` and the recipes in ``recipes/`` wire them to the dataset
sources.

* :mod:`.features`: ``extract_features``, frozen-model features of a whole loader ("cls", "last4_cls",
  "cls+avgpool"), mixed precision on GPU, gathered across processes in dataset order, optionally cached.
* :mod:`.knn`: ``knn_accuracy``, DINO's weighted k-NN, and ``KNNEvaluationCallback``, k-NN top-1 during
  ``Trainer`` training.
* :mod:`.linear`: ``train_linear_probe`` / ``train_linear_probe_on_images`` (one SGD + cosine loop, an
  optional lr sweep as parallel heads), ``probe_feature_kind`` and the semi-supervised
  ``balanced_label_subset``.
* :mod:`.runs`: ``run_knn_eval`` / ``run_linear_eval``, the complete evaluations the recipes (and the
  demo) run, with ``EvalArguments`` / ``EvalDataArguments``, model loading and model-card records.

The public names of all four are importable from here (``from attndistill_hf.evaluation import run_knn_eval``).
"""

from .features import (
    FEATURE_KINDS,
    FeatureKind,
    compute_features,
    eval_mode,
    extract_features,
    is_main_process,
    split_batch,
)
from .knn import DEFAULT_KNN_KS, KNNEvaluationCallback, default_feature_model, knn_accuracy, knn_ks_used
from .linear import (
    LinearProbeConfig,
    ProbeFeatureKind,
    balanced_label_subset,
    probe_feature_kind,
    train_linear_probe,
    train_linear_probe_on_images,
)
from .runs import (
    PRECISIONS,
    EvalArguments,
    EvalDataArguments,
    EvalSetup,
    add_results_to_card,
    card_records,
    class_count,
    format_table,
    load_eval_setup,
    run_knn_eval,
    run_linear_eval,
)

__all__ = [
    "DEFAULT_KNN_KS",
    "FEATURE_KINDS",
    "PRECISIONS",
    "EvalArguments",
    "EvalDataArguments",
    "EvalSetup",
    "FeatureKind",
    "KNNEvaluationCallback",
    "LinearProbeConfig",
    "ProbeFeatureKind",
    "add_results_to_card",
    "balanced_label_subset",
    "card_records",
    "class_count",
    "compute_features",
    "default_feature_model",
    "eval_mode",
    "extract_features",
    "format_table",
    "is_main_process",
    "knn_accuracy",
    "knn_ks_used",
    "load_eval_setup",
    "probe_feature_kind",
    "run_knn_eval",
    "run_linear_eval",
    "split_batch",
    "train_linear_probe",
    "train_linear_probe_on_images",
]
