"""Server paths out of what a job's owner is shown: its error and traceback.

A failure message names folders of the machine it ran on ("'x' is not a folder under
/srv/diffqueue/models", a traceback through /usr/lib/python3.11/site-packages/...). The
owner sees the configured root by its setting's name instead (`DIFFQUEUE_MODELS_DIR/x`),
and the Python installation and diffqueue's source by a placeholder; the worker's own
log keeps the paths whole.
"""
from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.config import Settings


def server_roots(settings: Settings) -> dict[str, str]:
    """{absolute folder: what a job's owner is shown instead}: the configured roots by
    their setting's name, the Python installation and diffqueue's own source by a
    placeholder. Both spellings of each, as given and with links resolved."""
    named: list[tuple[str | Path | None, str]] = [
        (settings.models_dir, "DIFFQUEUE_MODELS_DIR"),
        (settings.cache_dir, "DIFFQUEUE_CACHE_DIR"),
    ]
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        named.append((unquote(url.path), "DIFFQUEUE_STORAGE_URL"))
    paths = sysconfig.get_paths()
    named += [(p, "<site-packages>") for p in (*site.getsitepackages(), paths["purelib"], paths["platlib"])]
    named += [(p, "<python>") for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)]
    named.append((Path(__file__).resolve().parents[1], "<diffqueue>"))
    roots: dict[str, str] = {}
    for path, name in named:
        if path is None or not Path(path).is_absolute():
            continue  # a relative root would match ordinary words
        for spelling in (os.path.abspath(path), str(Path(path).resolve())):
            if spelling != "/":
                roots.setdefault(spelling, name)
    return roots


def hide_server_paths(text: str, roots: dict[str, str]) -> str:
    """`text` with each root replaced by its name (`/srv/models/x` -> `DIFFQUEUE_MODELS_DIR/x`):
    only whole path components match, and the longest root wins (site-packages is
    often inside the installation, the models dir inside the data dir)."""
    if not roots:
        return text
    alternatives = "|".join(re.escape(root) for root in sorted(roots, key=len, reverse=True))
    text = re.sub(rf"(?<![\w.-])({alternatives})(?![\w.-])", lambda m: roots[m.group(1)], text)
    # A message that gave the setting and its value ("under DIFFQUEUE_MODELS_DIR (/srv/models)")
    # now says the name twice.
    return re.sub(r"\b(DIFFQUEUE_[A-Z_]+) \(\1\)", r"\1", text)
