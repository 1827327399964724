"""The one k=v option parser: heads, type conversion, unknown keys (also from Python dicts)."""

import dataclasses

import pytest

from edgec.errors import UserError
from edgec.options import convert_items, parse_options, split_spec


@dataclasses.dataclass(frozen=True)
class Opts:
    keep: float = 0.5
    block: int = 64
    name: str = "a"
    grid: tuple[int, int, int] | None = None
    exclude: tuple[str, ...] = ()
    flag: bool = False


def test_split_spec_with_and_without_a_head():
    assert split_spec("w8a8:method=entropy,samples=4", "q", head=":") == (
        "w8a8", {"method": "entropy", "samples": "4"})
    assert split_spec("2:4,exclude=lm_head", "prune", head=",") == ("2:4", {"exclude": "lm_head"})
    assert split_spec("w4a16", "q", head=":") == ("w4a16", {})
    assert split_spec(" keep=0.2 , block=16 ", "sparse") == (None, {"keep": "0.2", "block": "16"})
    with pytest.raises(UserError, match="option 'keep' is not key=value"):
        split_spec("keep", "sparse")
    with pytest.raises(UserError, match="sparse option 'keep' is given twice"):
        split_spec("keep=0.2,keep=0.3", "sparse")  # the last one silently won


def test_values_convert_by_field_type():
    opts = parse_options(Opts, "keep=0.25,block=32,grid=2x4x8,exclude=A;B,flag=yes,name=x", "t")
    assert opts == Opts(0.25, 32, "x", (2, 4, 8), ("A", "B"), True)
    assert parse_options(Opts, {"grid": [1, 2, 3], "keep": 1}, "t").grid == (1, 2, 3)


@pytest.mark.parametrize("spec,match", [
    ("keep=x", r"keep='x' is not valid \(expected float\)"),
    ("block=1.5", r"expected int"),
    ("grid=2x4", r"expected AxBxC"),
    ("flag=maybe", r"expected bool"),
    ("keeep=1", r"unknown t option 'keeep'; known: keep, block"),
    ({"keeep": 1}, r"unknown t option 'keeep'"),  # a typo in a Python dict is refused too
])
def test_bad_values_and_unknown_keys_are_user_errors(spec, match):
    with pytest.raises(UserError, match=match):
        parse_options(Opts, spec, "t")


def test_convert_items_keeps_python_values_and_only_given_keys():
    assert convert_items(Opts, {"keep": 0.1}, "t") == {"keep": 0.1}


def test_the_head_field_is_refused_as_a_key():
    """``--quantize w8a8:scheme=fp8``: cls(scheme=..., **{"scheme": ...}) was a TypeError."""
    with pytest.raises(UserError, match=r"t option 'name' is not a key=value option; give the "
                                        r"name before ':' only"):
        convert_items(Opts, {"name": "b"}, "t", head=("name",))
    with pytest.raises(UserError, match=r"unknown t option 'nme'; known: keep, block, grid,"):
        convert_items(Opts, {"nme": "b"}, "t", head=("name",))  # the head not among known
    with pytest.raises(UserError, match="option 'name' is not a key=value option"):
        parse_options(Opts, "name=b", "t", name="a")  # a field the caller fixes
