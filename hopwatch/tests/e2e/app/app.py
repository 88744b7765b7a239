"""The app pod of hopwatch's application-protocol end-to-end tests.

A FastAPI app behind nginx that talks to PostgreSQL (asyncpg), Redis (redis-py's asyncio client)
and MariaDB (aiomysql), reaching each BY NAME through the DNS server in resolv.conf. Every
endpoint makes a known, small set of backend calls, so a test knows exactly which requests,
queries, errors and lookups hopwatch should report for it:

  GET  /health                  no backend call
  GET  /db/users                SELECT id, name FROM users           (PostgreSQL)
  GET  /db/sleep?ms=50          SELECT pg_sleep(0.05)                (PostgreSQL)
  GET  /db/error                SELECT on a missing table -> 500, SQLSTATE 42P01
  GET  /cache/get?key=k         GET k                                (Redis)
  POST /cache/set?key=k&value=v SET k v                              (Redis)
  GET  /cache/sleep?ms=50       DEBUG SLEEP 0.05                     (Redis)
  GET  /cache/error             LPUSH on a string key -> 500, -WRONGTYPE error reply
  GET  /cache/pipeline          SET, INCR, GET, DEL in one round trip (Redis)
  GET  /mysql/users             SELECT id, name FROM users           (MariaDB)
  GET  /mysql/sleep?ms=50       SELECT SLEEP(0.05)                   (MariaDB)
  GET  /mysql/error             SELECT on a missing table -> 500, error 1146
  GET  /dns/missing             getaddrinfo of a name the DNS server does not know -> 200 with the error
  GET  /dns/resolve?name=n      getaddrinfo(n) -> 200 with the addresses, 404 with the error
  GET  /chain                   one PostgreSQL, one Redis and one MariaDB call
  GET  /trace?token=t&ms=20     sleep, SELECT 't' (simple query), sleep, GET t (Redis): the
                                token is the truth request tracing is scored against
  GET  /fail                    500, no backend call

Configuration (environment, set by the test): APP_PG_HOST, APP_PG_PORT, APP_PG_USER,
APP_PG_DATABASE, APP_REDIS_HOST, APP_REDIS_PORT, APP_MYSQL_HOST, APP_MYSQL_PORT, APP_MYSQL_USER,
APP_MYSQL_PASSWORD, APP_MYSQL_DATABASE, APP_DNS_MISSING. Hosts are names, not addresses.
"""

import asyncio
import os
import socket
from contextlib import asynccontextmanager

import aiomysql
import asyncpg
import pymysql
import redis.asyncio as aioredis
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"app.py: environment variable {name} is not set (the test sets it)")
    return value


PG = dict(
    host=env("APP_PG_HOST"),
    port=int(env("APP_PG_PORT")),
    user=env("APP_PG_USER"),
    database=env("APP_PG_DATABASE"),
)
REDIS = dict(host=env("APP_REDIS_HOST"), port=int(env("APP_REDIS_PORT")))
MYSQL = dict(
    host=env("APP_MYSQL_HOST"),
    port=int(env("APP_MYSQL_PORT")),
    user=env("APP_MYSQL_USER"),
    password=env("APP_MYSQL_PASSWORD"),
    db=env("APP_MYSQL_DATABASE"),
)
MISSING_NAME = env("APP_DNS_MISSING")

# A key that holds a string, so that a list command on it gets Redis's WRONGTYPE error reply.
STRING_KEY = "hopwatch:string"
MAX_SLEEP_MS = 10_000


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Connect to everything before serving: a running app proves every backend name resolved
    # and every backend answered.
    app.state.pg = await asyncpg.create_pool(**PG, min_size=1, max_size=4)
    app.state.redis = aioredis.Redis(**REDIS, decode_responses=True)
    await app.state.redis.set(STRING_KEY, "not a list")
    app.state.mysql = await aiomysql.create_pool(**MYSQL, minsize=1, maxsize=4, autocommit=True)
    try:
        yield
    finally:
        app.state.mysql.close()
        await app.state.mysql.wait_closed()
        await app.state.redis.aclose()
        await app.state.pg.close()


app = FastAPI(lifespan=lifespan)


def error(status: int, **body) -> JSONResponse:
    return JSONResponse(status_code=status, content=body)


@app.get("/health")
async def health():
    return {"status": "ok"}


@app.get("/fail")
async def fail():
    return error(500, error="failure requested by the test")


# PostgreSQL ---------------------------------------------------------------------------------


