"""Write docs/reference/config-keys.md from configs/: every key of every config file with its
default and the comment above it in the YAML (the one place a key is described).

    python scripts/config_reference.py            # rewrite the page
    python scripts/config_reference.py --check    # exit 1 when the page is out of date (CI)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PAGE = REPO / "docs" / "reference" / "config-keys.md"
KEY = re.compile(r"^(\s*)([A-Za-z_][\w]*):\s*(.*?)\s*$")
PRESETS = ("experiment", "debug", "hydra")  # @package _global_ files: presets, not key groups


def _header(path: Path) -> str:
    """The file's leading comment, as one paragraph, where a blank line ends it (else it is the
    first key's comment)."""
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            if line.strip():
                return ""
            break
        if not line.startswith("# @package"):
            text.append(line.lstrip("#").strip())
    return _text(" ".join(t for t in text if t))


def _text(text: str) -> str:
    """Markdown-safe: ``<placeholders>`` are not HTML tags."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def keys(path: Path) -> list[tuple[str, str, str]]:
    """``(dotted key, default, comment)`` for every key of a YAML config file, in file order
    (the ``defaults`` list left out)."""
    found: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    in_defaults = False
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            if not stripped.startswith("# @package"):
                comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(raw)
        if match is None:  # a list item or a continuation
            continue
        indent, name, value = len(match.group(1)), match.group(2), match.group(3)
        if indent == 0:
            in_defaults = name == "defaults"
        if in_defaults:
            comment = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(s[1] for s in stack), name])
        value = re.sub(r"\s+#.*$", "", value)
        if value == "":
            stack.append((indent, name))
            if comment:
                found.append((dotted, "", " ".join(comment)))
        else:
            found.append((dotted, value, " ".join(comment)))
        comment = []
    return found


def _cell(text: str) -> str:
    return _text(text).replace("|", "\\|")


def page() -> str:
    out = [
        "# Every config key",
        "",
        "Generated from `configs/` by `python scripts/config_reference.py` (CI checks it is up to",
        "date): every key with its default and the comment above it in the YAML file. Override any",
        "of them on the command line, e.g. `python train.py trainer.max_epochs=20`; choose a "
        "group's",
        "option with `group=option`, e.g. `model=unet_baseline`.",
        "",
    ]
    commands = sorted(p for p in CONFIGS.glob("*.yaml"))
    out += ["## Command configs", ""]
    for path in commands:
        out += [f"### `{path.name}`", "", _header(path) or "", ""]
        out += _table(path, prefix="")
    for group in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        out += [f"## `{group.name}`", ""]
        for path in sorted(group.glob("*.yaml")):
            option = path.stem
            out += [f"### `{group.name}={option}`", "", _header(path) or "", ""]
            if group.name in PRESETS:
                listed = ", ".join(f"`{k}`" for k, v, _ in keys(path) if v != "")
                out += [f"Sets: {listed}." if listed else "", ""]
                continue
            out += _table(path, prefix=f"{group.name}.")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


def _table(path: Path, prefix: str) -> list[str]:
    rows = keys(path)
    if not rows:
        return []
    lines = ["| key | default | description |", "|---|---|---|"]
    for key, default, comment in rows:
        shown = f"`{_cell(default)}`" if default else ""
        lines.append(f"| `{prefix}{key}` | {shown} | {_cell(comment)} |")
    return [*lines, ""]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(
                f"error: {PAGE.relative_to(REPO)} is out of date: run python "
                "scripts/config_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
