"""Boolean environment switches, read one way everywhere.

`env_flag(name, default)`: FUSEDTUNE_* switches. 1/true/yes/on and 0/false/no/off, in any case and with
surrounding whitespace; unset or empty is the default; anything else raises ValueError (a misspelt switch
never silently leaves the default in force).

`interpreting()`: whether Triton runs its kernels in the interpreter, by Triton's own rule for
TRITON_INTERPRET (triton.knobs.runtime.interpret, triton 3.6 - 3.8: libtriton's getenv_bool): set to
1/true/yes/on/y in any case (no whitespace stripped) is on, anything else or unset is off; Triton never
refuses a value, so neither does this. Parsed here rather than read from the knob: importing triton costs
~0.25 s, and backend.py asks on calls that torch.compile traces (a C function it cannot).

Standard library only. setup.py, which runs before the package is installed, has its own copy of env_flag's
rule (tests/test_env_flags.py keeps the two the same).
"""
from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
_TRITON_TRUE = ("1", "true", "yes", "on", "y")     # triton/_C getenv_bool


def parse_flag(name: str, value: str | None, default: bool) -> bool:
    """`value` (an environment variable's text, None if unset) as a switch; see env_flag."""
    if value is None:
        return default
    v = value.strip().lower()
    if not v:
        return default
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected one of {'/'.join(TRUE)} (on) or {'/'.join(FALSE)} (off), "
                     f"any case, or unset (default: {'on' if default else 'off'})")


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable `name`: 1/true/yes/on or 0/false/no/off (any case, surrounding
    whitespace ignored); unset or empty gives `default`; any other value raises ValueError."""
    return parse_flag(name, os.environ.get(name), default)


def interpreting() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET, read now, as Triton reads it)."""
    v = os.environ.get("TRITON_INTERPRET")
    return v is not None and v.lower() in _TRITON_TRUE