@app.get("/db/users")
async def db_users():
    rows = await app.state.pg.fetch("SELECT id, name FROM users ORDER BY id")
    return {"users": [dict(r) for r in rows]}


@app.get("/db/sleep")
async def db_sleep(ms: int = Query(50, ge=0, le=MAX_SLEEP_MS)):
    await app.state.pg.execute("SELECT pg_sleep($1)", ms / 1000)
    return {"slept_ms": ms}


@app.get("/db/error")
async def db_error():
    try:
        await app.state.pg.fetch("SELECT * FROM missing_table")
    except asyncpg.PostgresError as e:
        return error(500, error=str(e), sqlstate=e.sqlstate)
    return {"error": None}


# Redis --------------------------------------------------------------------------------------


@app.get("/cache/get")
async def cache_get(key: str):
    return {"key": key, "value": await app.state.redis.get(key)}


@app.post("/cache/set")
async def cache_set(key: str, value: str):
    await app.state.redis.set(key, value)
    return {"key": key, "value": value}


@app.get("/cache/sleep")
async def cache_sleep(ms: int = Query(50, ge=0, le=MAX_SLEEP_MS)):
    await app.state.redis.execute_command("DEBUG", "SLEEP", f"{ms / 1000}")
    return {"slept_ms": ms}


@app.get("/cache/error")
async def cache_error():
    try:
        await app.state.redis.lpush(STRING_KEY, "x")
    except aioredis.ResponseError as e:
        return error(500, error=str(e))
    return {"error": None}


@app.get("/cache/pipeline")
async def cache_pipeline():
    async with app.state.redis.pipeline(transaction=False) as pipe:
        pipe.set("hopwatch:pipeline", "1")
        pipe.incr("hopwatch:counter")
        pipe.get("hopwatch:pipeline")
        pipe.delete("hopwatch:pipeline")
        results = await pipe.execute()
    return {"commands": ["SET", "INCR", "GET", "DEL"], "results": results}


# MariaDB ------------------------------------------------------------------------------------


async def mysql_query(sql: str, *args):
    async with app.state.mysql.acquire() as conn:
        async with conn.cursor() as cur:
            await cur.execute(sql, args or None)
            return await cur.fetchall()


@app.get("/mysql/users")
async def mysql_users():
    rows = await mysql_query("SELECT id, name FROM users ORDER BY id")
    return {"users": [{"id": i, "name": n} for i, n in rows]}


@app.get("/mysql/sleep")
async def mysql_sleep(ms: int = Query(50, ge=0, le=MAX_SLEEP_MS)):
    await mysql_query("SELECT SLEEP(%s)", ms / 1000)
    return {"slept_ms": ms}


@app.get("/mysql/error")
async def mysql_error():
    try:
        await mysql_query("SELECT * FROM missing_table")
    except pymysql.err.MySQLError as e:
        code, message = e.args[0], e.args[1] if len(e.args) > 1 else str(e)
        return error(500, error=message, errno=code)
    return {"error": None}


# DNS ----------------------------------------------------------------------------------------


async def resolve(name: str):
    """getaddrinfo through glibc (and so resolv.conf), as the database clients do."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return {"name": name, "resolved": False, "error": e.strerror, "errno": e.errno}
    return {"name": name, "resolved": True, "addresses": sorted({i[4][0] for i in infos})}


@app.get("/dns/missing")
async def dns_missing():
    return await resolve(MISSING_NAME)


@app.get("/dns/resolve")
async def dns_resolve(name: str):
    result = await resolve(name)
    return result if result["resolved"] else error(404, **result)


# All backends -------------------------------------------------------------------------------


@app.get("/trace")
async def trace(
    token: str = Query(pattern="^[A-Za-z0-9]{1,40}$"),
    ms: int = Query(0, ge=0, le=MAX_SLEEP_MS),
):
    # Sleeps on either side of the query interleave concurrent requests on the event loop.
    await asyncio.sleep(ms / 2000)
    await app.state.pg.execute(f"SELECT '{token}'::text")
    await asyncio.sleep(ms / 2000)
    return {"token": token, "value": await app.state.redis.get(token)}


@app.get("/chain")
async def chain():
    users = await app.state.pg.fetchval("SELECT count(*) FROM users")
    hits = await app.state.redis.incr("hopwatch:chain")
    (one,) = (await mysql_query("SELECT 1"))[0]
    return {"pg_users": users, "redis_hits": hits, "mysql": one}
