import psycopg

from walacord.pgcluster import PgCluster


def test_cluster_accepts_password_login(pg_cluster: PgCluster) -> None:
    with psycopg.connect(pg_cluster.url(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cluster_rejects_wrong_password(pg_cluster: PgCluster) -> None:
    try:
        psycopg.connect(pg_cluster.url(password="wrong"), connect_timeout=5)
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
    else:
        raise AssertionError("a wrong password was accepted")


def test_pg_db_is_private(pg_db: str) -> None:
    with psycopg.connect(pg_db, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE t (x int)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
