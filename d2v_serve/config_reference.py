"""The configuration reference page, made from ServerConfig's fields and their help:
`python -m d2v_serve.config_reference > docs/configuration.md` (tests/test_docs_site.py checks the page is current)."""

from __future__ import annotations

from dataclasses import MISSING, fields

from .config import ServerConfig, env_name

INTRO = """# Configuration

`d2v-serve`'s settings, made from `ServerConfig` (`d2v_serve/config.py`) by
`python -m d2v_serve.config_reference > docs/configuration.md`; `d2v-serve --help` prints the same. Every flag is
also an environment variable (`--max-batch-size` = `D2V_MAX_BATCH_SIZE`); a flag wins over the variable, which wins
over the default. Booleans take `1/true/yes/on` or `0/false/no/off`.
"""


def _cell(text: str) -> str:
    return text.replace("%%", "%").replace("|", "\\|").replace("*", "\\*")


def markdown() -> str:
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            flag = f"{flag} / --no-{flag[2:]}"
        default = "" if f.default is MISSING else f.default
        shown = f"`{default}`" if default != "" else "(none)"
        meaning = f.metadata["help"]
        if f.metadata.get("choices"):
            meaning += f" (one of {', '.join(f.metadata['choices'])})"
        rows.append(f"| `{flag}` | `{env_name(f.name)}` | {_cell(shown)} | {_cell(meaning)} |")
    return INTRO + "\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
