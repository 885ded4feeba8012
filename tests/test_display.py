"""The panel, the memory probe and the plot, on hand-made snapshots (no model, no torch)."""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass, field

import pytest
from rich.console import Console

from hae_cli.cache.stats import CacheStats, EvictionEvent, LayerStats
from hae_cli.display.memory import MemoryProbe, MemorySnapshot
from hae_cli.display.panel import (
    LayerView,
    PanelState,
    RunWatcher,
    compare_table,
    events_table,
    format_bytes,
    group_events,
    layer_ranges,
    layer_table,
    occupancy_bar,
    render_panel,
    render_summary,
    state_from_result,
)
from hae_cli.errors import HaeError
from hae_cli.compare import summarize
from hae_cli.evaluation.metrics import holds_answer, token_match

BYTES_PER_TOKEN = 2 * 4 * 16 * 4  # K+V x kv_heads x head_dim x float32


def layer(i: int, text: int, image: int, sep: int, gen: int, budget: int | None = 400, bin_tokens: int = 0):
    held = text + image + sep + gen
    return LayerStats(
        layer=i,
        tokens_by_modality={"text": text, "image": image, "separator": sep, "generated": gen},
        tokens_held=held,
        budget=budget,
        bin_tokens=bin_tokens,
        bytes_held=held * BYTES_PER_TOKEN,
        bin_bytes=bin_tokens * BYTES_PER_TOKEN,
        bytes_allocated=(budget or held) * BYTES_PER_TOKEN,
    )


def known_stats(n_layers: int = 32, step: int = 7) -> CacheStats:
    """Layer i holds 40 text, 300 - 5i image, 12 separator, 20 generated; bins of 0/10/20."""
    layers = [layer(i, 40, 300 - 5 * i, 12, 20, bin_tokens=(i % 3) * 10) for i in range(n_layers)]
    events = [EvictionEvent(0, i, "prefill", "evicted", {"image": 700}) for i in range(n_layers)]
    events += [EvictionEvent(step, i, "decode", "binned", {"image": 30, "text": 2}) for i in (1, 2, 3)]
    events += [EvictionEvent(step, 3, "decode", "restored", {"image": 1})]
    return CacheStats(step, layers, full_cache_bytes=800 * n_layers * BYTES_PER_TOKEN, events=events)


LAYER_ROW = re.compile(r"L(\d+)\s+\S.*?\s(\d+)\s+(\d+|-)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)(?=\s|$)")


def layer_rows(text: str) -> dict[int, tuple[int, ...]]:
    """{layer: (held, budget, text, image, sep, gen, bin)} read back from rendered text."""
    rows = {}
    for line in text.splitlines():
        for match in LAYER_ROW.finditer(line):
            values = match.groups()
            rows[int(values[0])] = tuple(int(v) if v != "-" else -1 for v in values[1:])
    return rows


