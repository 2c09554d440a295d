"""GB/T 34014-2017 battery codes: the battery's digital identity.

A code is 24 characters (17 for a second-life product, which omits the 7-character traceability
field). There is no check character, so validation can only enforce the structure; everything the
reference marks as uncertain (rare chemistry letters, day letters past ``H``, years past 2027) is
decoded best-effort and reported as a warning, never as an error, so a real label is not refused
because our reading of the standard is incomplete.
"""

from __future__ import annotations

import datetime as _dt
import functools
import string
from collections.abc import Iterable
from dataclasses import dataclass, field

from battery_trace.protocol.text import shown

ORIGINAL_LENGTH = 24
SECOND_LIFE_LENGTH = 17
ALPHABET = frozenset(string.digits + string.ascii_uppercase)

PRODUCT_TYPES = {"P": "pack", "M": "module", "C": "cell"}
# Certain per the reference: B and E. The others are the commonly cited assignments, kept but flagged.
CHEMISTRIES = {"B": "LFP", "E": "ternary"}
UNCERTAIN_CHEMISTRIES = {
    "A": "NiMH",
    "C": "LMO",
    "D": "LCO",
    "F": "supercapacitor",
    "G": "LTO",
    "Z": "other",
}

_CERTAIN_YEARS = {**{str(d): 2010 + d for d in range(10)}, **{c: 2020 + i for i, c in enumerate("ABCDEFGH")}}
_MONTHS = {**{str(d): d for d in range(1, 10)}, "A": 10, "B": 11, "C": 12}


def _letters(skip: str) -> list[str]:
    return [c for c in string.ascii_uppercase if c not in skip]


# Two readings of the letters after the certain range: consecutive letters, or skipping I, O and Q
# (which are easily confused with 1 and 0). Both agree up to H.
_READINGS = {
    "consecutive": "",
    "skip_IOQ": "IOQ",
}


def _year_table(skip: str) -> dict[str, int]:
    table = dict(_CERTAIN_YEARS)
    for i, c in enumerate(c for c in _letters(skip) if c > "H"):
        table[c] = 2028 + i
    return table


def _day_table(skip: str) -> dict[str, int]:
    table = {str(d): d for d in range(1, 10)}
    for i, c in enumerate(_letters(skip)[:22]):
        table[c] = 10 + i
    return table


_YEAR_TABLES = {name: _year_table(skip) for name, skip in _READINGS.items()}
_DAY_TABLES = {name: _day_table(skip) for name, skip in _READINGS.items()}


class CodeError(ValueError):
    """A code that breaks GB/T 34014. ``position`` is 1-based; 0 means the code as a whole."""

    def __init__(self, code: str, position: int, rule: str, valid: str) -> None:
        self.code = code
        self.position = position
        self.rule = rule
        self.valid = valid
        if position:
            char = code[position - 1]
            where = f"position {position} ({char!r})"
        else:
            where = f"code {shown(code)}"
        super().__init__(f"{where}: {rule}; valid: {valid}")


@dataclass(frozen=True)
class ProductionDate:
    """The three raw date characters and what they can mean.

    ``value`` is set when every plausible reading gives the same real date; ``candidates`` lists the
    distinct real dates when readings disagree.
    """

    raw: str
    value: _dt.date | None
    candidates: tuple[_dt.date, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "raw": self.raw,
            "date": self.value.isoformat() if self.value else None,
            "candidates": [d.isoformat() for d in self.candidates],
        }


@dataclass(frozen=True)
class BatteryCode:
    code: str
    manufacturer: str
    product_type: str
    chemistry_char: str
    specification: str
    traceability: str | None  # None for a second-life code
    production_date: ProductionDate
    serial: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def second_life(self) -> bool:
        return self.traceability is None

    @property
    def product(self) -> str:
        return PRODUCT_TYPES[self.product_type]

    @property
    def chemistry(self) -> str:
        return CHEMISTRIES.get(self.chemistry_char) or UNCERTAIN_CHEMISTRIES.get(self.chemistry_char, "unknown")

    def to_json(self) -> dict[str, object]:
        return {
            "code": self.code,
            "manufacturer": self.manufacturer,
            "product": self.product,
            "chemistry": self.chemistry,
            "chemistry_char": self.chemistry_char,
            "specification": self.specification,
            "traceability": self.traceability,
            "production_date": self.production_date.to_json(),
            "serial": self.serial,
            "second_life": self.second_life,
            "warnings": list(self.warnings),
        }


def normalise(text: str) -> str:
    """Labels are read by scanners and people: drop surrounding whitespace and fold to upper case."""
    return text.strip().upper()


