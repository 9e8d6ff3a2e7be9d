"""Readers' SQL is read-only for real: through the CLI and ``Library`` on a small real library,
anything but one query is refused, and no file outside the lake is readable or writable."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from asset_library.cli import main
from asset_library.lake.sql_guard import (
    InvalidQueryError,
    ReadOnlyQueryError,
    check_read_only_query,
    lock_down,
)
from asset_library.library import Library
from asset_library.runs.orchestrate import ingest_batch


@pytest.fixture(scope="module")
def library_root(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """Five forest photos ingested in two shards."""
    root = tmp_path_factory.mktemp("sql") / "library"
    with dg.instance_for_test() as instance:
        summary = ingest_batch(
            str(corpus_dir / "github_jenssegers_imagehash" / "forest"),
            library=root,
            max_images_per_shard=3,
            workers=1,
            environ={},
            instance=instance,
            progress=lambda _: None,
        )
    assert summary.success and summary.ok == 5
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder beside the library holding one readable Parquet file."""
    folder = tmp_path_factory.mktemp("outside")
    with duckdb.connect() as connection:
        connection.execute(f"COPY (SELECT 42 AS secret) TO '{folder / 'secret.parquet'}'")
    return folder


@pytest.fixture
def cli(library_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run ``asset-library sql`` on the library: (exit code, stdout, stderr)."""
    monkeypatch.delenv("ASSET_LIBRARY_HOME", raising=False)  # main() sets it; restored after

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["sql", *args, "--library", str(library_root)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _files(*folders: Path) -> set[Path]:
    return {path for folder in folders for path in folder.rglob("*")}


DENIED = "Permission Error"  # DuckDB's own refusal, from the locked connection


def _refused_statements(root: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """name -> (SQL a reader must not run, the words that refuse it)."""
    lake = root / "lake"
    up = "/".join([".."] * len(lake.relative_to(outside.parent).parts))
    return {
        "read_text": ("SELECT * FROM read_text('/etc/passwd')", DENIED),
        "read_blob": ("SELECT content FROM read_blob('/etc/passwd')", DENIED),
        "read_csv": ("SELECT * FROM read_csv('/etc/passwd')", DENIED),
        "file outside": (f"SELECT * FROM '{outside / 'secret.parquet'}'", DENIED),
        "climb out of the lake": (
            f"SELECT * FROM read_parquet('{lake}/{up}/{outside.name}/secret.parquet')",
            DENIED,
        ),
        "library.json": (f"SELECT * FROM read_text('{root / 'library.json'}')", DENIED),
        "glob": ("SELECT * FROM glob('/etc/*')", DENIED),
        "copy outside": (f"COPY (SELECT 1 AS x) TO '{outside / 'copied.csv'}'", "got COPY"),
        "copy into lake": (
            f"COPY (SELECT * FROM images) TO '{lake / 'base' / 'x.parquet'}'",
            "got COPY",
        ),
        "copy over library.json": (
            f"COPY (SELECT 1) TO '{root / 'library.json'}' (FORMAT csv)",
            "got COPY",
        ),
        "copy in a with": (
            f"WITH c AS (COPY (SELECT 1) TO '{lake / 'w.csv'}') SELECT * FROM c",
            "got COPY inside the query",
        ),
        "serialized sql": (
            "SELECT * FROM json_execute_serialized_sql('{}')",
            "json_execute_serialized_sql() is not allowed",
        ),
        "attach": (f"ATTACH '{outside / 'attached.db'}' AS other", "got ATTACH"),
        "set": ("SET threads = 1", "got SET"),
        "reset": ("RESET threads", "got RESET"),
        "install": ("INSTALL httpfs", "got INSTALL"),
        "load": ("LOAD httpfs", "got LOAD"),
        "two statements": ("SELECT 1; SELECT 2", "only one statement per call"),
        "create table": ("CREATE TABLE t AS SELECT 1 AS x", "got CREATE"),
        "create macro": (
            "CREATE MACRO m() AS TABLE SELECT * FROM read_text('/etc/passwd')",
            "got CREATE",
        ),
        "pragma": ("PRAGMA version", "got PRAGMA"),
        "call": ("CALL pragma_version()", "got CALL"),
        "explain analyze": (
            f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside / 'explained.csv'}'",
            "got EXPLAIN",
        ),
        "export": (f"EXPORT DATABASE '{outside / 'exported'}'", "got EXPORT"),
    }


REFUSED = list(_refused_statements(Path("/r/library/lake"), Path("/o")))


@pytest.mark.parametrize("name", REFUSED)
def test_the_cli_refuses_and_writes_nothing(name, cli, library_root, outside):
    sql, reason = _refused_statements(library_root, outside)[name]
    before = _files(library_root, outside)
    code, out, err = cli(sql)
    assert code == 2, (name, out, err)
    assert out == "" and err.startswith("asset-library: ") and reason in err
    assert "Traceback" not in err
    assert _files(library_root, outside) == before
    assert json.loads((library_root / "library.json").read_text())["n_buckets"] > 0


@pytest.mark.parametrize("name", REFUSED)
def test_library_query_refuses_and_writes_nothing(name, library_root, outside):
    sql, reason = _refused_statements(library_root, outside)[name]
    before = _files(library_root, outside)
    with pytest.raises((ReadOnlyQueryError, duckdb.Error)) as refused:
        Library(library_root).query(sql)
    assert reason in str(refused.value)
    assert _files(library_root, outside) == before


def test_what_the_lock_denies_is_there_to_read(library_root, outside):
    """The denied reads name real files: an unlocked DuckDB reads every one of them."""
    statements = _refused_statements(library_root, outside).values()
    denied = [sql for sql, reason in statements if reason == DENIED]
    assert len(denied) == 7
    with duckdb.connect() as plain:
        for sql in denied:
            assert plain.execute(sql).fetchall(), sql


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("COPY (SELECT 1) TO 'x.csv'", "only queries: got COPY"),
        ("select 1; select 2", "only one statement per call: got 2 (SELECT, SELECT)"),
        ("INSTALL httpfs", "only queries: got INSTALL"),
        ("SET threads = 1", "only queries: got SET"),
        ("ATTACH 'x.db'", "only queries: got ATTACH"),
        ("CREATE TABLE t (x INT)", "only queries: got CREATE"),
        ("PRAGMA version", "only queries: got PRAGMA"),
        ("EXPLAIN SELECT 1", "only queries: got EXPLAIN"),
        ("WITH c AS (COPY (SELECT 1) TO 'x.csv') SELECT * FROM c", "got COPY inside the query"),
        (
            "SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d)",
            "got DELETE inside the query",
        ),
        ("WITH i AS (INSERT INTO t VALUES (1) RETURNING *) FROM i", "got INSERT inside"),
        ("SELECT * FROM query('SELECT 1')", "function query() is not allowed"),
        ("SELECT * FROM checkpoint()", "function checkpoint() is not allowed"),
    ],
)
def test_the_check_names_what_it_refused(sql, message):
    with pytest.raises(ReadOnlyQueryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_read_only_query(sql)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "no statement given"),
        ("-- only a comment", "no statement given"),
        ("SELECT 1 INTO t", 'syntax error at or near "INTO"'),
        ("SELEC 1", 'syntax error at or near "SELEC"'),
    ],
)
def test_sql_that_does_not_parse_is_a_mistake_not_a_refusal(sql, message):
    with pytest.raises(InvalidQueryError, match=message) as invalid:
        check_read_only_query(sql)
    assert str(invalid.value).startswith("not valid SQL: ")
    assert not isinstance(invalid.value, ReadOnlyQueryError)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1;",
        "FROM images",
        "VALUES (1), (2)",
        "DESCRIBE images",
        "SHOW TABLES",
        "SUMMARIZE images",
        "SELECT 1 AS x UNION ALL SELECT 2 EXCEPT SELECT 3",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) FROM r",
        "SELECT 'COPY' AS \"insert\", 'x' AS update -- DELETE",
        "SELECT * FROM images_at_least($w, $h)",
    ],
)
def test_queries_pass_the_check_unchanged(sql):
    assert check_read_only_query(sql) == sql


def test_queries_macros_and_parameters_still_work(library_root):
    library = Library(library_root)
    assert library.query("SELECT count(*) AS n FROM images") == [{"n": 5}]
    big = library.query("SELECT md5, width FROM images_at_least(?, ?) ORDER BY md5", [400, 300])
    assert len(big) == 4 and all(row["width"] >= 400 for row in big)  # all but the thumbnail
    named = library.query(
        "SELECT md5 FROM images_at_least($w, $h) ORDER BY md5", {"w": 400, "h": 300}
    )
    assert [row["md5"] for row in named] == [row["md5"] for row in big]
    assert library.query("DESCRIBE images")[0]["column_name"] == "md5"
    image = library.lookup(big[0]["md5"])
    assert image is not None and image["sources"][0].endswith(".jpg")
    assert library.similar(big[0]["md5"], max_distance=0)[0]["md5"] == big[0]["md5"]
    assert library.query("SELECT * FROM images_with_attribute(?, ?)", ["exif.make", "Canon"]) == []


def test_the_readme_commands_still_work(cli):
    code, out, err = cli("SELECT format, count(*) FROM images GROUP BY 1")
    assert (code, err) == (0, "") and out.splitlines() == ["format,count_star()", "jpeg,5"]
    code, out, err = cli(
        "SELECT md5, width, height FROM images_at_least(?, ?)", "--param", "400", "--param", "300"
    )
    assert code == 0 and out.splitlines()[0] == "md5,width,height"
    assert len(out.splitlines()) == 1 + 4
    code, out, _ = cli("SELECT md5, width FROM images ORDER BY width LIMIT 1", "--json")
    assert code == 0 and json.loads(out)["width"] == 100


def test_the_connection_itself_is_locked(library_root, outside):
    """Without the statement check, the database still refuses files and settings."""
    before = _files(library_root, outside)
    with Library(library_root).connect() as catalog:
        connection = catalog.connection  # DuckDB itself, past the statement check
        assert connection.execute("SELECT count(*) FROM occurrences").fetchone() == (5,)
        for sql in [
            "SELECT * FROM read_text('/etc/passwd')",
            f"SELECT * FROM '{outside / 'secret.parquet'}'",
            f"COPY (SELECT 1) TO '{outside / 'copied.csv'}'",
            f"ATTACH '{outside / 'attached.db'}'",
            "SET threads = 1",
            "SET enable_external_access = true",
            "SET allowed_directories = ['/']",
            "RESET lock_configuration",
            "LOAD httpfs",
            "INSTALL httpfs",
        ]:
            with pytest.raises(duckdb.Error):
                connection.execute(sql)
        # A second reader while this one is open has a catalog of its own.
        assert Library(library_root).query("SELECT count(*) AS n FROM images") == [{"n": 5}]
    assert _files(library_root, outside) == before


def test_lock_down_without_paths_serves_registered_datasets(library_root, tmp_path):
    """A catalog of Arrow datasets registered from Python needs no DuckDB file access."""
    base = library_root / "lake" / "occurrences"
    connection = duckdb.connect()
    connection.register("base_rows", ds.dataset(base, format="parquet", partitioning="hive"))
    connection.execute("CREATE VIEW occurrences AS SELECT * FROM base_rows")
    lock_down(connection)
    assert connection.execute("SELECT count(*) FROM occurrences").fetchone() == (5,)
    some_file = next(base.rglob("*.parquet"))
    with pytest.raises(duckdb.PermissionException):
        connection.execute(f"SELECT * FROM '{some_file}'")
    with pytest.raises(duckdb.Error, match="locked"):
        connection.execute("SET enable_external_access = true")
    connection.close()


def test_an_allowed_folder_does_not_allow_its_namesakes(tmp_path):
    lake, lake2 = tmp_path / "lake", tmp_path / "lake2"
    for folder in (lake, lake2):
        folder.mkdir()
        pq.write_table(pa.table({"x": [1]}), folder / "t.parquet")
    with lock_down(duckdb.connect(), [lake]) as connection:
        assert connection.execute(f"SELECT x FROM '{lake / 't.parquet'}'").fetchone() == (1,)
        with pytest.raises(duckdb.PermissionException):
            connection.execute(f"SELECT x FROM '{lake2 / 't.parquet'}'")


def test_locking_a_locked_database_needs_the_same_paths(tmp_path):
    with lock_down(duckdb.connect(), [tmp_path]) as connection:
        assert lock_down(connection, [tmp_path]) is connection
        with pytest.raises(RuntimeError, match="already locked"):
            lock_down(connection, [tmp_path / "elsewhere"])
