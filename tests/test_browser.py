"""The book as a reader sees it: every page opened in headless Chromium, offline.

The book is built afresh (`make book` into a temporary folder), served on localhost, and each page of
`_toc.yml` is opened with every request outside localhost blocked, as for a reader without network. Per page:
no JavaScript error, no failed request, every formula rendered by MathJax (no raw TeX left in the text), every
image loaded, every internal link resolves (file and anchor), the Colab button opens that very notebook, and no
code block, output, table or equation is wider than the column by more than a few characters. A screenshot of
each page is saved in `_build/screenshots/`.

Needs Debian's `chromium` and Playwright's Python package (`make browser`; Playwright's own browser download is
never used). Without them the test is skipped, saying so, unless LLAMA2_EDU_REQUIRE_BROWSER=1 (CI sets it).
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "_build" / "screenshots"
MAX_OVERFLOW_CHARS = 3  # a code line may poke this many characters past the column, no more
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
PAGES = [TOC["root"]] + [c["file"] for part in TOC["parts"] for c in part["chapters"]]


def _missing_browser():
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium, or `make browser`)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is missing (pip install playwright, or `make browser`)"
    return None


def _html_name(page):
    return f"{page}.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    reason = _missing_browser()
    if reason:
        if os.environ.get("LLAMA2_EDU_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test must run here: {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("book")
    subprocess.run(["make", "mathjax"], cwd=ROOT, check=True, capture_output=True)
    build = subprocess.run(["jupyter-book", "build", ".", "-W", "-n", "--keep-going", "--path-output", str(out)],
                           cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, f"the book does not build without warnings:\n{build.stdout[-3000:]}{build.stderr[-3000:]}"
    html = out / "_build" / "html"
    handler = functools.partial(QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    yield html, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


# Measured in the page: what overflows the column, raw TeX, images that did not load, links to check.
MEASURE = r"""() => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });  // folded cells count too
  const article = document.querySelector('article.bd-article') || document.body;
  const charWidth = (el) => {
    const probe = document.createElement('span');
    probe.textContent = 'x'.repeat(100);
    probe.style.visibility = 'hidden';
    el.appendChild(probe);
    const w = probe.getBoundingClientRect().width / 100;
    probe.remove();
    return w || 8;
  };
  const wide = [];
  for (const pre of article.querySelectorAll('pre')) {
    const extra = pre.scrollWidth - pre.clientWidth;
    if (extra > 0) {
      const chars = extra / charWidth(pre);
      const line = pre.innerText.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      wide.push({kind: 'code', chars: Math.round(chars), text: line.slice(0, 100)});
    }
  }
  const columnWidth = article.clientWidth;
  for (const el of article.querySelectorAll('mjx-container[display="true"], table')) {
    const w = el.scrollWidth, box = el.parentElement.clientWidth;
    if (w > Math.min(box, columnWidth) + 4) {
      wide.push({kind: el.tagName.toLowerCase(), px: w - Math.min(box, columnWidth),
                 text: el.textContent.slice(0, 80)});
    }
  }
  const clone = article.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight').forEach(e => e.remove());
  const text = clone.textContent;
  const rawTex = [];
  // '![' : a Markdown image the parser refused (a data URI of a type it does not allow, say) stays text
  for (const pattern of ['\\(', '\\)', '\\[', '\\]', '$$', '\\begin{', '\\frac', '![']) {
    const i = text.indexOf(pattern);
    if (i >= 0) rawTex.push(text.slice(Math.max(0, i - 40), i + 40).replace(/\s+/g, ' '));
  }
  const unrendered = [...article.querySelectorAll('.math')].filter(m => !m.querySelector('mjx-container'))
    .map(m => m.textContent.slice(0, 60));
  const images = [...document.querySelectorAll('img')].filter(i => !(i.complete && i.naturalWidth > 0))
    .map(i => i.getAttribute('src').slice(0, 80));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'));
  const colab = [...document.querySelectorAll('a[href*="colab.research.google.com"]')].map(a => a.href);
  return {wide, rawTex, unrendered, images, links, colab, mathjax: !!window.MathJax};
}"""


def _ids(path, cache={}):
    if path not in cache:
        cache[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))
    return cache[path]


def _broken_links(html, page_file, links):
    broken = []
    for href in links:
        parts = urlsplit(href)
        if parts.scheme in ("http", "https", "mailto", "data", "javascript") or parts.netloc:
            continue
        target = (page_file.parent / unquote(parts.path)).resolve() if parts.path else page_file
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"{href} (no such file)")
        elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _ids(target):
            broken.append(f"{href} (no anchor #{parts.fragment})")
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_page_reads_offline(site, browser, page):
    html, base = site
    url = base + _html_name(page)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    blocked, failed, errors = [], [], []

    def route(r):
        host = urlsplit(r.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    p = context.new_page()
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    p.on("requestfailed", lambda r: failed.append(f"{r.url} ({r.failure})"))
    p.on("response", lambda r: failed.append(f"{r.url} (HTTP {r.status})") if r.status >= 400 else None)
    p.goto(url, wait_until="load")
    p.wait_for_function("() => !window.MathJax || (window.MathJax.startup && window.MathJax.startup.promise)")
    p.evaluate("() => window.MathJax ? window.MathJax.startup.promise : null")
    p.evaluate("() => document.fonts.ready.then(() => true)")
    p.screenshot(path=str(SHOTS / f"{Path(page).name}.png"), full_page=True)  # as the reader first sees it
    got = p.evaluate(MEASURE)
    context.close()

    problems = []
    problems += [f"request outside localhost: {u}" for u in blocked]
    problems += [f"failed request: {u}" for u in failed if u.split(" (")[0] not in blocked]
    problems += [f"JavaScript error: {e}" for e in errors if not any(u in e for u in blocked)]
    problems += [f"raw TeX or Markdown in the text: ...{t}..." for t in got["rawTex"]]
    problems += [f"formula not rendered by MathJax: {t}" for t in got["unrendered"]]
    problems += [f"image did not load: {s}" for s in got["images"]]
    problems += [f"broken link: {b}" for b in _broken_links(html, html / _html_name(page), got["links"])]
    for w in got["wide"]:
        if w["kind"] == "code" and w["chars"] > MAX_OVERFLOW_CHARS:
            problems.append(f"code block scrolls {w['chars']} characters sideways: {w['text']!r}")
        elif w["kind"] != "code":
            problems.append(f"{w['kind']} is {w['px']} px wider than the column: {w['text']!r}")
    if page.startswith("notebooks/"):
        repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
        want = f"https://colab.research.google.com/github/{repo}/blob/{CONFIG['repository']['branch']}/{page}.ipynb"
        if set(got["colab"]) != {want}:
            problems.append(f"Colab button opens {sorted(set(got['colab']))}, not {want}")
    assert not problems, f"{url}:\n  " + "\n  ".join(problems)
