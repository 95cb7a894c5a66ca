"""The HTML report in a real browser (headless Chromium): it renders with no console message, every figure
has a size, the page fits a 1400 px window (wide tables scroll in their own box), and it can be screenshot.
Skipped, with the reason, where Chromium is not installed (CI installs it: .ci/run)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import normsurgeon as ns

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.py"
spec = importlib.util.spec_from_file_location("docs_screenshot", SCRIPT)
browser = importlib.util.module_from_spec(spec)
spec.loader.exec_module(browser)

pytestmark = pytest.mark.skipif(browser.chromium() is None,
                                reason="Chromium is not installed (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    """A report with every part: a converted model against its reference, a batch sweep, flags of three kinds
    (degenerate: timm's zero-γ blocks; collapse; noisy statistics), and a layers table wider than the window."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = ns.diagnose(original, x, batch_sizes=[2, 8], max_batches=6, data_source="random test images")
    converted = ns.diagnose(ns.convert(original, to="ln"), x, reference=original, data_source="random test images")
    folder = tmp_path_factory.mktemp("report")
    return report.save(folder / "bn")[0], converted.save(folder / "ln")[0]


def test_report_renders_in_chromium(report_html, tmp_path):
    for html in report_html:
        found = browser.probe(html)
        assert not found["errors"] and not found["console"], (found["errors"], found["console"])
        names = {f["alt"] for f in found["figures"]}
        assert {"power figure", "flags figure"} <= names
        for figure in found["figures"]:
            assert min(figure["natural"]) > 0 and min(figure["shown"]) > 0, figure
        assert found["page_width"] <= found["window_width"] == browser.WIDTH  # nothing cut off or widening the page
        assert any(box["scroll"] > box["client"] for box in found["boxes"])  # the wide layers table scrolls inside
        png = tmp_path / f"{html.parent.name}.png"
        assert browser.screenshot(html, png, height=1200) == []
        from PIL import Image

        with Image.open(png) as image:
            assert image.size == (browser.WIDTH, 1200)
            assert len(set(image.convert("L").resize((64, 64)).getdata())) > 8  # not a blank page
    assert "batch_sweep figure" in {f["alt"] for f in browser.probe(report_html[0])["figures"]}