def render(renderable, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def expected_row(stats: LayerStats) -> tuple[int, ...]:
    by = stats.tokens_by_modality
    return (stats.tokens_held, stats.budget, by["text"], by["image"], by["separator"], by["generated"], stats.bin_tokens)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("width", [100, 200])
def test_panel_shows_one_row_per_layer_with_its_counts(width):
    stats = known_stats()
    state = PanelState(title="ask: cat.png", policy="hae", stats=stats, events=stats.events, text="A red circle.")
    text = render(render_panel(state), width)
    rows = layer_rows(text)
    assert sorted(rows) == list(range(32))
    for one in stats.layers:
        assert rows[one.layer] == expected_row(one)
    if width == 100:  # narrow: one layer per line
        assert sum(1 for line in text.splitlines() if re.match(r"\s*L\d+\s", line)) == 32
    else:  # wide: two columns of 16
        assert sum(1 for line in text.splitlines() if len(re.findall(r"\bL\d+\b", line)) == 2) == 16


def test_few_layers_stay_in_one_column_and_lines_fit_the_width():
    stats = known_stats(n_layers=4)
    text = render(LayerView(stats), 200)
    assert sorted(layer_rows(text)) == [0, 1, 2, 3]
    for width in (60, 80, 120):
        assert all(len(line) <= width for line in render(LayerView(known_stats()), width).splitlines())


def test_bar_is_stacked_in_modality_order_with_the_budget_mark():
    stats = layer(0, text=10, image=20, sep=0, gen=10, budget=50, bin_tokens=5)
    bar = occupancy_bar(stats, scale=50, width=50).plain
    assert bar == "█" * 10 + "▓" * 20 + "▞" * 10 + "░" * 5 + "·" * 5 + "│"
    no_budget = occupancy_bar(layer(0, 5, 5, 0, 0, budget=None), scale=20, width=20).plain
    assert no_budget.startswith("█" * 5 + "▓" * 5) and "│" not in no_budget and len(no_budget) == 21


def test_bar_over_budget_between_rounds_keeps_the_mark_inside():
    bar = occupancy_bar(layer(0, 0, 0, 0, 60, budget=40), scale=60, width=30).plain
    assert len(bar) == 31 and bar.index("│") == 20


def test_a_sliding_layer_shows_its_window_and_the_bar_marks_what_it_can_hold():
    import dataclasses

    sliding = dataclasses.replace(layer(0, 0, 0, 0, 4, budget=None), window=5)
    bar = occupancy_bar(sliding, scale=20, width=20).plain
    assert bar.index("│") == 4  # window - 1 tokens, the most it keeps after a step
    global_layer = layer(1, 0, 0, 0, 20, budget=None)
    table = render(layer_table([sliding, global_layer], bar_width=20), 120)
    assert re.search(r"L0 .*\s- w5\s", table) and not re.search(r"L1 .* w", table)
    bounded = dataclasses.replace(layer(2, 0, 0, 0, 3, budget=3), window=5)
    assert occupancy_bar(bounded, scale=20, width=20).plain.index("│") == 3  # the budget, where smaller


# ----------------------------------------------------------------------------- events


def test_events_fold_across_layers_and_show_actions():
    stats = known_stats()
    groups = group_events(stats.events)
    assert [(g.stage, g.action, g.layers) for g in groups] == [
        ("prefill", "evicted", tuple(range(32))),
        ("decode", "binned", (1, 2, 3)),
        ("decode", "restored", (3,)),
    ]
    text = render(events_table(stats.events, total_layers=32))
    assert re.search(r"0\s+prefill\s+all\s+evicted\s+image 700", text)
    assert re.search(r"7\s+decode\s+1-3\s+binned\s+text 2 · image 30", text)
    assert re.search(r"7\s+decode\s+3\s+restored\s+image 1", text)
    assert "no eviction yet" in render(events_table([]))


def test_layer_ranges():
    assert layer_ranges([0, 1, 2, 3, 7]) == "0-3,7"
    assert layer_ranges(range(32), 32) == "all"
    assert layer_ranges([5]) == "5"
    assert layer_ranges(range(0, 32, 2)).startswith("16 layers")


def test_header_shows_cut_memory_and_speed():
    stats = known_stats()
    memory = MemorySnapshot(host_rss_bytes=3 * 2**30, gpu_note="NVML unavailable (no driver)",
                            host_peak_rss_bytes=5 * 2**30)
    state = PanelState(stats=stats, memory=memory, prefill_seconds=0.8125, tokens_per_second=12.34,
                       decode_tokens=7, text="")
    text = render(render_panel(state))
    held, full = stats.bytes_held, stats.full_cache_bytes
    assert f"{format_bytes(held)} held / {format_bytes(full)} full" in text
    assert f"({-100 * (1 - held / full):+.0f}%)" in text
    assert f"KV allocated {format_bytes(stats.bytes_allocated)} · host RSS now 3.0 GiB, peak 5.0 GiB" in text
    assert "(the whole process)" in text and "NVML unavailable" in text
    full_cache = CacheStats(0, stats.layers, full_cache_bytes=stats.bytes_held)
    assert "(no cut)" in render(render_panel(PanelState(stats=full_cache)))
    assert "prefill 812 ms" in text and "12.3 tok/s" in text
    gpu = MemorySnapshot(host_rss_bytes=2**20, gpu_process_bytes=5 * 2**30, torch_allocated_bytes=4 * 2**30)
    assert "GPU 5.0 GiB (this process) torch allocated 4.0 GiB · host RSS now 1.0 MiB" in render(
        render_panel(PanelState(memory=gpu)))


def test_live_answer_is_cut_to_its_tail():
    state = PanelState(text=" ".join(f"word{i}" for i in range(400)))
    text = render(render_panel(state, answer_lines=3), 80)
    assert "word399" in text and "word0 " not in text and "…" in text
    assert "word0 " in render(render_panel(state), 80)


# ----------------------------------------------------------------------------- results


@dataclass
class FakeResult:
    """The attributes of `api.RunResult` that the display reads."""

    policy: str = "hae"
    text: str = "A red circle."
    token_ids: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    prompt_tokens: dict[str, int] = field(default_factory=lambda: {"text": 30, "image": 600, "separator": 12})
    prefill_seconds: float = 0.5
    decode_seconds: float = 2.0
    eviction_seconds: float = 0.05
    decode_tokens: int = 4
    speed_tokens: int = 4  # the decode tokens decode_seconds covers
    tokens_per_second: float = 2.0
    steps: list[CacheStats] = field(default_factory=lambda: [known_stats(4, 0), known_stats(4, 4)])
    events: list[EvictionEvent] = field(default_factory=lambda: known_stats(4).events)
    kv_bytes_final: int = 1000
    kv_bytes_peak: int = 1200
    full_cache_bytes_final: int = 2000
    full_cache_bytes_peak: int = 2000
    interrupted: bool = False


def test_summary_of_a_result():
    state = state_from_result(FakeResult(), "ask: cat.png")
    text = render(render_summary(state))
    assert "ask: cat.png  policy hae  done" in text
    assert "642 tokens" in text and "image 600" in text
    assert "prefill 500 ms" in text and "2.0 tok/s" in text and "eviction overhead 2.0%" in text
    assert "peak 1.2 KiB / 2.0 KiB" in text
    assert "prefill evicted image 2800" in text and "decode binned text 6 · image 90" in text
    assert state_from_result(FakeResult(interrupted=True)).status == "interrupted"


def test_expected_answers_are_matched_as_whole_words():
    assert holds_answer("The shape is Red.", "red") and holds_answer("a light blue circle", "light blue")
    assert not holds_answer("reddish", "red") and not holds_answer("anything", "")
    rows = summarize("hae", [FakeResult(text="red"), FakeResult(text="blue")], expected=["red", None])
    assert (rows.correct, rows.with_answers) == (1, 1)


def test_agreement():
    assert token_match([1, 2, 3], [1, 2, 3]) == (True, 100.0, None)
    assert token_match([1, 2, 3, 4], [1, 9, 3, 4]) == (False, 75.0, 1)
    assert token_match([1, 2, 3, 4], [1, 2]) == (False, 50.0, 2)
    assert token_match([], []) == (True, 100.0, None)


def test_profile_table_side_by_side():
    base = [FakeResult(policy="full", kv_bytes_final=2000, kv_bytes_peak=2000, eviction_seconds=0.0)] * 2
    hae = [FakeResult(), FakeResult(token_ids=[1, 2, 9, 9])]
    rows = [summarize("baseline", base), summarize("hae", hae, base)]
    assert rows[1].same_answers == 1 and rows[1].token_match_percent == 75.0 and rows[1].first_divergence == 2
    assert rows[1].decode_tokens_per_second == 2.0 and rows[1].eviction_overhead_percent == pytest.approx(2.0)
    text = render(compare_table(rows), 140)
    assert re.search(r"baseline \(full\)\s+┃\s+hae", text)
    assert re.search(r"KV bytes final\s+│\s+2.0 KiB\s+│\s+1000 B \(-50%\)", text)
    assert re.search(r"same answer\s+│\s+-\s+│\s+1/2", text)
    assert re.search(r"first divergence\s+│\s+-\s+│\s+token 2", text)
    assert rows[1].to_json()["tokens_kept"]["image"] == pytest.approx(292.5)


def started_watcher() -> tuple[PanelState, RunWatcher, list[float]]:
    """A watcher on a hand-set clock (`now[0]`), started at 0."""
    now = [0.0]
    state = PanelState()
    watcher = RunWatcher(state, probe=None, clock=lambda: now[0])
    watcher.start()
    return state, watcher, now


def test_watcher_times_prefill_and_decode():
    state, watcher, now = started_watcher()
    now[0] = 0.5
    watcher.on_step(known_stats(2, 0))
    for step in (1, 2, 3, 4):
        now[0] += 0.25
        watcher.on_token("ab")
        watcher.on_step(known_stats(2, step))
    assert state.prefill_seconds == 0.5 and state.tokens_per_second == pytest.approx(4.0)
    assert state.text == "abababab" and state.stats.step == 4
    assert len(state.events) == 5 * len(known_stats(2).events)


# ----------------------------------------------------------------------------- memory


def fake_pynvml(init_error: bool = False, processes=None, query_error: bool = False):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError("Driver Not Loaded")

    def running(handle):
        if query_error:
            raise NVMLError("GPU is lost")
        return processes.get(handle, [])

    module.NVMLError = NVMLError
    module.nvmlInit = init
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: len(processes or {})
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetComputeRunningProcesses = running
    return module


def test_memory_without_nvml_library_is_host_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with MemoryProbe() as probe:
        snap = probe.snapshot()
    assert snap.host_rss_bytes > 0 and not snap.has_gpu and snap.gpu_process_bytes is None
    assert "not installed" in snap.gpu_note


def test_memory_when_nvml_init_fails_is_host_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=True))
    snap = MemoryProbe().snapshot()
    assert snap.host_rss_bytes > 0 and snap.gpu_process_bytes is None
    assert snap.gpu_note == "NVML unavailable (Driver Not Loaded)"


