"""MkDocs hook: the built-in plugins' option tables, generated from their signatures and docstrings when the
site is built (the text `retool fit --KIND.help NAME` prints), so that the page cannot drift from the code.

A page asks for them with a line ``<!-- plugin-options -->``.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- plugin-options -->"
KIND_ORDER = ("algorithm", "rollout", "executor", "reward", "data")


def _type_name(hint: Any) -> str:
    text = str(hint) if getattr(hint, "__args__", None) else (getattr(hint, "__name__", None) or str(hint))
    return text.replace("typing.", "").replace("NoneType", "None")


def _options(cls: type) -> list[tuple[str, str, str, str]]:
    """(option, type, default, help) of every option a recipe can set on ``cls``, bases included."""
    from jsonargparse import ArgumentParser

    from retool.testing.options import INJECTED

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "plugin", fail_untyped=False)
    rows = []
    for action in parser._actions:
        name = action.dest.removeprefix("plugin.")
        if not action.dest.startswith("plugin.") or name.endswith("help") or name in INJECTED or "." in name:
            continue
        hint = getattr(action, "_typehint", None) or action.type
        default = action.default
        shown = "required" if default is None and action.required else repr(getattr(default, "value", default))
        rows.append((name, _type_name(hint) if hint is not None else "", shown, " ".join((action.help or "").split())))
    return rows


def plugin_tables() -> str:
    """Markdown: one section per built-in plugin, grouped by kind, with its options."""
    from retool.plugins import discover

    found = [p for p in discover() if p.package == "retool"]
    out = []
    for kind in KIND_ORDER:
        for plugin in sorted((p for p in found if p.kind == kind), key=lambda p: p.name):
            doc = (plugin.cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out += [f"### `{kind}: {plugin.name}`", "", f"`{plugin.class_path}`. {doc}", ""]
            out += ["| Option | Type | Default | Meaning |", "|---|---|---|---|"]
            for name, hint, default, text in _options(plugin.cls):
                cell = text.replace("|", "\\|")
                out.append(f"| `{name}` | `{hint.replace(' | ', ' or ')}` | `{default}` | {cell} |")
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, plugin_tables())
