"""The cache made visible: pure functions from snapshots to Rich renderables.

Everything here takes plain numbers (`CacheStats`, `EvictionEvent`, `MemorySnapshot`, a
`PanelState`) and returns something Rich can print, so a test renders it with a recording
console and reads the text. `RunWatcher` at the end is the one stateful piece: it turns the
API's callbacks into a `PanelState`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hae_cli.cache.stats import CacheStats, EvictionEvent, LayerStats
from hae_cli.display.images import image_rows, image_table, reserved_by_image
from hae_cli.display.memory import MemorySnapshot
from hae_cli.compare import MODALITIES, ProfileRow, eviction_overhead_percent
from hae_cli.units import cut_percent, format_bytes  # noqa: F401  (callers and tests import them here too)

SHORT_NAMES = {"text": "text", "image": "image", "separator": "sep", "generated": "gen"}

# glyph and colour per bar segment; the glyphs differ so the bar reads without colour too
SEGMENTS = {
    "text": ("█", "blue"),
    "image": ("▓", "magenta"),
    "separator": ("▒", "yellow"),
    "generated": ("▞", "green"),
    "bin": ("░", "red"),
}
EMPTY = ("·", "bright_black")
BUDGET_MARK = ("│", "bold white")
ACTION_STYLES = {"evicted": "red", "binned": "yellow", "restored": "green", "deleted": "bright_red"}


# ----------------------------------------------------------------------------- numbers


def layer_ranges(layers: Iterable[int], total_layers: int | None = None) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7"; every layer of the model -> "all"."""
    ids = sorted(set(layers))
    if total_layers and ids == list(range(total_layers)) and total_layers > 1:
        return "all"
    parts, start, prev = [], None, None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    if len(parts) > 4:
        return f"{len(ids)} layers, {ids[0]}…{ids[-1]}"
    return ",".join(parts)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_counts(counts: dict[str, int]) -> str:
    items = [(m, counts[m]) for m in MODALITIES if counts.get(m)]
    items += [(m, c) for m, c in counts.items() if m not in MODALITIES and c]
    return " · ".join(f"{SHORT_NAMES.get(m, m)} {c}" for m, c in items) or "0"


# ----------------------------------------------------------------------------- layers


def occupancy_bar(layer: LayerStats, scale: int, width: int) -> Text:
    """A stacked bar of `width` cells: text / image / separator / generated, then the bin,
    then empty cells up to the budget (a sliding layer's window, where smaller), with `│`
    inserted where it falls.
    `scale` is the token count the full width stands for (shared by all rows)."""
    scale = max(scale, 1)
    counts = [layer.tokens_by_modality.get(m, 0) for m in MODALITIES] + [layer.bin_tokens]
    names = list(MODALITIES) + ["bin"]
    cells: list[tuple[str, str]] = []
    cumulative = 0
    for name, count in zip(names, counts):
        start = round(cumulative * width / scale)
        cumulative += count
        end = round(cumulative * width / scale)
        cells += [SEGMENTS[name]] * (end - start)
    if layer.limit is not None:
        filled_to = round(min(layer.limit, scale) * width / scale)
        cells += [EMPTY] * max(0, filled_to - len(cells))
        cells.insert(filled_to, BUDGET_MARK)
    cells += [(" ", "")] * (width + 1 - len(cells))
    bar = Text()
    for glyph, style in cells:
        bar.append(glyph, style)
    return bar


def _bar_scale(layers: Sequence[LayerStats]) -> int:
    return max([1] + [max(layer.tokens_held + layer.bin_tokens, layer.limit or 0) for layer in layers])


_LAYER_COLUMNS = ("layer", "held", "budget", "text", "image", "sep", "gen", "bin")


def _numeric_width(layers: Sequence[LayerStats]) -> int:
    """Width of the non-bar columns (with their padding) for these rows."""
    widest = {name: len(name) for name in _LAYER_COLUMNS}
    for layer in layers:
        values = [f"L{layer.layer}", layer.tokens_held, budget_text(layer)]
        values += [layer.tokens_by_modality.get(m, 0) for m in MODALITIES] + [layer.bin_tokens]
        for name, value in zip(_LAYER_COLUMNS, values):
            widest[name] = max(widest[name], len(str(value)))
    return sum(widest.values()) + 2 * (len(_LAYER_COLUMNS) + 1)


