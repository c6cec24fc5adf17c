"""Sample-quality evaluation without downloads: a feature network difflora trains itself, and metrics on its features.

``get_feature_net`` (features.py) trains or loads the classifier whose penultimate layer is the
feature space; ``compute_metrics`` (metrics.py) gives Frechet distance, KID, precision/recall and
class accuracy in it (KID: ``kernel.py``); ``uncertainty.py`` gives the noise floor (real data at the
same sample count) and bootstrap intervals. ``load_inception`` gives Inception FID / IS from a local
weights file.
"""

from difflora.eval.features import (
    FeatureNet,
    FeatureNetConfig,
    FeatureNetInfo,
    FeatureNetMismatchError,
    FeatureTrainConfig,
    InceptionFeatures,
    check_feature_net,
    data_fingerprint,
    default_cache_dir,
    get_feature_net,
    load_feature_net,
    load_inception,
    save_feature_net,
    train_feature_net,
)
from difflora.eval.kernel import kernel_distance
from difflora.eval.metrics import (
    class_accuracy,
    compute_metrics,
    extract_features,
    frechet_distance,
    inception_score,
    metrics_from_features,
    precision_recall,
)
from difflora.eval.uncertainty import bootstrap_intervals, reference_level

__all__ = [
    "FeatureNet",
    "FeatureNetConfig",
    "FeatureNetInfo",
    "FeatureNetMismatchError",
    "FeatureTrainConfig",
    "InceptionFeatures",
    "check_feature_net",
    "class_accuracy",
    "compute_metrics",
    "data_fingerprint",
    "default_cache_dir",
    "extract_features",
    "frechet_distance",
    "get_feature_net",
    "inception_score",
    "metrics_from_features",
    "reference_level",
    "bootstrap_intervals",
    "kernel_distance",
    "load_feature_net",
    "load_inception",
    "precision_recall",
    "save_feature_net",
    "train_feature_net",
]
