"""Settings, and the rule that makes policies comparable: HAE first, then each baseline at
HAE's KV on the same prompt.

A setting is a policy with parameters, or a baseline whose budget is read off an HAE setting's
run of the same prompt (`matched_to`): snapkv / h2o / streaming get HAE's tokens per layer
after prefill, mustdrop its dual-attention filter keeping as many image tokens as HAE kept
(the top by g_j), fastv the same share of image tokens dropped after its layer K. The
benchmarks (`benchmarks/accuracy.py`, `benchmarks/conversation.py`) and `hae eval` run every
prompt through `run_plan`, and compare at equal KV with `equal_kv_comparison`.

No torch at import: the CLI builds a plan before the model loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from hae_cli.errors import ConfigError

BASELINES = ("fastv", "snapkv", "h2o", "streaming", "mustdrop", "random")
# Baselines that trim back to their budget while decoding: with the question fed after the
# images they get the question's rows on top of HAE's kept size, so they never hold less.
DECODE_TRIMMING = ("h2o", "streaming")
FASTV_LAYER = 2  # FastV's K: its first K layers keep the whole prompt


@dataclass(frozen=True)
class Setting:
    """A policy with parameters; a baseline's budget comes from `matched_to` (an HAE setting) per prompt."""

    label: str
    policy: str
    params: dict = field(default_factory=dict)
    matched_to: str | None = None
    crops: int | None = None  # images read at this many crops (the fewer-pixels baseline); None: the run's

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if self.crops is None:  # as before the field existed, so that older runs resume
            del data["crops"]
        return data

    def row_head(self) -> dict:
        """The first columns of a summary row: a matched baseline's parameters are its match."""
        params = self.params if self.matched_to is None else f"matched to {self.matched_to}"
        crops = {} if self.crops is None else {"crops": self.crops}
        return {"setting": self.label, "policy": self.policy, "params": params, **crops}


def parse_list(text: str, cast=str) -> list:
    return [cast(part.strip()) for part in text.split(",") if part.strip()]


def parse_params(text: str, sep: str = ",") -> dict:
    """"visual_keep=0.4,buffer=8" -> {"visual_keep": 0.4, "buffer": 8}."""
    from hae_cli.checks import parse_param_value

    params = {}
    for item in text.split(sep):
        if item.strip():
            key, _, value = item.partition("=")
            key = key.strip()
            if key in params:
                raise ConfigError(f"{key} is given twice in {text!r}; give it once")
            params[key] = parse_param_value(key, value.strip(), key)  # the CLI's -p rule, one for both
    return params


def hae_settings(spec: str) -> list[Setting]:
    """"thr,0.6,thr:r_g=1.5:r_i=0.1" -> threshold mode, visual_keep 0.6, tuned thresholds."""
    settings = []
    for part in parse_list(spec):
        head, *options = part.split(":")
        params: dict = {}
        if head != "thr":
            params["visual_keep"] = float(head)
        own = parse_params(":".join(options), sep=":")
        if "visual_keep" in own and "visual_keep" in params:
            raise ConfigError(f"--budgets {part!r}: visual_keep is given twice ({head} and visual_keep="
                              f"{own['visual_keep']}); give it once")
        params.update(own)
        label = "hae " + ("thr" if head == "thr" else f"vk{head}") + "".join(f" {o}" for o in options)
        settings.append(Setting(label, "hae", params))
    return settings


def shared_params(policy: str, params: dict) -> dict:
    """The part of HAE's parameters that `policy` also takes (mustdrop: Stage 1's filter)."""
    from hae_cli.cache.policies import policy_parameters

    taken = policy_parameters(policy)
    return {k: v for k, v in params.items() if k in taken}


MATCHED_BY_IMAGE_TOKENS = ("mustdrop", "fastv")  # matched to HAE's image tokens kept; the others by budget


def can_be_matched(policy: str) -> bool:
    """Whether `matched_params` can give `policy` HAE's KV: by image tokens kept, or by a budget."""
    from hae_cli.cache.policies import policy_parameters

    return policy in MATCHED_BY_IMAGE_TOKENS or "budget" in policy_parameters(policy)


def matched_params(baseline: str, hae: Setting, hae_outcome, prompt, fastv_layer: int, fed_later: int = 0) -> dict:
    """The budget that gives `baseline` HAE's kept size on this prompt (`fed_later`: prompt
    rows fed after the compressed context, which every policy then holds). `hae_outcome` has
    `held_after_prefill` and `image_after_prefill` (tokens per layer, max over layers);
    `prompt` has `modality` (the prompt's tags, whose image tokens the matching counts)."""
    from hae_cli.cache.modality import Modality

    images = int((prompt.modality == Modality.IMAGE).sum())
    if baseline == "mustdrop":
        # the dual filter keeping as many image tokens as HAE kept: the top by g_j alone
        # (r_i = 1: only the single most attended token is forced)
        kept = max(1, hae_outcome.image_after_prefill)
        return {**shared_params("mustdrop", hae.params), "visual_keep": min(1.0, (kept - 0.5) / max(1, images)), "r_i": 1.0}
    if baseline == "fastv":
        dropped = 1.0 - hae_outcome.image_after_prefill / max(1, images)
        return {"prune_layer": fastv_layer, "drop_ratio": min(1.0, max(0.0, dropped))}
    extra = fed_later if baseline in DECODE_TRIMMING else 0
    return {"budget": max(1, hae_outcome.held_after_prefill) + extra}


# --------------------------------------------------------------------------- plans


