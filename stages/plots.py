"""`dvc plots show` that works offline: the HTML page carries the Vega libraries inline instead of loading them from
a CDN, so the training curves and the confusion matrix render without a network.

    python -m stages.plots [--out dvc_plots]      # or: make plots

The Vega, Vega-Lite and Vega-Embed bundle comes from `vl-convert-python`; the page is DVC's own, given to
`dvc plots show --html-template` with the bundle where DVC would put its CDN script tags.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC plots</title>
    <script type="text/javascript">{bundle}</script>
    <style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {{plot_divs}}
</body>
</html>"""


def offline_template() -> str:
    """DVC's HTML page with Vega, Vega-Lite and Vega-Embed inline (no `{scripts}` slot, so no CDN tags)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle()  # assigns window.vegaEmbed, window.vega, window.vegaLite
    return PAGE.format(bundle=bundle.replace("</script", "<\\/script"))


def main(
    out: Annotated[Path, typer.Option(help="folder for index.html")] = Path("dvc_plots"),
    targets: Annotated[list[str] | None, typer.Argument(help="plots to show (default: all in dvc.yaml)")] = None,
) -> None:
    """Render the pipeline's DVC plots to OUT/index.html, viewable offline."""
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "offline.html"
        template.write_text(offline_template(), encoding="utf-8")
        cmd = ["dvc", "plots", "show", "--html-template", str(template), "-o", str(out), *(targets or [])]
        sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    typer.run(main)
