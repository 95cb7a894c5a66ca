"""A report in a real browser: headless Chromium renders ``report.html``; its figures are measured and it is
screenshot. ``tests/test_report_browser.py`` uses the functions; run as a script, it makes the screenshot in
docs/ (the embedded EfficientNet-Lite0 on 152 photo crops at batch 2 and 32, as the demo diagnoses it):

    .venv/bin/python docs/screenshot.py            # → out/docs_report/report.html, docs/report.png

Needs the ``chromium`` executable (Debian: ``apt-get install chromium``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTH = 1400
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || ('failed to load ' + (e.target.alt || e.target.src || e.type)).slice(0, 200))), true);
window.addEventListener('load', () => {
  const figures = [...document.querySelectorAll('figure img')].map(i => ({alt: i.alt, natural: [i.naturalWidth, i.naturalHeight], shown: [i.clientWidth, i.clientHeight]}));
  const boxes = [...document.querySelectorAll('.scroll')].map(d => ({client: d.clientWidth, scroll: d.scrollWidth}));
  const out = {figures, boxes, page_width: document.documentElement.scrollWidth, page_height: document.documentElement.scrollHeight, window_width: window.innerWidth, errors: window.__errors};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _console(stderr: str) -> list[str]:
    """Messages the page wrote to the console (Chromium logs them as CONSOLE lines)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def probe(html: Path, width: int = WIDTH) -> dict:
    """Load a copy of ``html`` with a measuring script: figure sizes, table boxes, page width, errors."""
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "probe.html"
        page.write_text(html.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
        done = subprocess.run([chromium(), *FLAGS, f"--window-size={width},1000", "--virtual-time-budget=10000",
                               "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    if not found:
        raise RuntimeError(f"the page did not finish loading in Chromium: {done.stderr[-2000:]}")
    result = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    result["console"] = _console(done.stderr)
    return result


def screenshot(html: Path, png: Path, width: int = WIDTH, height: int | None = None) -> list[str]:
    """Screenshot the page as it is (no script added) at ``width`` × ``height`` (default: the whole page);
    returns the console messages."""
    height = height or probe(html, width)["page_height"]
    png.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([chromium(), *FLAGS, f"--window-size={width},{height}", f"--screenshot={png}",
                           html.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.is_file():
        raise RuntimeError(f"Chromium did not write {png}: {done.stderr[-2000:]}")
    return _console(done.stderr)


def main() -> int:
    import torch

    import normsurgeon as ns
    from normsurgeon import zoo
    from normsurgeon.photo_task import available_photos, photo_task

    if chromium() is None:
        print("chromium not found: apt-get install chromium", file=sys.stderr)
        return 1
    root = Path(__file__).resolve().parents[1]
    crops = photo_task(available_photos(system=False), size=112).train[0][::2][:152]
    model = zoo.efficientnet_lite0(pretrained=True).eval()
    report = ns.diagnose(model, crops, batch_sizes=[2, 32], max_batches=8, generator=torch.Generator().manual_seed(0),
                         data_source="training crops of the 19-photo task (normsurgeon.photo_task)", progress=True)
    html = report.save(root / "out" / "docs_report")[0]
    found = probe(html)
    console = screenshot(html, root / "docs" / "report.png", height=min(found["page_height"], 4200))
    print(json.dumps({k: v for k, v in found.items() if k != "console"}, indent=1))
    print(f"console messages: {console or 'none'}; written: {root / 'docs' / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
