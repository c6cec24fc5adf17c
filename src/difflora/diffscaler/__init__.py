"""DiffScaler (002): one pretrained model, many datasets and tasks.

* ``affiner.py``: the Affiner recipe (``model.affiner``) over the generic update forms, its
  default targets and its parameter counts;
* ``tasks.py``: one model, many tasks: grow the task banks (sequential regime), remove a task,
  export one task to its own adapter file and import it back;
* ``classes.py``: incremental classes (002 eq. 1), ``model.new_classes`` from a config;
* ``baselines.py``: the baselines of 002 Table 1 and the ablations of its Table 3 as config
  overrides, ``train.base_groups``, and parameter counts per task;
* ``sequential.py``: the sequential regime from a config (``model.affiner.frozen_tasks`` with
  ``train.init_from`` a multi-task run);
* ``masked.py``: DiT masked training (``train.mask_ratio``), a variant of the diffusion objective;
* ``controlnet.py``: the ControlNet-style baseline of spatial tasks (``model.spatial_input: controlnet``);
* ``combine_tasks.py``: ``difflora combine-tasks``, one run serving the tasks of several runs.

The shared code reaches these parts only through the registries :func:`register` fills
(:mod:`difflora.registry`).
"""

from difflora.diffscaler.affiner import (
    AFFINER_NAMES,
    DEFAULT_LATENT,
    DIT_TARGETS,
    affiner_adapter_configs,
    affiner_counts,
    default_affiner_targets,
)
from difflora.diffscaler.baselines import unfreeze_base_groups
from difflora.diffscaler.classes import (
    GrownEmbedding,
    GrownLabelEmbedder,
    add_classes,
    base_model_config,
    grow_classes,
)
from difflora.diffscaler.controlnet import ControlUNet, copy_encoder_into_control
from difflora.diffscaler.masked import MaskedDiffusionObjective, masked_training
from difflora.diffscaler.sequential import read_task_run
from difflora.diffscaler.tasks import add_tasks, export_task, import_task, num_tasks, remove_task, task_branches
from difflora.model.expand import EXPANSIONS, Expansion
from difflora.nets import SPATIAL_INPUTS
from difflora.train.base import BASE_LOADED, BASE_READERS
from difflora.train.objectives import DIFFUSION_VARIANTS, DiffusionVariant

__all__ = [
    "AFFINER_NAMES",
    "DEFAULT_LATENT",
    "DIT_TARGETS",
    "ControlUNet",
    "MaskedDiffusionObjective",
    "GrownEmbedding",
    "GrownLabelEmbedder",
    "add_classes",
    "add_tasks",
    "base_model_config",
    "copy_encoder_into_control",
    "export_task",
    "import_task",
    "num_tasks",
    "remove_task",
    "task_branches",
    "affiner_adapter_configs",
    "affiner_counts",
    "default_affiner_targets",
    "register",
]


def register() -> None:
    """Add 002 to the shared registries (called once, through the ``difflora.papers`` entry point)."""
    # The expansion step of model building, in this order after the shared parts.
    EXPANSIONS.register("affiner", Expansion(adapter_configs=affiner_adapter_configs))  # model.affiner
    EXPANSIONS.register("base_groups", Expansion(extend=unfreeze_base_groups))  # train.base_groups
    EXPANSIONS.register("new_classes", Expansion(net_config=base_model_config, extend=grow_classes))
    SPATIAL_INPUTS.register("controlnet", ControlUNet)
    DIFFUSION_VARIANTS.register("masked", DiffusionVariant(masked_training, MaskedDiffusionObjective))
    BASE_READERS.register("task_run", read_task_run)  # the sequential regime
    BASE_LOADED.register("controlnet", copy_encoder_into_control)
