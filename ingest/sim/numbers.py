"""Decimal strings exactly as OKX prints them, from integers in a fixed number of decimal places.

Prices and sizes live as integers (units of 10^-decimals) inside the simulator, so arithmetic is exact
and fast, and a value always renders to the same string: that is what makes a book checksum computed
by the client from the pushed strings equal the one the simulator computed.
"""

from __future__ import annotations

from decimal import Decimal

_POW10 = [10**i for i in range(40)]


def decimals_of(step: str) -> int:
    """Decimal places of a step such as a tickSz ("0.1" -> 1, "5" -> 0, "0.00000001" -> 8)."""
    _, _, frac = step.partition(".")
    return len(frac.rstrip("0")) if frac else 0


def to_units(value: str, decimals: int) -> int:
    """`value` as an integer number of 10^-decimals (raises ValueError when it does not fit exactly)."""
    d = Decimal(value).scaleb(decimals)
    if d != d.to_integral_value():
        raise ValueError(f"{value} has more than {decimals} decimal places")
    return int(d)


def fmt_trim(units: int, decimals: int) -> str:
    """OKX's usual form: no trailing zeros and no trailing dot ("64073", "0.0000102")."""
    if decimals == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    q, r = divmod(abs(units), _POW10[decimals])
    if r == 0:
        return f"{sign}{q}"
    frac = str(r).rjust(decimals, "0").rstrip("0")
    return f"{sign}{q}.{frac}"


def fmt_fixed(units: int, decimals: int) -> str:
    """Fixed decimal places, as OKX prints candle prices ("63913.0")."""
    if decimals == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    q, r = divmod(abs(units), _POW10[decimals])
    return f"{sign}{q}.{str(r).rjust(decimals, '0')}"


def dstr(value: Decimal, places: int | None = None) -> str:
    """A Decimal in plain notation (never an exponent), rounded to `places` if given, trailing zeros trimmed."""
    if places is not None:
        value = value.quantize(Decimal(1).scaleb(-places))
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def units_to_decimal(units: int, decimals: int) -> Decimal:
    return Decimal(units).scaleb(-decimals)
