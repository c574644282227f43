"""The one exception type users see: it names the bad value and the fix."""


class ExplorerError(ValueError):
    """A user-facing error. The message names the offending value and how to fix it.

    The engine names the settings it refuses by their field (e.g. spec.proj_dim); `fields` lists them, so a
    command line can say which of its flags set them (precompute.cli_types.flag_hint)."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


def _number(value, name: str, low: int, high: int) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ExplorerError(
            f"{name} {value!r} is not a number: use a whole number from {low} to {high}"
        ) from None


def bounded(value, name: str, low: int, high: int) -> tuple[int, str]:
    """A typed whole number clamped into [low, high], and a note when it was moved ("" otherwise)."""
    number = _number(value, name, low, high)
    if isinstance(value, bool) or number != number or not number.is_integer() and abs(number) < 1e15:
        raise ExplorerError(f"{name} {value!r} is not a whole number: use one from {low} to {high}")
    used = int(min(max(number, low), high))
    return used, "" if used == number else f"{name} {value!r} is outside {low}..{high}: used {used}"


def whole_number(value, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], or an ExplorerError naming it and the valid range."""
    number = _number(value, name, low, high)
    if isinstance(value, bool) or not number.is_integer() or not low <= number <= high:
        raise ExplorerError(f"{name} {value!r} is out of range: use a whole number from {low} to {high}")
    return int(number)
