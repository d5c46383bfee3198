"""The book works offline: MathJax is served from the book itself, and nothing is loaded from a CDN.

- MathJax 3 comes from npm at build time (``make mathjax``: ``npm install --prefix _build/mathjax mathjax@3``);
  this extension copies its ``es5/`` folder into the built ``_static/mathjax/``, where ``mathjax_path``
  (``_config.yml``) points.
- sphinx-thebe (always loaded by Jupyter Book, unused here: ``launch_buttons.thebe`` is off) adds a script
  that names unpkg.com, twice on every page, which the browser reports as a redeclared ``const``. Its assets
  are dropped from every page.
"""
import shutil
from pathlib import Path

from sphinx.errors import ExtensionError

MATHJAX = Path("_build/mathjax/node_modules/mathjax/es5")  # relative to the book's root (confdir)


def mathjax_source(app) -> Path:
    src = Path(app.confdir) / MATHJAX
    if not (src / "tex-mml-chtml.js").is_file():
        raise ExtensionError(f"MathJax is not installed in {src}: run `make mathjax` "
                             "(npm install --prefix _build/mathjax mathjax@3), then build the book again")
    return src


def check_mathjax(app):
    if app.builder.format == "html":
        mathjax_source(app)


def drop_thebe(app, pagename, templatename, context, doctree):
    def keep(asset):
        body = getattr(asset, "attributes", {}).get("body", "") or ""
        return "thebe" not in str(asset) and "THEBE_JS_URL" not in body
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [a for a in context[key] if keep(a)]


def copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        shutil.copytree(mathjax_source(app), Path(app.outdir) / "_static" / "mathjax" / "es5", dirs_exist_ok=True)


def setup(app):
    app.connect("builder-inited", check_mathjax)
    app.connect("html-page-context", drop_thebe, priority=1000)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
