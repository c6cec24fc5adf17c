"""DiffScaler (002): one pretrained model, many datasets and tasks.

* ``affiner.py``: the Affiner recipe (``model.affiner``) over the generic update forms, its
  default targets and its parameter counts;
* ``tasks.py``: one model, many tasks: grow the task banks (sequential regime), remove a task,
  export one task to its own adapter file and import it back;
* ``classes.py``: incremental classes (002 eq. 1), ``model.new_classes`` from a config;
* ``baselines.py``: the baselines of 002 Table 1 and the ablations of its Table 3 as config
  overrides, ``train.base_groups``, and parameter counts per task.

The sequential regime from a config (``model.affiner.frozen_tasks`` with ``train.init_from`` a
multi-task run) is loaded by ``difflora.train.base``.
"""

from difflora.diffscaler.affiner import (
    AFFINER_NAMES,
    DEFAULT_LATENT,
    DIT_TARGETS,
    affiner_adapter_configs,
    affiner_counts,
    default_affiner_targets,
)
from difflora.diffscaler.classes import GrownEmbedding, GrownLabelEmbedder, add_classes, base_model_config
from difflora.diffscaler.tasks import add_tasks, export_task, import_task, num_tasks, remove_task, task_branches

__all__ = [
    "AFFINER_NAMES",
    "DEFAULT_LATENT",
    "DIT_TARGETS",
    "GrownEmbedding",
    "GrownLabelEmbedder",
    "add_classes",
    "add_tasks",
    "base_model_config",
    "export_task",
    "import_task",
    "num_tasks",
    "remove_task",
    "task_branches",
    "affiner_adapter_configs",
    "affiner_counts",
    "default_affiner_targets",
]


def register() -> None:
    """Add 002 to the shared registries (called once, through the ``difflora.papers`` entry point)."""