def matched_plan(hae: list[Setting], baselines: list[str]) -> list[Setting]:
    """full, the HAE settings, then each baseline matched to each HAE setting."""
    plan = [Setting("full", "full")] + hae
    for setting in hae:
        for baseline in baselines:
            plan.append(Setting(f"{baseline} @{setting.label[4:]}", baseline, matched_to=setting.label))
    return plan


def fewer_crops_settings(crops: list[int]) -> list[Setting]:
    """The full cache with the images read at fewer crops: fewer pixels instead of fewer tokens,
    each at its own KV."""
    return [Setting(f"full @{n} crop{'s' if n != 1 else ''}", "full", crops=n) for n in crops]


def story_plan(hae_params: dict, budgets: list[float], buffer: int, other_prefills: list[Setting] = ()) -> list[Setting]:
    """full; HAE's prefill alone, then with each decode budget beside the baselines at that
    budget; then `other_prefills` (HAE settings) alone, to show what the prefill choice costs."""
    plan = [Setting("full", "full"), Setting("hae (no budget)", "hae", dict(hae_params))]
    for budget in budgets:
        plan += [
            Setting(f"hae B={budget}", "hae", {**hae_params, "budget": budget, "buffer": buffer}),
            Setting(f"mustdrop B={budget}", "mustdrop", {**shared_params("mustdrop", hae_params), "budget": budget, "buffer": buffer}),
            Setting(f"h2o B={budget}", "h2o", {"budget": budget}),
            Setting(f"streaming B={budget}", "streaming", {"budget": budget}),
            Setting(f"snapkv B={budget}", "snapkv", {"budget": budget}),
        ]
    plan += [Setting(s.label + ("" if "budget" in s.params else " (no budget)"), "hae", dict(s.params)) for s in other_prefills]
    return plan


def run_plan(plan: list[Setting], run: Callable[[Setting, dict], object], prompt, fastv_layer: int,
             fed_later: int = 0) -> dict[str, object]:
    """One prompt under every setting of `plan`, in order: `run(setting, params)` with the
    setting's own parameters, or, for a baseline, those that match the outcome of the HAE
    setting it follows (which `plan` runs before it). Outcomes by label."""
    by_label = {s.label: s for s in plan}
    outcomes: dict[str, object] = {}
    for setting in plan:
        params = setting.params
        if setting.matched_to is not None:
            hae = by_label[setting.matched_to]
            params = matched_params(setting.policy, hae, outcomes[hae.label], prompt, fastv_layer, fed_later)
        outcomes[setting.label] = run(setting, params)
    return outcomes


# --------------------------------------------------------------------------- verdicts


def choose_best(rows: list[dict], target_drop: float) -> dict:
    """The HAE row with the largest cut whose drop is within target; else the smallest drop."""
    hae = [r for r in rows if r["policy"] == "hae"]
    within = [r for r in hae if r["drop_points"] <= target_drop]
    if within:
        return max(within, key=lambda r: r["cut_pct"])
    return min(hae, key=lambda r: (r["drop_points"], -r["cut_pct"]))


def equal_kv_comparison(rows: list[dict], hae: list[Setting], baselines: list[str]) -> list[dict]:
    """Per HAE setting: each baseline's accuracy at HAE's KV bytes.

    Budget-matched baselines hold HAE's tokens on every prompt, so their own row is the
    comparison. FastV keeps its first K layers whole, so its cut differs; its accuracy at
    HAE's cut is read off its curve (linear interpolation). Where its curve does not reach
    HAE's cut there is no equal-KV point: the baseline is left out of `hae_at_or_above_all`
    and counts only in the stricter `hae_at_or_above_all_or_nearest`, against the accuracy of
    its nearest point (which holds more KV).
    """
    by_label = {r["setting"]: r for r in rows}
    out = []
    for setting in hae:
        mine = by_label[setting.label]
        entry = {"hae": setting.label, "hae_accuracy": mine["accuracy"], "hae_cut_pct": mine["cut_pct"], "baselines": {}}
        wins = strict_wins = True
        for baseline in baselines:
            row = by_label.get(f"{baseline} @{setting.label[4:]}")
            if row is None:
                continue
            accuracy, how = row["accuracy"], "same budget"
            if abs(row["cut_pct"] - mine["cut_pct"]) > 1.0:
                curve = sorted((r["cut_pct"], r["accuracy"]) for r in rows if r["policy"] == baseline)
                accuracy, how = _interpolate(curve, mine["cut_pct"])
            shown = accuracy
            if accuracy is None:  # outside its curve: compare with the nearest end of it
                end_cut, shown = min(curve, key=lambda point: abs(point[0] - mine["cut_pct"]))
                how = f"never at this cut; nearest point {end_cut:.1f}% at accuracy {shown:.4f}"
            ok = mine["accuracy"] >= shown - 1e-12
            entry["baselines"][baseline] = {
                "accuracy_at_equal_kv": accuracy,
                "compared_accuracy": shown,
                "how": how,
                "hae_at_or_above": ok,
            }
            strict_wins &= ok
            if accuracy is not None:
                wins &= ok
        entry["hae_at_or_above_all"] = wins
        entry["hae_at_or_above_all_or_nearest"] = strict_wins
        out.append(entry)
    return out


def _interpolate(curve: list[tuple[float, float]], x: float) -> tuple[float | None, str]:
    if not curve or x < curve[0][0] or x > curve[-1][0]:
        return None, "outside its curve"
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)), "interpolated on its curve"
    return curve[0][1], "interpolated on its curve"
