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
    text = console.export_text()
    assert "image 1" in text and "61-313" in text and "19" in text  # 61 of 313 = 19%
    assert "image 2" in text and "120-313" in text and "38" in text


def test_no_images_no_table():
    assert image_table(CacheStats(0, [layer(0, ())], 0)) is None
