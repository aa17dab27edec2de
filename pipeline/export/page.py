"""What every atlas page shares: the head (inline CSS, a Content-Security-Policy that forbids
scripts), the tail, and the two ways a value gets into a page: `text` (HTML-escaped, quotes too)
and `url` (a relative path of ours, percent-encoded, then escaped)."""

from __future__ import annotations

import html
import urllib.parse
from typing import Any

HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="script-src 'none'; object-src 'none'; \
base-uri 'none'; form-action 'none'">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.id {{ overflow-wrap: anywhere; max-width: 40em; }}
.bad {{ color: #b00; }}
img.grid {{ max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }}
nav.units a {{ margin-right: .4em; }}
section {{ margin-top: 2em; }}
.muted {{ color: #666; }}
.tiles {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure.tile {{ margin: 0; padding: 4px; border: 1px solid #ddd; max-width: 920px; }}
figure.tile img {{ image-rendering: pixelated; margin-right: 2px; vertical-align: top; }}
figcaption {{ font-size: 12px; max-width: 40em; overflow-wrap: anywhere; }}
svg.histogram {{ border: 1px solid #ddd; background: #fafafa; }}
</style>
</head>
<body>
"""
TAIL = "</body>\n</html>\n"


def text(value: Any) -> str:
    """Any value as escaped HTML text (quotes too, so it is also safe inside attributes)."""
    return html.escape(str(value), quote=True)


def url(path: str) -> str:
    """A relative URL for a path of ours, percent-encoded and escaped for an attribute."""
    return text(urllib.parse.quote(path))