def test_memory_on_this_machine_never_raises():
    with MemoryProbe() as probe:
        assert probe.snapshot().host_rss_bytes > 0


def test_memory_sums_this_process_over_gpus(monkeypatch):
    import os

    me, other = os.getpid(), os.getpid() + 1
    def proc(pid, used):
        return types.SimpleNamespace(pid=pid, usedGpuMemory=used)

    processes = {0: [proc(me, 100), proc(other, 999)], 1: [proc(me, 50)]}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(processes=processes))
    assert MemoryProbe().snapshot().gpu_process_bytes == 150


def test_memory_query_failure_degrades(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(processes={0: []}, query_error=True))
    probe = MemoryProbe()
    snap = probe.snapshot()
    assert snap.gpu_process_bytes is None and "GPU is lost" in snap.gpu_note
    assert probe.snapshot().gpu_process_bytes is None  # stays off, no repeated failures


# ----------------------------------------------------------------------------- plot


def test_plot_writes_a_png(tmp_path):
    from hae_cli.display.plot import occupancy_series, plot_occupancy

    steps = [known_stats(4, s) for s in range(5)]
    x, mean, low, high = occupancy_series(steps)
    assert x == [0, 1, 2, 3, 4] and low[0] == 357 and high[0] == 372
    path = plot_occupancy({"baseline": steps, "hae": steps[:3]}, tmp_path / "occ.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def per_image_stats(step: int, held: int, by_image: list[int], sizes: list[int], n_layers: int = 2) -> CacheStats:
    """`held` tokens in each layer; layer i holds `by_image[k] + i` of image k+1."""
    layers = [LayerStats(i, {"text": held}, held + i, None, 0, held * BYTES_PER_TOKEN, 0,
                         tokens_by_image=[n + i for n in by_image], bin_by_image=[0] * len(by_image))
              for i in range(n_layers)]
    return CacheStats(step, layers, 0, image_sizes=sizes)


def profile_figure(title: str = "tokens held per layer, the prompt: story a.png, b.png", steps: int = 3):
    from hae_cli.display.plot import occupancy_figure

    runs = {
        "baseline": [per_image_stats(s, 1300 + s, [313, 313], [313, 313]) for s in range(steps)],
        "hae": [per_image_stats(s, 200 + s, [60, 70], [313, 313]) for s in range(steps)],
        "snapkv": [per_image_stats(s, 210 + s, [90, 40], [313, 313]) for s in range(steps)],
    }
    return occupancy_figure(runs, title), runs


def test_plot_puts_the_full_cache_apart_so_compressed_policies_get_their_own_scale():
    figure, _ = profile_figure()
    lines, top = figure.axes[0], figure.axes[1]
    assert [line.get_label() for line in top.lines] == ["baseline"]
    assert [line.get_label() for line in lines.lines] == ["hae", "snapkv"]
    assert lines.get_ylim()[1] < 400 and top.get_ylim()[0] > 1000  # neither scale squashes the other
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in top.lines + lines.lines}
    assert len({c for c, _, _ in styles}) == 3 and len({m for _, _, m in styles}) == 3


