"""The per-image view renders what the snapshot says, image by image."""

from rich.console import Console

from hae_cli.cache.stats import CacheStats, LayerStats
from hae_cli.display.images import image_rows, image_table


def layer(i, by_image, binned=(0, 0)):
    held = sum(by_image) + 20
    return LayerStats(i, {"text": 20, "image": sum(by_image), "separator": 0, "generated": 0}, held, None,
                      sum(binned), held * 64, 0, list(by_image), list(binned))


def test_rows_and_table_per_image():
    stats = CacheStats(1, [layer(0, (313, 313)), layer(1, (61, 120), (3, 0)), layer(2, (61, 120), (4, 1))], 0,
                       image_sizes=[313, 313])
    assert image_rows(stats) == [("image 1", 313, 61, 313, 61, 4), ("image 2", 313, 120, 313, 120, 1)]
    console = Console(record=True, width=80)
    console.print(image_table(stats))
    lines = console.export_text().splitlines()
    assert lines[0].split() == ["image", "slots", "L0", "L1", "L2", "kept", "%", "bin"]
    assert lines[1].split() == ["image", "1", "313", "313", "61", "61", "19", "4"]  # 61 of 313 = 19%
    assert lines[2].split() == ["image", "2", "313", "313", "120", "120", "38", "1"]


def test_deep_models_get_a_range_per_image():
    layers = [layer(i, (313 if i == 0 else 61,)) for i in range(12)]
    console = Console(record=True, width=80)
    console.print(image_table(CacheStats(1, layers, 0, image_sizes=[313])))
    lines = console.export_text().splitlines()
    assert "held (layers)" in lines[0] and "L11" not in lines[0]
    assert lines[1].split() == ["image", "1", "313", "61-313", "61", "19", "0"]


def test_no_images_no_table():
    assert image_table(CacheStats(0, [layer(0, ())], 0)) is None


def test_a_conversations_reserve_gets_its_own_column_and_nothing_else_does():
    last = LayerStats(1, {"text": 20, "image": 181, "separator": 0, "generated": 0}, 201, None, 5, 201 * 64, 0,
                      [61, 120], [4, 1], reserve_tokens=445, reserve_by_image=[252, 193])
    stats = CacheStats(1, [layer(0, (313, 313)), last], 0, image_sizes=[313, 313])
    console = Console(record=True, width=80)
    console.print(image_table(stats))
    lines = console.export_text().splitlines()
    assert lines[0].split() == ["image", "slots", "L0", "L1", "kept", "%", "bin", "reserve"]
    assert lines[1].split() == ["image", "1", "313", "313", "61", "19", "4", "252"]
    assert lines[2].split() == ["image", "2", "313", "313", "120", "38", "1", "193"]


def test_the_summary_line_of_an_image_says_what_its_reserve_holds():
    from hae_cli.display.panel import PanelState, render_summary

    last = LayerStats(1, {"text": 20, "image": 181, "separator": 0, "generated": 0}, 201, None, 5, 201 * 64, 0,
                      [61, 120], [4, 0], reserve_tokens=252, reserve_by_image=[252, 0])
    stats = CacheStats(1, [layer(0, (313, 313)), last], 0, image_sizes=[313, 313])
    console = Console(record=True, width=120)
    console.print(render_summary(PanelState(title="chat", policy="hae", status="done", stats=stats)))
    lines = [line for line in console.export_text().splitlines() if line.startswith("image")]
    assert lines == ["image 1   61 of 313 tokens held at the last layer (61-313 across layers), 4 in its bin, "
                     "252 set aside in the reserve",
                     "image 2   120 of 313 tokens held at the last layer (120-313 across layers)"]
