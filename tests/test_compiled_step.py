"""The compiled decode step: one graph, compiled once, the eager step's logits, the same bounds.

The fixed-shape step (attention over a layer's whole storage with a validity mask, the new
row written in place at a count on the device, queries in a ring) is checked against the eager
step first without a compiler, then under `torch.compile`: "aot_eager" traces exactly what
inductor gets (the same graph breaks and recompilations) at a fraction of the cost; inductor
itself is run once per policy for the logits it computes."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from hae_cli import api
from hae_cli.cache.rounds import held_bound
from hae_cli.model.compiled import CompiledStep
from hae_cli.model.generate import decode_one_token, prefill
from cli_runner import hae_in_process
from hae_process import run_hae

IMAGES = ["sample_images/easyvqa_test_0063.png", "sample_images/easyvqa_test_0198.png",
          "sample_images/easyvqa_test_0394.png", "sample_images/easyvqa_test_0698.png"]
# Tight budgets, so that rounds come every few steps and (hae) bin tokens come back.
POLICIES = {
    "full": {},
    "hae": {"budget": 160, "buffer": 6},
    "streaming": {"budget": 96, "buffer": 5, "sink": 4},
}


@pytest.fixture(scope="module")
def demo():
    loaded = api.load_model()
    return loaded, api.prepare(loaded, IMAGES, None, task="story")


def decode_run(demo, policy: str, steps: int, step_kind: str | None, check=None):
    """Greedy decoding for `steps` steps (stop tokens fed like any other): the logits at each
    step, and the cache. `step_kind`: None (the eager step), "fixed" (the fixed-shape step,
    not compiled), or a `torch.compile` backend."""
    loaded, prepared = demo
    cache = api.make_cache(loaded, policy, POLICIES[policy])
    position_ids, position = loaded.position_ids(prepared.tokens, 0)
    step = None
    logits_seen = []
    with torch.inference_mode():
        logits = prefill(loaded, prepared.embeds, prepared.tokens, position_ids, cache)
        if step_kind is not None:
            step = CompiledStep(loaded, cache, compile=step_kind != "fixed",
                                backend=step_kind if step_kind != "fixed" else "inductor")
            step.make_room(steps + 1)
        for _ in range(steps):
            token = int(logits.argmax())
            logits = step(token, position) if step is not None else decode_one_token(loaded, token, position, cache)
            position += 1
            logits_seen.append(logits.float().clone())
            if check is not None:
                check(cache)
    return logits_seen, cache, step


def bounds_hold(cache) -> None:
    """The budget bound and bytes held == tokens held x bytes per token, in every layer."""
    for layer, layer_stats in zip(cache.layers, cache.stats().layers):
        if layer.budget is not None:
            assert layer.held <= held_bound(layer.budget, cache.policy.buffer) == layer.capacity
        assert layer_stats.tokens_held == layer.held
        assert layer_stats.bytes_held == layer.held * layer.bytes_per_token
        assert layer.token_index.shape[1] == layer.held


def rounds_and_restores(cache) -> tuple[int, int]:
    events = [e for e in cache.events if e.stage == "decode" and e.layer == 0]
    rounds = len({e.step for e in events if e.action in ("binned", "evicted")})
    return rounds, sum(e.action == "restored" for e in cache.events)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_fixed_shape_step_gives_the_eager_logits_and_holds_the_bounds(demo, policy):
    eager, eager_cache, _ = decode_run(demo, policy, 256, None)
    fixed, fixed_cache, _ = decode_run(demo, policy, 256, "fixed", check=bounds_hold)
    worst = max(float((a - b).abs().max()) for a, b in zip(eager, fixed))
    assert worst < 1e-4, worst
    assert [int(x.argmax()) for x in eager] == [int(x.argmax()) for x in fixed]
    for a, b in zip(eager_cache.layers, fixed_cache.layers):
        assert torch.equal(a.token_index, b.token_index) and torch.equal(a.modality, b.modality)
    for a, b in zip(eager_cache.asides, fixed_cache.asides):
        assert torch.equal(a.bin.token_index, b.bin.token_index)
    if policy != "full":
        rounds, restores = rounds_and_restores(fixed_cache)
        assert rounds >= 4 and (restores > 0 or policy == "streaming"), (rounds, restores)
    assert [e.action for e in eager_cache.events] == [e.action for e in fixed_cache.events]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_step_compiles_to_one_graph_once_over_256_steps(demo, policy):
    eager, _, _ = decode_run(demo, policy, 256, None)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled, cache, step = decode_run(demo, policy, 256, "aot_eager", check=bounds_hold)
    assert step.note is None, step.note  # fullgraph=True: a graph break would have failed the compile
    assert sum(counters["graph_break"].values()) == breaks
    assert counters["stats"]["unique_graphs"] - graphs <= 1, "recompiled while decoding"
    assert step.warmup_seconds is not None
    assert max(float((a - b).abs().max()) for a, b in zip(eager, compiled)) < 1e-4
    if policy != "full":
        rounds, restores = rounds_and_restores(cache)
        assert rounds >= 4 and (restores > 0 or policy == "streaming"), (rounds, restores)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_inductors_step_gives_the_eager_logits_through_rounds(demo, policy):
    eager, _, _ = decode_run(demo, policy, 48, None)
    compiled, cache, step = decode_run(demo, policy, 48, "inductor", check=bounds_hold)
    assert step.note is None, step.note
    worst = max(float((a - b).abs().max()) for a, b in zip(eager, compiled))
    assert worst < 1e-3, worst  # float32; inductor fuses and reorders the sums
    assert [int(x.argmax()) for x in eager] == [int(x.argmax()) for x in compiled]


def test_a_compile_that_fails_decodes_eagerly_with_a_note(demo, monkeypatch):
    import hae_cli.model.compiled as compiled

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(compiled, "compiled_step_function", lambda mode, backend: broken)
    eager, _, _ = decode_run(demo, "hae", 12, None)
    fell_back, _, step = decode_run(demo, "hae", 12, "inductor")
    assert "could not be compiled" in step.note and "no C compiler" in step.note
    assert all(torch.equal(a, b) for a, b in zip(eager, fell_back))


def test_the_api_reports_the_warm_up_apart_from_decoding(demo):
    loaded, prepared = demo
    seen = []
    result = api.run_prepared(loaded, prepared, policy="hae", policy_params=POLICIES["hae"], max_new_tokens=24,
                              compile=True, on_compile=seen.append)
    plain = api.run_prepared(loaded, prepared, policy="hae", policy_params=POLICIES["hae"], max_new_tokens=24)
    assert result.token_ids == plain.token_ids
    assert seen[0] is None and seen[-1] == result.compile_seconds
    assert result.to_json()["timings"]["compile_seconds"] == result.compile_seconds


def _tokens(*args, fresh_process: bool = False) -> list:
    """`hae ARGS --json`; a compiled run in a fresh process, whose first call compiles as a user's does."""
    done = run_hae(*args, "--json", timeout=600) if fresh_process else hae_in_process(*args, "--json")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("command", ["ask", "story", "chat"])
def test_the_commands_give_the_same_tokens_with_compile(command, tmp_path):
    same = ["--budget", "160", "-p", "buffer=6", "-n", "40"]
    if command == "ask":
        args = ["ask", IMAGES[0], "What color is the shape?", *same]
    elif command == "story":
        args = ["story", *IMAGES, *same]
    else:
        script = tmp_path / "questions.txt"
        script.write_text("What shape is in image 1?\nWhat color is the shape in image 3?\n")
        args = ["chat", *IMAGES, "--script", str(script), *same]
    plain, compiled = _tokens(*args), _tokens(*args, "--compile", fresh_process=True)
    if command == "chat":
        assert [t["token_ids"] for t in plain["turns"]] == [t["token_ids"] for t in compiled["turns"]]
        assert compiled["turns"][0]["timings"]["compile_seconds"] > 0
    else:
        assert plain["token_ids"] == compiled["token_ids"] and plain["text"] == compiled["text"]
        assert compiled["timings"]["compile_seconds"] > 0 and not compiled.get("notes")
