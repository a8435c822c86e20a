"""`monet info`: released sizes (paper Table 6, Table 8) and the Table 1 comparison, from real modules."""

import json

import pytest

from monet import preset
from monet.cli import main
from monet.info import count_parameters, dense_intermediate_size_matching


@pytest.mark.parametrize("name, expected", [
    ("monet-vd-1.4b", 1.465e9), ("monet-hd-1.4b", 1.465e9), ("codemonet-vd-1.4b", 1.465e9),
    ("monet-vd-850m", 0.853e9), ("monet-hd-850m", 0.853e9), ("monet-vd-4.1b", 4.17e9), ("monet-hd-4.1b", 4.17e9),
])
def test_released_sizes(name, expected):
    assert count_parameters(preset(name)) == pytest.approx(expected, rel=1e-3)


def test_router_in_every_layer_matches_table_8():
    assert count_parameters(preset("monet-vd-1.4b", moe_groups=1)) == pytest.approx(1.767e9, rel=1e-3)


def test_small_preset_is_about_ten_million_with_all_experts():
    config = preset("small")
    assert config.moe_experts**2 == 262_144
    assert 8e6 < count_parameters(config) < 12e6


def test_dense_baseline_width_matches_total_parameters():
    config = preset("small")
    width = dense_intermediate_size_matching(config)
    dense = preset("small", mlp_type="dense", intermediate_size=width)
    assert abs(count_parameters(dense) - count_parameters(config)) <= 3 * config.hidden_size * config.num_hidden_layers


def test_info_json(capsys):
    assert main(["info", "--preset", "monet-vd-1.4b", "--set", "moe_groups=1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == count_parameters(preset("monet-vd-1.4b", moe_groups=1))
    assert result["experts_per_layer"] == 262_144


def test_compare_reproduces_peer_memory_bottleneck(capsys):
    assert main(["info", "--compare", "--dim", "2048", "--experts", str(1024**2), "--heads", "8",
                 "--moe-dim", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    layers = result["per_layer_parameters"]
    assert set(layers) == {"smoe", "peer", "monet-hd", "monet-vd"}
    assert layers["peer"] == pytest.approx(4.3e9, rel=0.01)       # paper section 2
    assert layers["monet-hd"] == layers["monet-vd"] < layers["peer"] / 40 < layers["smoe"]
    costs = result["retrieval_cost_per_token"]
    assert costs["smoe"] > costs["peer"] and costs["smoe"] > costs["monet-vd"]


def test_compare_rejects_non_square(capsys):
    assert main(["info", "--compare", "--dim", "64", "--experts", "1000", "--heads", "2", "--moe-dim", "4"]) == 2
    assert "perfect square" in capsys.readouterr().err


def test_out_of_range_override_is_rejected(capsys):
    assert main(["info", "--preset", "tiny", "--set", "moe_topk=99"]) == 2
    assert "cannot exceed" in capsys.readouterr().err


def test_unknown_config_field(capsys):
    assert main(["info", "--preset", "tiny", "--set", "moe_expert=4"]) == 2
    assert "unknown config field(s) moe_expert" in capsys.readouterr().err