def test_plot_steps_are_whole_numbers_even_for_a_three_step_run():
    figure, _ = profile_figure()
    figure.canvas.draw()
    low, high = figure.axes[0].get_xlim()
    ticks = [t for t in figure.axes[0].get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_a_two_step_run_is_drawn_per_layer_on_whole_numbers():
    """Two points (a one-token answer) are no curve: tokens held per layer, a bar per policy."""
    figure, _ = profile_figure(steps=2)
    figure.canvas.draw()
    layers = figure.axes[0]
    assert "layer" in layers.get_xlabel() and len(layers.patches) == 3 * 2
    for ticks, (low, high) in ((layers.get_xticks(), layers.get_xlim()), (layers.get_yticks(), layers.get_ylim())):
        shown = [t for t in ticks if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown)


def test_plot_bars_are_the_tokens_each_policy_holds_of_each_image():
    figure, runs = profile_figure()
    bars = figure.axes[2]
    heights = {c.get_label(): [round(p.get_height(), 6) for p in c.patches] for c in bars.containers}
    assert heights == {"hae": [60.5, 70.5], "snapkv": [90.5, 40.5]}  # mean over layers (i adds i)
    assert [t.get_text() for t in bars.get_xticklabels()] == ["image 1", "image 2"]


def test_plot_title_wraps_inside_the_figure():
    title = "tokens held per layer, the prompt: story " + ", ".join(f"easyvqa_test_{i:04d}.png" for i in range(8))
    figure, _ = profile_figure(title)
    figure.canvas.draw()
    box = figure._suptitle.get_window_extent(figure.canvas.get_renderer())
    assert "\n" in figure._suptitle.get_text() and "easyvqa_test_0007.png" in figure._suptitle.get_text()
    assert 0 <= box.x0 and box.x1 <= figure.bbox.width and box.y1 <= figure.bbox.height


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    from hae_cli.display.plot import plot_occupancy

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(HaeError, match=r"pip install 'hae-cli\[plot\]'"):
        plot_occupancy({"hae": [known_stats(2)]}, tmp_path / "x.png")


def test_plot_into_a_missing_folder_is_a_one_line_error(tmp_path):
    from hae_cli.display.plot import plot_occupancy

    with pytest.raises(HaeError, match="does not exist"):
        plot_occupancy({"hae": [known_stats(2)]}, tmp_path / "nope" / "x.png")


# ----------------------------------------------------------------------------- issue 16: what a user sees


def long_state(n_layers: int = 4) -> PanelState:
    return PanelState(title="ask: cat.png", policy="hae", status="decoding", stats=known_stats(n_layers),
                      events=list(known_stats(n_layers).events), prefill_seconds=0.2, decode_seconds=1.0,
                      decode_tokens=300, tokens_per_second=300.0, eviction_seconds=0.01,
                      text="word " * 3000, buffer=32)


def render_height(renderable, width: int, height: int) -> list[str]:
    console = Console(record=True, width=width, height=height, color_system=None, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text().rstrip("\n").splitlines()


@pytest.mark.parametrize("width, height", [(120, 40), (80, 24), (50, 15), (40, 10)])
def test_the_live_panel_fits_the_terminal_with_the_header_on_top(width, height):
    from hae_cli.display.panel import LivePanel

    lines = render_height(LivePanel(long_state()), width, height)
    assert len(lines) <= max(height, 12), (len(lines), height)  # 12: header + one answer line, at the least
    top = "\n".join(lines[:8])
    assert "ask: cat.png" in lines[0] and "KV cache" in top and "memory" in top and "speed" in top
    assert "word" in "\n".join(lines)


def test_after_a_long_answer_the_header_ends_on_screen():
    from hae_cli.display.panel import render_final

    lines = render_height(render_final(long_state()), 100, 30)
    assert "word " * 5 in "\n".join(lines[:5])  # the answer, whole, first
    assert lines[-1].lstrip().startswith("speed") and any("KV cache" in line for line in lines[-8:])


def test_prefill_is_the_models_prefill_live_and_at_the_end():
    """Reading and encoding the images is shown apart ("images"), while running and at the end."""
    state, watcher, now = started_watcher()
    now[0] = 3.4
    watcher.on_prefill()
    now[0] = 6.2
    watcher.on_step(known_stats(2, 0))
    assert state.image_seconds == pytest.approx(3.4) and state.prefill_seconds == pytest.approx(2.8)
    live = render(render_panel(state))
    result = types.SimpleNamespace(policy="hae", interrupted=False, steps=[known_stats(2, 0)], events=[],
                                   image_seconds=3.4, prefill_seconds=2.8, decode_seconds=0.0, decode_tokens=0,
                                   tokens_per_second=0.0, eviction_seconds=0.0, kv_bytes_peak=1,
                                   full_cache_bytes_peak=1, prompt_tokens={"text": 1}, text="", notes=[])
    final = render(render_summary(state_from_result(result)))
    for text in (live, final):
        assert "images 3400 ms" in text and "prefill 2800 ms" in text


def test_one_count_of_tokens_and_plural_words():
    state = long_state()
    state.decode_tokens = 1
    text = render(render_panel(state, answer_lines=2))
    assert "step 7" not in text.splitlines()[0]  # the title shows no second count
    assert "1 token " in text or text.rstrip().endswith("1 token") or "1 token ·" in text
    assert "1 tokens" not in text


def test_event_counts_say_per_layer_or_summed():
    state = long_state()
    panel = render(render_panel(state, answer_lines=2), width=160)
    assert "tokens, in each of those layers" in panel
    summary = render(render_summary(state), width=160)
    assert "eviction, summed over all layers: prefill evicted image 2800" in summary  # 700 in each of 4


def test_a_cpu_machine_says_gpu_none(monkeypatch):
    from hae_cli.display.panel import memory_line

    module = fake_pynvml()

    class NVMLError_LibraryNotFound(module.NVMLError):
        pass

    def init():
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    module.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    module.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", module)
    snap = MemoryProbe().snapshot()
    assert snap.gpu_note == "none" and "(GPU: none)" in memory_line(snap).plain
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(processes={}))  # NVML works, no device
    assert MemoryProbe().snapshot().gpu_note == "none"


def test_the_budget_legend_says_layers_hold_up_to_budget_plus_buffer():
    assert "budget + 32" in render(LayerView(known_stats(4), buffer=32))


def test_the_full_cache_shows_no_eviction_overhead():
    rows = [summarize(name, [types.SimpleNamespace(
        policy=policy, decode_seconds=1.0, decode_tokens=10, speed_tokens=10, steps=[known_stats(2)], token_ids=[1, 2], text="a",
        prefill_seconds=0.5, eviction_seconds=0.2, kv_bytes_final=1, kv_bytes_peak=1, full_cache_bytes_final=1,
        full_cache_bytes_peak=1, interrupted=False)]) for name, policy in (("baseline", "full"), ("hae", "hae"))]
    assert rows[0].eviction_overhead_percent is None and rows[1].eviction_overhead_percent == pytest.approx(100 * 0.2 / 1.5)
    assert re.search(r"eviction overhead\s+│\s+-\s+│\s+13\.3%", render(compare_table(rows)))


def test_the_plot_has_whole_steps_and_a_distinct_style_per_policy():
    from hae_cli.display.plot import occupancy_figure

    steps = [known_stats(4, s) for s in range(7)]
    figure = occupancy_figure({name: steps for name in ("baseline", "hae", "snapkv", "h2o", "streaming")})
    axes = figure.axes[0]  # the compressed policies; the full cache (baseline) has the panel above
    styles = [(line.get_linestyle(), line.get_marker()) for line in axes.get_lines() + figure.axes[1].get_lines()]
    assert len(styles) == 5 and len(set(styles)) == 5  # identical lines, told apart by style
    figure.canvas.draw()
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