def _decode_date(code: str, start: int) -> tuple[ProductionDate, list[str]]:
    """Decode the 3 date characters at 0-based ``start``; raise CodeError when no reading is a real date."""
    raw = code[start : start + 3]
    y, m, d = raw
    if m not in _MONTHS:
        raise CodeError(code, start + 2, "month must be 1-9 or A-C (October-December)", "1-9, A, B, C")
    month = _MONTHS[m]
    dates: list[_dt.date] = []
    day_seen = False
    for reading in _READINGS:
        year = _YEAR_TABLES[reading].get(y)
        day = _DAY_TABLES[reading].get(d)
        if day is not None:
            day_seen = True
        if year is None or day is None:
            continue
        try:
            dates.append(_dt.date(year, month, day))
        except ValueError:
            continue
    if not day_seen:
        raise CodeError(
            code,
            start + 3,
            "day must be 1-9 or a letter for 10-31",
            "1-9, A-Y (letter readings differ after H)",
        )
    if not dates:
        raise CodeError(
            code,
            start + 3,
            f"date {raw!r} cannot exist (day past the end of the month)",
            "a real calendar date",
        )
    distinct = tuple(sorted(set(dates)))
    warnings = []
    if y not in _CERTAIN_YEARS:
        warnings.append(f"year character {y!r} is past 2027, where the standard's letters are not settled")
    if len(distinct) > 1:
        warnings.append(f"date {raw!r} is ambiguous: {', '.join(x.isoformat() for x in distinct)}")
        return ProductionDate(raw, None, distinct), warnings
    if d not in "123456789ABCDEFGH":
        warnings.append(f"day character {d!r} is past the letters the standard settles (H = 17)")
    return ProductionDate(raw, distinct[0], distinct), warnings


def parse(text: str) -> BatteryCode:
    """Parse and validate a GB/T 34014 code (24 characters, or 17 for a second-life code).

    Raises CodeError naming the position, the character and the rule broken.
    """
    return _parse(normalise(text))


@functools.lru_cache(maxsize=65536)  # the same batteries report again and again; BatteryCode is immutable
def _parse(code: str) -> BatteryCode:
    if len(code) not in (ORIGINAL_LENGTH, SECOND_LIFE_LENGTH):
        raise CodeError(
            code,
            0,
            f"has {len(code)} characters",
            f"{ORIGINAL_LENGTH} characters (or {SECOND_LIFE_LENGTH} for a second-life code)",
        )
    for i, c in enumerate(code):
        if c not in ALPHABET:
            raise CodeError(code, i + 1, "only digits and upper-case Latin letters are allowed", "0-9, A-Z")
    if code[3] not in PRODUCT_TYPES:
        raise CodeError(code, 4, "is not a product type", "P (pack), M (module), C (cell)")
    warnings: list[str] = []
    chem = code[4]
    if chem in UNCERTAIN_CHEMISTRIES:
        warnings.append(f"chemistry {chem!r} ({UNCERTAIN_CHEMISTRIES[chem]}) is not a settled assignment")
    elif chem not in CHEMISTRIES:
        warnings.append(f"chemistry {chem!r} is not a known battery type")
    second_life = len(code) == SECOND_LIFE_LENGTH
    traceability = None if second_life else code[7:14]
    date_start = 7 if second_life else 14
    date, date_warnings = _decode_date(code, date_start)
    warnings.extend(date_warnings)
    serial = code[date_start + 3 :]
    if not serial.isdigit():
        warnings.append(f"serial {serial!r} has letters; every known sample is digits only")
    return BatteryCode(
        code=code,
        manufacturer=code[0:3],
        product_type=code[3],
        chemistry_char=chem,
        specification=code[5:7],
        traceability=traceability,
        production_date=date,
        serial=serial,
        warnings=tuple(warnings),
    )


def is_valid(text: str) -> bool:
    try:
        parse(text)
    except CodeError:
        return False
    return True


# A pack is made of modules or cells, a module of cells; a cell has no parts.
_MAY_CONTAIN = {"P": {"M", "C"}, "M": {"C"}, "C": set()}


def link_problems(parent: BatteryCode, children: Iterable[BatteryCode]) -> list[str]:
    """Why ``children`` cannot be the parts of ``parent`` (empty when the links are sound)."""
    problems = []
    seen: set[str] = set()
    for child in children:
        if child.code == parent.code:
            problems.append(f"{child.code} cannot be a part of itself")
        elif child.product_type not in _MAY_CONTAIN[parent.product_type]:
            problems.append(f"a {parent.product} cannot contain a {child.product} ({child.code})")
        if child.code in seen:
            problems.append(f"{child.code} is listed twice")
        seen.add(child.code)
    return problems
