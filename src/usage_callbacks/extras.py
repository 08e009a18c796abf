"""Optional extras: importing an integration without its framework says what to install."""

from __future__ import annotations


def missing_extra(error: ModuleNotFoundError, extra: str) -> ModuleNotFoundError:
    """The error to raise instead of ``error`` when ``extra``'s package is not installed."""
    return ModuleNotFoundError(
        f"{error.name or 'a package'} is not installed; it comes with the {extra!r} extra: "
        f'pip install "usage-callbacks[{extra}]"',
        name=error.name,
    )
