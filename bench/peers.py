"""asyncpg's side of the benchmark table (driven by bench/peers.ts).

Usage: python3 bench/peers.py URL WORKLOAD

WORKLOAD `first_result` connects, prints the result of one query and exits (the parent
times the process).

Runs WORKLOAD once to warm up (statements prepared, connections open), then once timed,
and prints the timed run's milliseconds. The tables are made by bench/run.ts beforehand.
"""

import asyncio
import random
import sys
import time

import asyncpg

ROWS = []


def rows(count):
    if len(ROWS) < count:
        ROWS[:] = [(i, f"user{i}@example.com", f"Name {i}") for i in range(500_000)]
    return ROWS[:count]


async def executemany(pool):
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE bench_rows")
        start = time.perf_counter()
        await conn.executemany("INSERT INTO bench_rows VALUES ($1, $2, $3)", rows(10_000))
        return time.perf_counter() - start


async def unnest(pool):
    batch = rows(10_000)
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE bench_rows")
        start = time.perf_counter()
        await conn.execute(
            "INSERT INTO bench_rows SELECT * FROM unnest($1::int[], $2::text[], $3::text[])",
            [r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch],
        )
        return time.perf_counter() - start


async def tpcb_transaction(pool):
    aid = random.randint(1, 100_000)
    tid = random.randint(1, 10)
    delta = random.randint(-5000, 5000)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(
                "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", delta, aid)
            await conn.fetchval("SELECT abalance FROM pgbench_accounts WHERE aid = $1", aid)
            await conn.execute(
                "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", delta, tid)
            await conn.execute(
                "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = 1", delta)
            await conn.execute(
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                "VALUES ($1, 1, $2, $3, CURRENT_TIMESTAMP)", tid, aid, delta)


def tpcb(clients):
    async def run(pool):
        per_client = 320 // clients

        async def client():
            for _ in range(per_client):
                await tpcb_transaction(pool)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start
    return run


async def point_reads(pool):
    async def caller(c):
        for i in range(100):
            key = (c * 100 + i) % 10_000 + 1
            value = await pool.fetchval("SELECT v FROM bench_points WHERE id = $1", key)
            if value != key * 7:
                raise RuntimeError(f"caller {c} got {value} for {key}")

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(64)))
    return time.perf_counter() - start


async def fetch_all(pool):
    start = time.perf_counter()
    rows = await pool.fetch("SELECT id, email, name FROM bench_big")
    if len(rows) != 100_000:
        raise RuntimeError(f"got {len(rows)} rows")
    return time.perf_counter() - start


async def hundred_rows(pool):
    async def caller(c):
        for i in range(100):
            first = (c * 100 + i) * 97 % 99_000
            rows = await pool.fetch(
                "SELECT id, email, name FROM bench_big WHERE id > $1 ORDER BY id LIMIT 100", first)
            if len(rows) != 100 or rows[0]["id"] != first + 1:
                raise RuntimeError("wrong rows")

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(10)))
    return time.perf_counter() - start


async def copy_small(pool):
    batch = rows(5_000)
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE bench_copy")
        start = time.perf_counter()
        for _ in range(10):
            await conn.copy_records_to_table("bench_copy", records=batch)
        return time.perf_counter() - start


async def copy_large(pool):
    batch = rows(500_000)
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE bench_copy")
        start = time.perf_counter()
        await conn.copy_records_to_table("bench_copy", records=batch)
        return time.perf_counter() - start


WORKLOADS = {
    "executemany": (executemany, 1),
    "unnest": (unnest, 1),
    "tpcb10": (tpcb(10), 10),
    "tpcb32": (tpcb(32), 32),
    "point_reads": (point_reads, 10),
    "fetch_all": (fetch_all, 1),
    "hundred_rows": (hundred_rows, 10),
    "copy_small": (copy_small, 1),
    "copy_large": (copy_large, 1),
}


async def main(url, name):
    if name == "first_result":
        # The start-up row: the parent times this whole process.
        conn = await asyncpg.connect(url)
        print(await conn.fetchval("SELECT 1"))
        return
    run, size = WORKLOADS[name]
    pool = await asyncpg.create_pool(url, min_size=size, max_size=size)
    try:
        await run(pool)
        seconds = await run(pool)
    finally:
        await pool.close()
    print(f"{seconds * 1000:.3f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
