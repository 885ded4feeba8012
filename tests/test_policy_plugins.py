"""A new policy joins without editing any file of hae: a class registered in the caller's code, or a
module named in HAE_POLICY_MODULES, is listed by `hae policies`, checked like the built-in ones,
and drives the cache through the CLI end to end."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from hae_cli.cache.modality import Modality
from hae_cli.cache.policies import POLICIES, LayerView, ScorerPolicy, param, register_policy
from hae_cli.errors import ConfigError
from hae_process import run_hae
from cli_runner import invoke
from test_cli_e2e import ok


@dataclass
class TextFirstPolicy(ScorerPolicy):
    """Text first: while decoding, image tokens go before any text or generated token."""

    name: ClassVar[str] = "text_first"

    budget: int | float = param(0.5, "tokens per layer; int = a count, float = a fraction of the prompt.")
    buffer: int = param(4, "tokens appended past the budget before a round.")

    def score(self, view: LayerView) -> torch.Tensor:
        image = (view.modality == Modality.IMAGE) | (view.modality == Modality.SEPARATOR)
        return (~image).float()


@pytest.fixture
def registered():
    before = dict(POLICIES)
    register_policy(TextFirstPolicy)
    yield TextFirstPolicy
    POLICIES.clear()
    POLICIES.update(before)


def test_a_registered_policy_runs_through_the_cli(registered, checkpoint, images):
    result = ok(invoke("ask", images[0], "what color is the shape?", "--model", checkpoint, "-n", "12",
                       "--policy", "text_first", "--budget", "60", "-p", "buffer=2", "--json"))
    payload = json.loads(result.stdout)
    assert payload["policy"] == "text_first"
    final = payload["final_cache"]
    for layer in final["layers"]:
        assert layer["budget"] == 60 and layer["tokens_held"] <= 62
        assert layer["tokens_by_modality"]["text"] > 0, "text outlives the image"
    binned_or_evicted = [e for e in payload["events"] if e["stage"] == "decode"]
    assert binned_or_evicted and all(set(e["counts"]) <= {"image", "separator", "text", "generated"}
                                     for e in binned_or_evicted)
    listing = ok(invoke("policies")).stdout
    assert "text_first" in listing and "image tokens go before" in listing


def test_a_registered_policy_is_checked_like_the_built_in_ones(registered, checkpoint, images):
    result = invoke("ask", images[0], "what?", "--model", checkpoint, "--policy", "text_first", "-p", "sink=3")
    assert result.exit_code == 2 and "policy text_first has no parameter 'sink'" in result.stderr


def test_register_refuses_what_is_not_a_policy():
    with pytest.raises(ConfigError, match="not a policy"):
        register_policy(dict)

    @dataclass
    class Nameless(ScorerPolicy):
        pass

    with pytest.raises(ConfigError, match="needs a `name`"):
        register_policy(Nameless)


NEWEST_MODULE = textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar

        import torch

        from hae_cli.cache.policies import ScorerPolicy, param


        @dataclass
        class NewestPolicy(ScorerPolicy):
            """Newest first: keep the most recent tokens, no sink."""

            name: ClassVar[str] = "newest"
            budget: int | float = param(0.5, "tokens per layer.")

            def score(self, view):
                return torch.arange(view.held, dtype=torch.float32)
    ''')


def test_a_policy_module_named_in_the_environment_joins_the_command_line(tmp_path, checkpoint, images):
    (tmp_path / "my_policies.py").write_text(NEWEST_MODULE)
    env = {"PYTHONPATH": str(tmp_path), "HAE_POLICY_MODULES": "my_policies"}
    listing = run_hae("policies", COLUMNS="200", **env)
    assert listing.returncode == 0 and "newest" in listing.stdout.decode()
    result = run_hae("ask", images[0], "what color is the shape?", "--model", str(checkpoint), "-n", "8",
                     "--policy", "newest", "--budget", "40", "--json", **env)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    payload = json.loads(result.stdout)
    assert payload["policy"] == "newest" and all(layer["tokens_held"] <= 41 for layer in payload["final_cache"]["layers"])
    missing = run_hae("policies", HAE_POLICY_MODULES="no_such_module")
    assert missing.returncode == 2 and "cannot import 'no_such_module'" in missing.stderr.decode()


def test_a_policy_module_named_in_the_environment_reaches_library_callers(tmp_path, monkeypatch, checkpoint, images):
    """`api.run(policy="newest")` finds the plugin as `hae --policy newest` does: one registry."""
    import sys

    import hae_cli.cache.policies as registry
    from hae_cli import api

    (tmp_path / "my_library_policies.py").write_text(NEWEST_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HAE_POLICY_MODULES", "my_library_policies")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "POLICIES", dict(registry.POLICIES))  # the registration ends with the test
    try:
        result = api.run(api.load_model(str(checkpoint)), [images[0]], "what color is the shape?", policy="newest",
                         policy_params={"budget": 40}, max_new_tokens=8)
    finally:
        sys.modules.pop("my_library_policies", None)
    assert result.policy == "newest"
    assert all(layer.tokens_held <= 41 for layer in result.steps[-1].layers)