def layer_table(layers: Sequence[LayerStats], bar_width: int, scale: int | None = None) -> Table:
    """One compact row per layer: the bar (none if `bar_width` is 0) and the counts it draws."""
    scale = scale if scale is not None else _bar_scale(layers)
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("layer", justify="right", no_wrap=True)
    if bar_width:
        table.add_column("tokens held", no_wrap=True, min_width=bar_width + 1, max_width=bar_width + 1)
    for name in _LAYER_COLUMNS[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for layer in layers:
        by = layer.tokens_by_modality
        table.add_row(
            f"L{layer.layer}",
            *([occupancy_bar(layer, scale, bar_width)] if bar_width else []),
            str(layer.tokens_held),
            budget_text(layer),
            str(by.get("text", 0)),
            str(by.get("image", 0)),
            str(by.get("separator", 0)),
            str(by.get("generated", 0)),
            Text(str(layer.bin_tokens), style="red" if layer.bin_tokens else ""),
        )
    return table


def budget_text(layer: LayerStats) -> str:
    """The budget column: the budget, and a sliding layer's window ("w4096")."""
    budget = str(layer.budget) if layer.budget is not None else "-"
    return budget if layer.window is None else f"{budget} w{layer.window}"


def bar_legend(buffer: int | None = None) -> Text:
    legend = Text()
    for name in (*MODALITIES, "bin"):
        glyph, style = SEGMENTS[name]
        legend.append(glyph, style).append(f" {name}  ")
    legend.append(BUDGET_MARK[0], BUDGET_MARK[1]).append(" budget")
    if buffer:
        legend.append(f" (a layer fills to budget + {buffer}, the buffer, then a round evicts back to it)", style="dim")
    return legend


@dataclass(frozen=True)
class LayerView:
    """Per-layer rows sized to the console: one column of rows, or two side by side when there
    are many layers (32 for Phi-3.5-V) and the console is wide enough for both."""

    stats: CacheStats
    max_bar_width: int = 48
    min_bar_width: int = 10
    buffer: int | None = None  # the policy's: a layer holds up to budget + buffer

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        layers = self.stats.layers
        width = options.max_width
        numeric = _numeric_width(layers)
        scale = _bar_scale(layers)
        two_columns = len(layers) > 16 and (width - 3) // 2 - numeric >= self.min_bar_width + 6
        if two_columns:
            half = (len(layers) + 1) // 2
            bar = min(self.max_bar_width, (width - 3) // 2 - numeric - 1)
            grid = Table.grid(padding=(0, 3))
            grid.add_column()
            grid.add_column()
            grid.add_row(
                layer_table(layers[:half], bar, scale), layer_table(layers[half:], bar, scale)
            )
            yield grid
        elif width - numeric - 1 >= self.min_bar_width:
            yield layer_table(layers, min(self.max_bar_width, width - numeric - 1), scale)
        else:  # too narrow for a bar: the counts alone
            yield layer_table(layers, 0, scale)
            return
        yield bar_legend(self.buffer)


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EventGroup:
    """Events of one step that did the same thing to the same counts, over several layers."""

    step: int
    stage: str
    action: str
    counts: dict[str, int]
    layers: tuple[int, ...]


EVENT_TOKENS = "tokens, in each of those layers"
SUMMED_EVENTS = "eviction, summed over all layers"


def group_events(events: Iterable[EvictionEvent]) -> list[EventGroup]:
    """Fold per-layer events with identical effect into one row ("layers 0-31 evicted image 412")."""
    groups: dict[tuple, list] = {}
    for e in events:
        key = (e.step, e.stage, e.action, tuple(sorted(e.counts.items())))
        groups.setdefault(key, []).append(e.layer)
    return [
        EventGroup(step, stage, action, dict(counts), tuple(layers))
        for (step, stage, action, counts), layers in groups.items()
    ]


def events_table(
    events: Sequence[EvictionEvent], limit: int = 6, total_layers: int | None = None
) -> Table:
    """The last eviction events, oldest first, folded across layers."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for name, justify in (("step", "right"), ("stage", "left"), ("layers", "left"),
                          ("action", "left"), (EVENT_TOKENS, "left")):
        table.add_column(name, justify=justify, no_wrap=name != EVENT_TOKENS)
    groups = group_events(events)[-limit:] if limit else []
    for g in groups:
        table.add_row(
            str(g.step),
            g.stage,
            layer_ranges(g.layers, total_layers),
            Text(g.action, style=ACTION_STYLES.get(g.action, "")),
            format_counts(g.counts),
        )
    if not groups:
        table.add_row("", Text("no eviction yet", style="dim"), "", "", "")
    return table


# ----------------------------------------------------------------------------- the panel


@dataclass
class PanelState:
    """Everything the panel shows at one moment. Filled by `RunWatcher` or `state_from_result`."""

    title: str = ""
    policy: str = ""
    status: str = ""  # "loading model", "prefill", "decoding", "done", "interrupted"
    stats: CacheStats | None = None
    events: list[EvictionEvent] = field(default_factory=list)
    memory: MemorySnapshot | None = None
    image_seconds: float | None = None  # reading and encoding the images
    prefill_seconds: float | None = None  # the model's prefill of the prompt
    decode_seconds: float | None = None
    decode_tokens: int = 0
    tokens_per_second: float | None = None
    eviction_seconds: float | None = None
    kv_bytes_peak: int | None = None
    full_cache_bytes_peak: int | None = None
    prompt_tokens: dict[str, int] | None = None
    text: str = ""
    notes: list[str] = field(default_factory=list)  # what the run capped, or why the answer is empty
    buffer: int | None = None  # the policy's buffer: a layer holds up to budget + buffer
    compile_seconds: float | None = None  # the compiled decode step's warm-up (--compile), not in decode


def kv_line(state: PanelState) -> Text:
    line = Text()
    stats = state.stats
    if stats is None:
        return line.append("waiting for prefill", style="dim")
    held, full = stats.bytes_held, stats.full_cache_bytes
    line.append(format_bytes(held), style="bold").append(" held / ").append(format_bytes(full))
    line.append(" full")
    cut = cut_percent(held, full)
    if cut is not None and abs(cut) >= 0.5:
        line.append(f"  ({-cut:+.0f}%)", style="bold green" if cut > 0 else "")
    elif cut is not None:
        line.append("  (no cut)", style="dim")
    if stats.bin_bytes:
        line.append(f"  bin {format_bytes(stats.bin_bytes)}", style="red")
    if stats.reserve_bytes:
        line.append(f"  reserve {format_bytes(stats.reserve_bytes)}", style="magenta")
    if state.kv_bytes_peak is not None:
        line.append(f"  peak {format_bytes(state.kv_bytes_peak)}")
        if state.full_cache_bytes_peak:
            line.append(f" / {format_bytes(state.full_cache_bytes_peak)}")
    tokens = sum(layer.tokens_held for layer in stats.layers)
    line.append(f"  · {plural(tokens, 'token')} in {plural(len(stats.layers), 'layer')}", style="dim")
    return line


def memory_line(memory: MemorySnapshot | None, kv_allocated: int = 0) -> Text:
    """What the process holds; first the KV cache's storage (its held rows and the room for the
    next ones, up to budget + buffer), when there is one. The rest is the whole process (model,
    images, cache): now, when the snapshot was taken, and at its peak."""
    line = Text()
    if kv_allocated:
        line.append("KV allocated ").append(format_bytes(kv_allocated), style="bold").append(" · ")
    if memory is None:
        return line.append("n/a", style="dim")
    if memory.gpu_process_bytes is not None:
        line.append("GPU ").append(format_bytes(memory.gpu_process_bytes), style="bold")
        line.append(" (this process)")
    if memory.torch_allocated_bytes is not None:
        line.append(" torch allocated " if line else "torch allocated ")
        line.append(format_bytes(memory.torch_allocated_bytes), style="bold")
        if memory.torch_peak_bytes is not None:
            line.append(", peak ").append(format_bytes(memory.torch_peak_bytes), style="bold")
    if memory.has_gpu:
        line.append(" · ")
    line.append("host RSS now ").append(format_bytes(memory.host_rss_bytes), style="bold")
    if memory.host_peak_rss_bytes is not None:
        line.append(", peak ").append(format_bytes(memory.host_peak_rss_bytes), style="bold")
    line.append(" (the whole process)", style="dim")
    if not memory.has_gpu and memory.gpu_note:
        line.append(f"  (GPU: {memory.gpu_note})", style="dim")  # "none" on a machine without one
    return line


def speed_line(state: PanelState) -> Text:
    line = Text()
    if state.image_seconds is not None:
        line.append("images ").append(f"{state.image_seconds * 1000:.0f} ms", style="bold").append(" · ")
    if state.prefill_seconds is None:
        line.append("prefill …", style="dim")
    else:
        line.append("prefill ").append(f"{state.prefill_seconds * 1000:.0f} ms", style="bold")
    line.append(" · decode ")
    if state.tokens_per_second:
        line.append(f"{state.tokens_per_second:.1f} tok/s", style="bold")
    elif state.status in ("done", "interrupted") and state.decode_tokens:
        line.append("not timed", style="dim")  # its one step was the compiled step's first call
    else:
        line.append("…", style="dim")
    line.append(f" · {plural(state.decode_tokens, 'token')}")
    if state.compile_seconds:
        line.append(" · compile warm-up ").append(f"{state.compile_seconds:.1f} s", style="bold")
    if state.eviction_seconds is not None and state.prefill_seconds is not None:
        overhead = eviction_overhead_percent(
            state.policy, state.eviction_seconds, state.prefill_seconds + (state.decode_seconds or 0.0)
        )
        if overhead is not None:
            line.append(f" · eviction overhead {overhead:.1f}%")
    return line


def header_rows(state: PanelState) -> list[tuple[str, Text]]:
    rows = []
    if state.prompt_tokens:
        prompt = Text(f"{sum(state.prompt_tokens.values())} tokens  (")
        prompt.append(format_counts(state.prompt_tokens)).append(")")
        rows.append(("prompt", prompt))
    rows.append(("KV cache", kv_line(state)))
    rows.append(("memory", memory_line(state.memory, state.stats.bytes_allocated if state.stats else 0)))
    rows.append(("speed", speed_line(state)))
    rows += [("note", Text(note, style="yellow")) for note in state.notes]
    return rows


def header_grid(state: PanelState) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for label, value in header_rows(state):
        grid.add_row(label, value)
    return grid


def render_panel(state: PanelState, answer_lines: int | None = None, event_rows: int = 6) -> Group:
    """The full panel: header numbers, the answer so far (its last `answer_lines` lines), the
    last events, one row per layer."""
    return Group(*_header(state), _answer(state, answer_lines), *_cache_parts(state, event_rows))


def render_final(state: PanelState, event_rows: int = 6) -> Group:
    """After a run: the whole answer first, then the events and the layers, and the header last,
    so that its numbers (KV, memory, speed) end on screen however long the answer is."""
    return Group(_answer(state, None), *_cache_parts(state, event_rows), *_header(state))


def render_turn(state: PanelState, event_rows: int = 6) -> Group:
    """Between the turns of a chat: the answer has streamed above it, so the cache (this turn's
    events, per image, per layer) and the header's numbers only."""
    return Group(*_cache_parts(state, event_rows), *_header(state))


@dataclass(frozen=True)
class LivePanel:
    """The panel while a run streams, sized to the terminal so the header stays on screen: the
    answer gets the lines the rest leaves (its tail); on a short terminal the events shrink
    first, then the layers go."""

    state: PanelState
    event_rows: int = 6

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.size.height
        measure = options.update(height=None)
        shrinking = [(rows, True) for rows in sorted({self.event_rows, self.event_rows // 2, 1, 0}, reverse=True)]
        for events, layers in shrinking + [(0, False)]:
            fixed = Group(*_header(self.state), *_cache_parts(self.state, events, layers))
            room = height - len(console.render_lines(fixed, measure, pad=False)) - 3  # answer borders, a spare line
            if room >= 1:
                break
        yield Group(*_header(self.state), _answer(self.state, max(1, room)),
                    *_cache_parts(self.state, events, layers))


def _header(state: PanelState) -> list:
    title = Text(state.title or "hae", style="bold")
    if state.policy:
        title.append(f"  policy {state.policy}", style="cyan")
    if state.status:
        title.append(f"  {state.status}", style="yellow" if state.status != "done" else "green")
    return [title, header_grid(state)]


def _answer(state: PanelState, lines: int | None) -> Panel:
    return Panel(_AnswerView(state.text, lines), title="answer", title_align="left", border_style="bright_black")


def _cache_parts(state: PanelState, event_rows: int, layers: bool = True) -> list:
    total_layers = len(state.stats.layers) if state.stats else None
    parts: list = []
    if event_rows:
        parts += [Text("eviction events", style="bold"), events_table(state.events, event_rows, total_layers)]
    if layers and state.stats is not None:
        images = image_table(state.stats)
        if images is not None:
            parts += [Text("per image (tokens held)", style="bold"), images]
        parts += [Text("per layer", style="bold"), LayerView(state.stats, buffer=state.buffer)]
    return parts


@dataclass(frozen=True)
class _AnswerView:
    text: str
    max_lines: int | None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = Text(self.text or "…", style="" if self.text else "dim")
        if self.max_lines is None:
            yield text
            return
        lines = text.wrap(console, options.max_width)
        if len(lines) > self.max_lines:
            lines = lines[-self.max_lines:]
            yield Text("…", style="dim")
        yield from lines


def render_summary(state: PanelState) -> Group:
    """The plain final summary (no bars), one line per fact (print it with `soft_wrap=True`
    to keep lines whole in logs), for pipes and CI."""
    title = Text(state.title or "hae", style="bold")
    if state.policy:
        title.append(f"  policy {state.policy}")
    if state.status:
        title.append(f"  {state.status}")
    parts = [title]
    for label, value in header_rows(state):
        parts.append(Text(f"{label:<10}", style="bold cyan").append_text(value))
    if state.events:
        actions: dict[str, dict[str, int]] = {}
        for e in state.events:
            bucket = actions.setdefault(f"{e.stage} {e.action}", {})
            for m, c in e.counts.items():
                bucket[m] = bucket.get(m, 0) + c
        line = Text(f"{SUMMED_EVENTS}: ", style="bold")
        line.append("; ".join(f"{k} {format_counts(v)}" for k, v in actions.items()))
        parts.append(line)
    if state.stats is not None:
        reserved = reserved_by_image(state.stats)
        for k, (label, size, fewest, most, last, binned) in enumerate(image_rows(state.stats)):
            held = f"{last} of {size} tokens held at the last layer"
            if fewest != most:
                held += f" ({fewest}-{most} across layers)"
            held += f", {binned} in its bin" if binned else ""
            held += f", {reserved[k]} set aside in the reserve" if k < len(reserved) and reserved[k] else ""
            parts.append(Text(f"{label:<10}", style="bold cyan").append(held))
    return Group(*parts)


def state_from_result(result, title: str = "", memory: MemorySnapshot | None = None) -> PanelState:
    """A `PanelState` for a finished `RunResult` (duck-typed: only its attributes are read)."""
    return PanelState(
        title=title,
        policy=result.policy,
        status="interrupted" if result.interrupted else "done",
        stats=result.steps[-1] if result.steps else None,
        events=list(result.events),
        memory=memory,
        image_seconds=getattr(result, "image_seconds", None),
        prefill_seconds=result.prefill_seconds,
        decode_seconds=result.decode_seconds,
        decode_tokens=result.decode_tokens,
        tokens_per_second=result.tokens_per_second,
        eviction_seconds=result.eviction_seconds,
        kv_bytes_peak=result.kv_bytes_peak,
        full_cache_bytes_peak=result.full_cache_bytes_peak,
        prompt_tokens=dict(result.prompt_tokens),
        text=result.text,
        notes=list(getattr(result, "notes", [])),
        compile_seconds=getattr(result, "compile_seconds", None),
    )


# ----------------------------------------------------------------------------- profile


def compare_table(rows: Sequence[ProfileRow], baseline_name: str = "baseline") -> Table:
    """Policies side by side, one column each; the first row is the reference for cuts."""
    caption = (
        f"means over {rows[0].prompts} prompt(s); tokens kept are per layer at the last step; "
        f"agreement is token for token against {baseline_name}"
        if rows else None
    )
    table = Table(title="profile", caption=caption, header_style="bold", title_justify="left")
    table.add_column("", style="bold cyan", no_wrap=True)
    for row in rows:
        label = row.name if row.name == row.policy else f"{row.name} ({row.policy})"
        table.add_column(label + (" *" if row.interrupted else ""), justify="right")
    base = rows[0] if rows else None

    def add(label: str, cells: list) -> None:
        table.add_row(label, *cells)

    def with_cut(value: float, reference: float) -> str:
        cut = cut_percent(value, reference) if reference else None
        text = format_bytes(value)
        return text if cut is None or abs(cut) < 0.5 else f"{text} ({-cut:+.0f}%)"

    add("KV bytes final", [with_cut(r.kv_bytes_final, base.kv_bytes_final) for r in rows])
    add("KV bytes peak", [with_cut(r.kv_bytes_peak, base.kv_bytes_peak) for r in rows])
    for m in MODALITIES:
        add(f"kept {m}", [f"{r.tokens_kept[m]:.0f}" for r in rows])
    add("prefill ms", [f"{r.prefill_ms:.0f}" for r in rows])
    add("decode tok/s", [f"{r.decode_tokens_per_second:.1f}" for r in rows])
    add("eviction overhead", [
        "-" if r.eviction_overhead_percent is None else f"{r.eviction_overhead_percent:.1f}%"
        for r in rows
    ])
    add("same answer", ["-" if r.same_answers is None else f"{r.same_answers}/{r.prompts}" for r in rows])
    add("token match", [
        "-" if r.token_match_percent is None else f"{r.token_match_percent:.1f}%" for r in rows
    ])
    add("first divergence", [
        "-" if r.same_answers is None else ("none" if r.first_divergence is None else f"token {r.first_divergence}")
        for r in rows
    ])
    if any(r.correct is not None for r in rows):
        add("expected answer", ["-" if r.correct is None else f"{r.correct}/{r.with_answers}" for r in rows])
    return table


# ----------------------------------------------------------------------------- live state


class RunWatcher:
    """Turns the API's callbacks into a `PanelState`, timing prefill and decode on the way.

    Only a display aid: the final numbers come from the `RunResult` (`state_from_result`).
    """

    def __init__(self, state: PanelState, probe=None, probe_interval: float = 0.25,
                 keep_events: int = 256, clock=time.perf_counter):
        self.state = state
        self.probe = probe
        self.probe_interval = probe_interval
        self.keep_events = keep_events
        self.clock = clock
        self._started = clock()
        self._prefill_started: float | None = None
        self._decode_started: float | None = None
        self._last_probe = float("-inf")

    def start(self) -> None:
        """Call just before `run()`: reading the images counts from here."""
        self._started = self.clock()
        self.state.status = "reading images"
        self.sample_memory(force=True)

    def on_prefill(self) -> None:
        """The images are read and encoded; the model's prefill starts now."""
        now = self.clock()
        self.state.image_seconds = now - self._started
        self._prefill_started = now
        self.state.status = "prefill"

    def on_progress(self, message: str) -> None:
        self.state.status = message

    def on_compile(self, seconds: float | None) -> None:
        """The compiled decode step's warm-up: starting (None), or done after `seconds` (which
        then do not count as decoding)."""
        if seconds is None:
            self.state.status = "compiling the decode step (warm-up)"
            return
        self.state.status = "decoding"
        self.state.compile_seconds = seconds or None
        if self._decode_started is not None:
            self._decode_started += seconds

    def on_token(self, piece: str) -> None:
        self.state.text += piece

    def on_step(self, stats: CacheStats) -> None:
        now = self.clock()
        state = self.state
        state.stats = stats
        if stats.events:
            state.events = (state.events + list(stats.events))[-self.keep_events:]
        if stats.step == 0 or self._decode_started is None:
            state.prefill_seconds = now - (self._started if self._prefill_started is None else self._prefill_started)
            self._decode_started = now
            state.status = "decoding"
        else:
            state.decode_tokens = stats.step
            state.decode_seconds = now - self._decode_started
            if state.decode_seconds > 0:
                state.tokens_per_second = stats.step / state.decode_seconds
        self.sample_memory()

    def sample_memory(self, force: bool = False) -> None:
        now = self.clock()
        if self.probe is not None and (force or now - self._last_probe >= self.probe_interval):
            self.state.memory = self.probe.snapshot()
            self._last_probe = now
