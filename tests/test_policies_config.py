"""Bad parameters are refused with one line naming the parameter and what it may be."""

import pytest

from hae_cli.cache import POLICIES, EvictingCache, make_policy, policy_parameters
from hae_cli.errors import ConfigError

BAD = [
    ("hae", {"budget": 0}, "budget"),
    ("hae", {"budget": -5}, "budget"),
    ("hae", {"budget": 1.5}, "budget"),
    ("hae", {"budget": 0.0}, "budget"),
    ("hae", {"budget": True}, "budget"),
    ("hae", {"budget": "half"}, "budget"),
    ("hae", {"gamma": -0.1}, "gamma"),
    ("hae", {"gamma": 1.5}, "gamma"),
    ("hae", {"r_g": -1.0}, "r_g"),
    ("hae", {"r_i": 2.0}, "r_i"),
    ("hae", {"visual_keep": 0.0}, "visual_keep"),
    ("hae", {"visual_keep": 1.2}, "visual_keep"),
    ("hae", {"buffer": -1}, "buffer"),
    ("hae", {"sink": -1}, "sink"),
    ("hae", {"recent": 2.5}, "recent"),
    ("hae", {"w_visual": -0.5}, "w_visual"),
    ("hae", {"w_text": -1}, "w_text"),
    ("hae", {"bin_size": -1}, "bin_size"),
    ("hae", {"bin_ttl": 0}, "bin_ttl"),
    ("hae", {"score_layer": -1}, "score_layer"),
    ("hae", {"broadcast": "yes"}, "broadcast"),
    ("streaming", {"budget": 0}, "budget"),
    ("streaming", {"sink": -2}, "sink"),
    ("h2o", {"budget": 2.0}, "budget"),
    ("h2o", {"recent": -1}, "recent"),
    ("snapkv", {"window": 0}, "window"),
    ("snapkv", {"kernel": 4}, "kernel"),
    ("fastv", {"drop_ratio": 1.5}, "drop_ratio"),
    ("fastv", {"prune_layer": 0}, "prune_layer"),
    ("mustdrop", {"gamma": -1.0}, "gamma"),
    ("mustdrop", {"budget": 0}, "budget"),
]


@pytest.mark.parametrize("name, params, parameter", BAD)
def test_bad_parameter_raises_config_error(name, params, parameter):
    with pytest.raises(ConfigError) as error:
        make_policy(name, **params)
    message = str(error.value)
    assert parameter in message and "\n" not in message


@pytest.mark.parametrize(
    "name, params, parameter",
    [("hae", {"score_layer": 4}, "score_layer"), ("mustdrop", {"score_layer": 9}, "score_layer"),
     ("fastv", {"prune_layer": 4}, "prune_layer")],
)
def test_layer_out_of_range_is_refused_at_bind_time(name, params, parameter):
    make_policy(name, **params)  # fine until the depth is known
    with pytest.raises(ConfigError, match=rf"{parameter} must be in \[\d, 3\] for a 4-layer model"):
        EvictingCache(name, num_layers=4, **params)


def test_unknown_policy_and_parameter():
    with pytest.raises(ConfigError, match=r"unknown policy .lru. \(choose from: full, hae, streaming, h2o, snapkv, fastv, mustdrop"):
        make_policy("lru")
    with pytest.raises(ConfigError, match="'budgett'"):
        make_policy("hae", budgett=3)


def test_defaults_are_the_methods():
    assert set(POLICIES) == {"full", "hae", "streaming", "h2o", "snapkv", "fastv", "mustdrop", "random"}
    assert policy_parameters("hae") == {
        "score_layer": 1, "r_g": 1.5, "r_i": 0.5, "visual_keep": None, "image_floor": 0.15,
        "floor_from": "overview", "floor_score": "distinct", "separators": "keep", "budget": None, "gamma": 0.95,
        "buffer": 32, "sink": 4, "recent": 32, "w_visual": 0.5, "w_text": 1.0, "bin_size": None,
        "bin_ttl": 4, "broadcast": False, "reserve": "auto", "turn_restore": True, "turn_floor": True,
    }
    assert policy_parameters("snapkv")["window"] == 32 and policy_parameters("snapkv")["kernel"] == 7
    assert policy_parameters("fastv") == {"prune_layer": 2, "drop_ratio": 0.5}
    assert make_policy("hae", budget=0.5).budget == 0.5 and make_policy("hae", budget=128).budget == 128
    assert make_policy("hae").bin_capacity(100) == 25
    assert policy_parameters("mustdrop")["r_g"] == 0.9 and "image_floor" not in policy_parameters("mustdrop")
    with pytest.raises(ConfigError, match="floor_score must be one of distinct, attention"):
        make_policy("hae", floor_score="norm")
    with pytest.raises(ConfigError, match="floor_from must be one of overview, image"):
        make_policy("hae", floor_from="crops")
    with pytest.raises(ConfigError, match="image_floor"):
        make_policy("hae", image_floor=1.5)
    for name, cls in POLICIES.items():
        assert cls.__doc__ and ("arxiv.org" in cls.__doc__ or name == "full"), name
