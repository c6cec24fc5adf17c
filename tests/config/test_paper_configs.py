"""Seed 000's parameter counts (Tables 1-3, section 5.3), exactly, from the configs under configs/paper/.

Each config is counted by ``difflora params --json`` (meta device: nothing is allocated). The
expected totals are the paper's printed numbers, except Table 3's m = 20 rows, which the paper
misprints (it repeats the r = 8 row, 48,605,200); there the count follows from the same rules that
reproduce every other row, worked out by hand below.
"""

import json

import pytest

from difflora.cli.commands import main

# The hand-computed pieces of the CIFAR-10 U-Net of 000 (128 channels, attention at 16 and 8):
# 15 attention blocks, all with 256 channels, each with qkv 256 -> 768 and proj_out 256 -> 256.
BASE_NO_TIME = 45_257_350  # 52,546,438 minus time_embed and every ResBlock's emb_layers
LORA_PER_BASIS_R1 = 15 * ((256 + 768) + (256 + 256))  # one rank-1 basis on all 30 layers: 23,040


def trainable_weights(m: int) -> int:
    return 30 * 4001 * (m + 1)  # one [T x (m+1)] table per wrapped layer, T = 4001


M20 = BASE_NO_TIME + LORA_PER_BASIS_R1 * 4 * 21 + trainable_weights(20)

PAPER = {
    # Table 1 (unconditional)
    "paper/iddpm-cifar10": 52_546_438,
    "paper/timelora-noncomp": 137_417_350,
    "paper/timelora-linear": 46_271_110,
    "paper/timelora-train-gaussian": 47_591_440,
    "paper/timelora-train-onehot": 47_591_440,
    "paper/timelora-train-linear": 47_591_440,
    # Table 2 (class-conditional)
    "paper/iddpm-cifar10-class": 52_551_558,
    "paper/tclora-linear": 47_192_710,
    "paper/tclora-train-gaussian": 48_513_040,
    "paper/tclora-train-onehot": 48_513_040,
    "paper/tclora-train-linear": 48_513_040,
    # Table 3 (a) varying r, (b) varying m
    "paper/timelora-r8-train-onehot": 48_605_200,
    "paper/timelora-r8-train-linear": 48_605_200,
    "paper/timelora-m20-train-onehot": M20,
    "paper/timelora-m20-train-linear": M20,
    "paper/timelora-m40-train-onehot": 53_957_140,
    "paper/timelora-m40-train-linear": 53_957_140,
    # Section 5.3: time embedding kept, TimeLoRA (linear, m = 10, r = 4) added: "a 2% addition"
    "paper/timelora-with-time-embed": 52_546_438 + LORA_PER_BASIS_R1 * 4 * 11,
    # Journal version: the embeddings kept, TimeLoRA with trainable weights (m = 10, r = 4) added, and
    # ClassLoRA (10 classes) on the class-conditional model: the base's count plus the LoRAs and tables.
    "paper/timelora-train-with-time-embed": 52_546_438 + LORA_PER_BASIS_R1 * 4 * 11 + trainable_weights(10),
    "paper/tclora-train-with-embeds": 52_551_558 + LORA_PER_BASIS_R1 * 4 * (11 + 10) + trainable_weights(10),
}


def params_json(name: str, capsys) -> dict:
    assert main(["params", name, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_count(name, capsys):
    assert params_json(name, capsys)["total"] == PAPER[name]


def test_m20_misprint_corrected():
    # 000 Table 3 prints 48,605,200 for m = 20: that is the r = 8 row's count. The rules give this.
    assert M20 == 49_713_340 != 48_605_200


def test_timelora_breakdown_by_group(capsys):
    counts = params_json("paper/timelora-train-onehot", capsys)
    lora = 15 * (256 * 4 + 4 * 768 + 256 * 4 + 4 * 256) * (10 + 1)  # A [r x d_in], B [d_out x r] per basis
    assert counts["by_group"] == {
        "base": BASE_NO_TIME,
        "embeddings": 0,
        "adapters": lora,
        "weighting": 30 * 4001 * 11,
    }
    with_embed = params_json("paper/timelora-with-time-embed", capsys)["by_group"]
    assert with_embed["embeddings"] == 52_546_438 - BASE_NO_TIME and with_embed["adapters"] == lora


def test_params_table_shows_the_groups(capsys):
    assert main(["params", "paper/tclora-train-linear"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].replace(",", "").isdigit():
            rows.setdefault(parts[0], int(parts[1].replace(",", "")))
    # ClassLoRA adds 10 rank-4 LoRAs per layer (no row for the null label) to TimeLoRA's 11.
    assert rows["base"] == BASE_NO_TIME
    assert rows["embeddings"] == 0
    assert rows["adapters"] == LORA_PER_BASIS_R1 * 4 * (11 + 10)
    assert rows["weighting"] == 30 * 4001 * 11
    assert rows["total"] == 48_513_040


def test_journal_presets_keep_the_embeddings_and_add_trainable_weight_loras(capsys):
    time_only = params_json("paper/timelora-train-with-time-embed", capsys)["by_group"]
    assert time_only == {
        "base": BASE_NO_TIME,
        "embeddings": 52_546_438 - BASE_NO_TIME,
        "adapters": LORA_PER_BASIS_R1 * 4 * 11,
        "weighting": 30 * 4001 * 11,
    }
    both = params_json("paper/tclora-train-with-embeds", capsys)["by_group"]
    assert both["embeddings"] == 52_551_558 - BASE_NO_TIME  # the time MLP, emb_layers and 10 class rows
    assert both["adapters"] == LORA_PER_BASIS_R1 * 4 * (11 + 10) and both["weighting"] == 30 * 4001 * 11
