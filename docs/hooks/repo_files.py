"""MkDocs hook: publish Markdown files from outside ``docs/`` and point links at their pages.

The pages under ``docs/`` link to files such as ``../benchmarks/README.md`` with paths that
work in a repository browser. This hook adds each file in ``PUBLISHED`` to the site as a
generated page, and rewrites every relative link whose target is a published file, or a page
under ``docs/`` seen from a published file, so that it points at the page on the site. Links
to any other file outside ``docs/`` are left alone, so ``mkdocs build --strict`` still
reports them as broken.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

# Repository path of each published file -> its path on the site, relative to docs/.
PUBLISHED = {
    "README.md": "project-readme.md",
    "benchmarks/README.md": "benchmarks.md",
}

# The target of an inline Markdown link or image: "](target)" or "](target "title")".
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    for repo_path, site_path in PUBLISHED.items():
        files.append(File.generated(config, site_path, abs_src_path=str(root / repo_path)))
    return files


def on_page_markdown(markdown, page, config, files):
    site_path = page.file.src_uri
    published_from = {site: repo for repo, site in PUBLISHED.items()}
    repo_path = published_from.get(site_path, "docs/" + site_path)

    def rewrite(match: re.Match) -> str:
        target = match.group("target")
        path, hash_sign, fragment = target.partition("#")
        if not path or "://" in path or path.startswith(("/", "mailto:")):
            return match.group(0)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path))
        if resolved in PUBLISHED:
            new_path = PUBLISHED[resolved]
        elif resolved.startswith("docs/"):
            new_path = resolved.removeprefix("docs/")
        else:
            return match.group(0)
        relative = posixpath.relpath(new_path, posixpath.dirname(site_path) or ".")
        return f"]({relative}{hash_sign}{fragment}{match.group('title') or ''})"

    return _LINK.sub(rewrite, markdown)
