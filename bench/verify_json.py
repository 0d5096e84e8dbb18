"""What comparing JSON columns costs `pgsnow verify`, on each side, against a baseline run beside it.

PostgreSQL: the canonical JSON text (pgsnow.verify.pg_canonical_json, a recursive walk per value)
hashed over a table of generated documents, against the cheapest full read of the same column
(md5 of jsonb::text), with JIT off (as verify runs it) and, for the record, on.
Snowflake side: the UDF body (pgsnow.canonical_json) in-process, per document, against json.loads
alone. Results go to docs/performance.md by hand; nothing here asserts a time.

    .venv/bin/python bench/verify_json.py [--rows 200000] [--dsn "host=127.0.0.1 dbname=test user=postgres"]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from collections.abc import Callable

import psycopg2
from psycopg2 import sql

from pgsnow.canonical_json import canonical_json
from pgsnow.verify import pg_canonical_json


def document(rng: random.Random, i: int) -> str:
    """An order-like document: a dozen keys, a nested address, an array of line items."""
    lines = [
        {
            "sku": f"SKU-{rng.randint(1, 99999):05d}",
            "qty": rng.randint(1, 9),
            "price": round(rng.uniform(1, 500), 2),
        }
        for _ in range(rng.randint(1, 5))
    ]
    return json.dumps(
        {
            "id": i,
            "customer": {"name": f"customer {rng.randint(1, 10**6)}", "vip": rng.random() < 0.1},
            "address": {
                "city": rng.choice(["Zürich", "Lyon", "Osaka", "Lima"]),
                "zip": f"{rng.randint(0, 99999):05d}",
            },
            "lines": lines,
            "total": round(sum(x["qty"] * x["price"] for x in lines), 2),
            "ratio": rng.random(),
            "tags": rng.sample(["new", "gift", "express", "b2b", "promo"], k=rng.randint(0, 3)),
            "note": None if rng.random() < 0.5 else "leave at the door",
        }
    )


def timed(run: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dsn", default="host=127.0.0.1 dbname=test user=postgres")
    args = parser.parse_args()
    rng = random.Random(7)
    documents = [document(rng, i) for i in range(args.rows)]
    schema = f"pgsnow_bench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(args.dsn)
    conn.autocommit = True
    table = sql.Identifier(schema, "docs")
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            cur.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, doc jsonb)").format(table))
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT i, d::jsonb FROM unnest(%s::text[]) WITH ORDINALITY AS u(d, i)"
                ).format(table),
                (documents,),
            )
            cur.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
            baseline_query = sql.SQL("SELECT md5(string_agg(md5(doc::text), '' ORDER BY id)) FROM {}").format(
                table
            )
            canonical_query = sql.SQL("SELECT md5(string_agg(md5({}), '' ORDER BY id)) FROM {} AS t").format(
                pg_canonical_json(sql.SQL("t.doc")), table
            )
            results: dict[str, float] = {}
            for jit in ("off", "on"):
                cur.execute(f"SET jit = {jit}")
                results[f"postgres baseline (md5 of jsonb::text), jit {jit}"] = timed(
                    lambda: cur.execute(baseline_query)
                )
                # with JIT on, one run: compiling is what it measures, and it is slow
                results[f"postgres canonical JSON, jit {jit}"] = timed(
                    lambda: cur.execute(canonical_query), repeat=3 if jit == "off" else 1
                )
        results["python json.loads only"] = timed(lambda: [json.loads(d) for d in documents])
        results["python canonical_json (the UDF body)"] = timed(
            lambda: [canonical_json(d) for d in documents]
        )
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.close()
    print(f"{args.rows} documents, best of 3 (JIT on: one run)")
    for name, seconds in results.items():
        print(f"  {name:48s} {seconds:8.2f} s  {args.rows / seconds:>10,.0f} docs/s")
    off = (
        results["postgres canonical JSON, jit off"]
        / results["postgres baseline (md5 of jsonb::text), jit off"]
    )
    udf = results["python canonical_json (the UDF body)"] / results["python json.loads only"]
    print(f"  ratio canonical/baseline: postgres {off:.1f}x (jit off), python {udf:.1f}x")


if __name__ == "__main__":
    main()
