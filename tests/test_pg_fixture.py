"""The throwaway PostgreSQL of tests/pg.py: a real server on loopback, a fresh database per test."""

import psycopg


def test_pg_db_url_is_a_fresh_database_on_a_loopback_server(pg_db_url):
    assert pg_db_url.startswith("postgresql://kb@127.0.0.1:")
    with psycopg.connect(pg_db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        conn.execute("CREATE TABLE docs (id serial PRIMARY KEY, title text NOT NULL, body jsonb)")
        conn.execute("INSERT INTO docs (title, body) VALUES (%s, %s::jsonb)", ("退款政策", '{"days": 30}'))
        assert conn.execute("SELECT id, title, body FROM docs").fetchall() == [(1, "退款政策", {"days": 30})]
        assert conn.execute("SHOW server_version").fetchone()[0][:1].isdigit()
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SHOW server_encoding").fetchone()[0] == "UTF8"
