"""Fault catalogue: 004's position adapters inside diffusers' blocks (``model.arch: diffusers``).

A tap a block does not have, a pair outside 004's space or in the wrong order, and targets that
select no block with taps: each a one-line error naming the valid taps or pairs, nothing written.
"""

from __future__ import annotations

import pytest
import yaml
from faultkit import Fault, cases, check_fault, write_tmp

pytest.importorskip("diffusers")

CONFIG = "{tmp}/unet.yaml"
ADAPTER = {"name": "pa", "form": "position", "source": "attn2_out", "dest": "ff_in", "rank": 2}
ADAPTER |= {"condition": "t", "weighting": "shared", "targets": ["re:.*transformer_blocks\\.\\d+"]}
UNET = {
    "data": {"name": "digits"},
    "model": {
        "arch": "diffusers",
        "num_classes": 10,
        "learn_sigma": False,
        "diffusers": {
            "class_name": "UNet2DConditionModel",
            "config": {
                "block_out_channels": [16, 32],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "attention_head_dim": 8,
                "cross_attention_dim": 16,
            },
        },
        "adapters": [ADAPTER],
    },
    "diffusion": {"steps": 20},
    "train": {"steps": 2, "batch_size": 4},
}


def unet_config(**adapter) -> object:
    """Writes the tiny diffusers UNet config with ``adapter``'s keys changed to {tmp}/unet.yaml."""
    tree = {**UNET, "model": {**UNET["model"], "adapters": [{**ADAPTER, **adapter}]}}
    return write_tmp("unet.yaml", yaml.safe_dump(tree).encode())


TAPS = "attn1_in, attn1_out, attn2_in, context, attn2_out, ff_in, ff_out, out"
TRAIN = ("train", CONFIG, "--out", "{tmp}/new", "--no-progress")
CASES = [
    Fault(
        "diffusers-position-unknown-tap",
        ("params", CONFIG),
        rf"source tap 'attn3_in' is not a tap of BasicTransformerBlock; its taps: {TAPS}$",
        damage=unet_config(source="attn3_in"),
    ),
    Fault(
        "diffusers-position-pair-in-the-wrong-order",
        TRAIN,
        r"\(ff_out, attn1_in\) is not a valid \(source, dest\) pair of BasicTransformerBlock; "
        r"valid pairs: attn1_in->attn1_in, attn1_in->attn2_in, .*, out->out$",
        damage=unet_config(source="ff_out", dest="attn1_in"),
    ),
    Fault(
        "diffusers-position-pair-outside-004",
        ("params", CONFIG),
        r"\(attn1_out, attn1_out\) is not a valid \(source, dest\) pair of BasicTransformerBlock; valid pairs: ",
        damage=unet_config(source="attn1_out", dest="attn1_out"),
    ),
    Fault(
        "diffusers-position-resnet-wrong-order",
        TRAIN,
        r"source tap 'out' comes after dest tap 'in' in ResnetBlock2D's forward \(order: in, out\)",
        damage=unet_config(source="out", dest="in", targets=["re:.*resnets\\.\\d+"]),
    ),
    Fault(
        "diffusers-position-targets-without-taps",
        ("params", CONFIG),
        r"position-adapter targets \['re:.*attentions\\\\.\\\\d\+\$'\] match no block with taps; "
        r"blocks with taps include: model\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0",
        damage=unet_config(targets=["re:.*attentions\\.\\d+$"]),
    ),
]


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
