"""The built-in training configs, shipped inside the package: `megalodon train --config demo` finds `demo.toml` here
wherever the package is installed."""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(path.stem for path in DIRECTORY.glob("*.toml"))


def resolve(name_or_path: str | Path) -> Path:
    """The file a `--config` value means: an existing file, else the built-in config of that name.

    A path that does not exist is refused; when its name is a built-in config's (the old `configs/demo.toml`),
    the error says to pass the name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = DIRECTORY / f"{path.stem}.toml"
    if path.suffix == "" and len(path.parts) == 1:
        if builtin.is_file():
            return builtin
        raise FileNotFoundError(f"no config file {str(name_or_path)!r}, and no built-in config of that name "
                                f"(built-in: {', '.join(names())})")
    if builtin.is_file():
        raise FileNotFoundError(f"no config file at {path}; the built-in config {path.stem!r} ships inside the "
                                f"package: use --config {path.stem}")
    raise FileNotFoundError(f"no config file at {path}")
