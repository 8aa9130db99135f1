#!/usr/bin/env python3
"""Generate src/command/table.rs from a running redis-server.

Usage: gen_command_table.py [--out PATH] [HOST] [PORT]

Connects to HOST:PORT (default 127.0.0.1:6379) over a plain TCP socket, speaks RESP2
itself (standard library only), asks for `INFO server`, `COMMAND INFO` and `COMMAND DOCS`,
and writes Rust source for the types in src/command/spec.rs to stdout or to PATH.
Afterwards run `rustfmt --edition 2021 src/command/table.rs`.

Anything the table cannot represent (an unknown command flag, key-spec flag, begin_search
or find_keys type, a malformed reply) is a hard error: the script exits non-zero and
writes nothing.
"""

from __future__ import annotations

import argparse
import socket
import sys

# ---------------------------------------------------------------------------------------
# RESP2 client
# ---------------------------------------------------------------------------------------


class RedisError(Exception):
    """An error reply (`-ERR ...`) from the server."""


class ProtocolError(Exception):
    """The server sent something that is not valid RESP2."""


class Resp2Conn:
    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()

    def call(self, *args: str | bytes):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        reply = self._read()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def _line(self) -> bytes:
        line = self.rfile.readline()
        if not line:
            raise ProtocolError("connection closed by server")
        if not line.endswith(b"\r\n"):
            raise ProtocolError(f"line not terminated by CRLF: {line!r}")
        return line[:-2]

    def _read(self):
        """Parse one RESP2 reply. Simple strings and bulk strings become `str` (UTF-8),
        integers `int`, arrays `list`, nulls `None`; an error reply is returned (not
        raised) as a RedisError so that errors nested in arrays do not desync the stream."""
        line = self._line()
        if not line:
            raise ProtocolError("empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rfile.read(n + 2)
            if len(data) != n + 2:
                raise ProtocolError("connection closed inside a bulk string")
            if data[-2:] != b"\r\n":
                raise ProtocolError("bulk string not terminated by CRLF")
            return data[:-2].decode()
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise ProtocolError(f"unexpected RESP2 type byte {kind!r} in {line!r}")


# ---------------------------------------------------------------------------------------
# Reply helpers
# ---------------------------------------------------------------------------------------


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"gen_command_table.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def as_map(flat, what: str) -> dict:
    """A RESP2 flat key/value array as a dict (RESP3 maps arrive like this in RESP2)."""
    if not isinstance(flat, list) or len(flat) % 2:
        fail(f"{what}: expected a flat key/value array, got {flat!r}")
    d = {}
    for k, v in zip(flat[0::2], flat[1::2]):
        if not isinstance(k, str):
            fail(f"{what}: non-string map key {k!r}")
        if isinstance(v, RedisError):
            fail(f"{what}: error inside reply: {v}")
        d[k] = v
    return d


def as_int(v, what: str) -> int:
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            fail(f"{what}: expected an integer, got {v!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        fail(f"{what}: expected an integer, got {v!r}")
    if not -(2**31) <= v < 2**31:
        fail(f"{what}: {v} does not fit in i32")
    return v


# ---------------------------------------------------------------------------------------
# Flag tables (must match src/command/spec.rs)
# ---------------------------------------------------------------------------------------

# In the declaration order of spec.rs, which is also the order they are emitted in.
COMMAND_FLAGS = {
    "write": "F_WRITE",
    "readonly": "F_READONLY",
    "denyoom": "F_DENYOOM",
    "module": "F_MODULE",
    "admin": "F_ADMIN",
    "pubsub": "F_PUBSUB",
    "noscript": "F_NOSCRIPT",
    "blocking": "F_BLOCKING",
    "loading": "F_LOADING",
    "stale": "F_STALE",
    "skip_monitor": "F_SKIP_MONITOR",
    "skip_slowlog": "F_SKIP_SLOWLOG",
    "asking": "F_ASKING",
    "fast": "F_FAST",
    "no_auth": "F_NO_AUTH",
    "may_replicate": "F_MAY_REPLICATE",
    "no_mandatory_keys": "F_NO_MANDATORY_KEYS",
    "no_async_loading": "F_NO_ASYNC_LOADING",
    "no_multi": "F_NO_MULTI",
    "movablekeys": "F_MOVABLEKEYS",
    "allow_busy": "F_ALLOW_BUSY",
    "sentinel": "F_SENTINEL",
    "only_sentinel": "F_ONLY_SENTINEL",
}

KEY_SPEC_FLAGS = {
    "RO": "KS_RO",
    "RW": "KS_RW",
    "OW": "KS_OW",
    "RM": "KS_RM",
    "access": "KS_ACCESS",
    "update": "KS_UPDATE",
    "insert": "KS_INSERT",
    "delete": "KS_DELETE",
    "not_key": "KS_NOT_KEY",
    "incomplete": "KS_INCOMPLETE",
    "variable_flags": "KS_VARIABLE_FLAGS",
}


def flag_expr(names, table: dict, what: str) -> str:
    if not isinstance(names, list):
        fail(f"{what}: expected a flag array, got {names!r}")
    seen = set()
    for n in names:
        if not isinstance(n, str):
            fail(f"{what}: non-string flag {n!r}")
        if n not in table:
            fail(f"{what}: unknown flag {n!r}; add it to spec.rs and to this script")
        seen.add(n)
    consts = [c for n, c in table.items() if n in seen]
    return " | ".join(consts) if consts else "0"


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def rust_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%x}" % ord(ch))
    out.append('"')
    return "".join(out)


class Stats:
    def __init__(self) -> None:
        self.commands = 0
        self.subcommands = 0
        self.unknown_begin: list[str] = []
        self.unknown_find: list[str] = []


def parse_key_spec(raw, what: str, stats: Stats) -> dict:
    """One key spec -> {"begin": lines, "find": lines, "flags": expr}; `lines` is a list of
    Rust source lines (no indentation) for the value expression."""
    ks = as_map(raw, what)
    flags = flag_expr(ks.get("flags", []), KEY_SPEC_FLAGS, f"{what} flags")

    bs = as_map(ks.get("begin_search"), f"{what} begin_search")
    bs_type = bs.get("type")
    bs_spec = as_map(bs.get("spec", []), f"{what} begin_search spec")
    if bs_type == "index":
        begin = [f"BeginSearch::Index({as_int(bs_spec.get('index'), f'{what} index')})"]
    elif bs_type == "keyword":
        kw = bs_spec.get("keyword")
        if not isinstance(kw, str):
            fail(f"{what}: keyword is not a string: {kw!r}")
        sf = as_int(bs_spec.get("startfrom"), f"{what} startfrom")
        begin = struct_lines("BeginSearch::Keyword", [("keyword", rust_str(kw)), ("start_from", sf)])
    elif bs_type == "unknown":
        begin = ["BeginSearch::Unknown"]
        stats.unknown_begin.append(what)
    else:
        fail(f"{what}: unknown begin_search type {bs_type!r}")

    fk = as_map(ks.get("find_keys"), f"{what} find_keys")
    fk_type = fk.get("type")
    fk_spec = as_map(fk.get("spec", []), f"{what} find_keys spec")
    if fk_type == "range":
        lk = as_int(fk_spec.get("lastkey"), f"{what} lastkey")
        st = as_int(fk_spec.get("keystep"), f"{what} keystep")
        lim = as_int(fk_spec.get("limit"), f"{what} limit")
        find = struct_lines("FindKeys::Range", [("last_key", lk), ("step", st), ("limit", lim)])
    elif fk_type == "keynum":
        ki = as_int(fk_spec.get("keynumidx"), f"{what} keynumidx")
        fi = as_int(fk_spec.get("firstkey"), f"{what} firstkey")
        st = as_int(fk_spec.get("keystep"), f"{what} keystep")
        find = struct_lines(
            "FindKeys::Keynum", [("keynum_idx", ki), ("first_key", fi), ("step", st)]
        )
    elif fk_type == "unknown":
        find = ["FindKeys::Unknown"]
        stats.unknown_find.append(what)
    else:
        fail(f"{what}: unknown find_keys type {fk_type!r}")

    return {"begin": begin, "find": find, "flags": flags}


def struct_lines(path: str, fields) -> list[str]:
    """A struct literal laid out one field per line, as rustfmt does for these."""
    return [f"{path} {{"] + [f"    {k}: {v}," for k, v in fields] + ["}"]


def docs_by_name(docs_reply, what: str) -> dict:
    """COMMAND DOCS (or a doc's `subcommands`) as {lowercase name: doc dict}."""
    m = as_map(docs_reply, what)
    return {k.lower(): as_map(v, f"{what} {k}") for k, v in m.items()}


def build_def(info, docs: dict, stats: Stats, parent: str | None) -> tuple[str, dict]:
    """One COMMAND INFO entry -> (sort name, model dict)."""
    if not isinstance(info, list) or len(info) < 7:
        fail(f"malformed COMMAND INFO entry: {info!r}")
    full = info[0]
    if not isinstance(full, str):
        fail(f"command name is not a string: {full!r}")
    full = full.lower()
    if parent is None:
        if "|" in full:
            fail(f"top-level command with '|' in its name: {full!r}")
        name = full
        stats.commands += 1
    else:
        prefix = parent + "|"
        if not full.startswith(prefix):
            fail(f"subcommand {full!r} does not start with {prefix!r}")
        name = full[len(prefix):]
        stats.subcommands += 1

    arity = as_int(info[1], f"{full} arity")
    flags = flag_expr(info[2], COMMAND_FLAGS, f"{full} flags")

    raw_specs = info[8] if len(info) > 8 else []
    if raw_specs is None:
        raw_specs = []
    if not isinstance(raw_specs, list):
        fail(f"{full}: key specs are not an array: {raw_specs!r}")
    key_specs = [
        parse_key_spec(ks, f"{full} key_spec[{i}]", stats) for i, ks in enumerate(raw_specs)
    ]

    doc = docs.get(full, {})
    group = doc.get("group", "")
    if not isinstance(group, str):
        fail(f"{full}: group is not a string: {group!r}")

    raw_subs = info[9] if len(info) > 9 else []
    if raw_subs is None:
        raw_subs = []
    if not isinstance(raw_subs, list):
        fail(f"{full}: subcommands are not an array: {raw_subs!r}")
    sub_docs = docs_by_name(doc["subcommands"], f"{full} docs subcommands") if "subcommands" in doc else {}
    subs = [build_def(s, sub_docs, stats, full) for s in raw_subs]
    subs = sort_defs(subs, full)

    return name, {
        "name": name,
        "arity": arity,
        "flags": flags,
        "group": group,
        "key_specs": key_specs,
        "subcommands": subs,
    }


def sort_defs(defs: list[tuple[str, dict]], what: str) -> list[dict]:
    defs.sort(key=lambda d: d[0].encode())
    for a, b in zip(defs, defs[1:]):
        if a[0] == b[0]:
            fail(f"{what}: duplicate command name {a[0]!r}")
    return [d for _, d in defs]


# ---------------------------------------------------------------------------------------
# Rust emission
# ---------------------------------------------------------------------------------------


MAX_WIDTH = 100  # rustfmt's default max_width


def field_lines(name: str, value: list[str], pad: str) -> list[str]:
    """`name: value,` where value is a list of lines (first line continues `name: `)."""
    first = f"{pad}{name}: {value[0]}"
    if len(value) == 1:
        return [first + ","]
    return [first] + [pad + v for v in value[1:-1]] + [pad + value[-1] + ","]


def key_spec_lines(ks: dict) -> list[str]:
    out = ["KeySpec {"]
    out += field_lines("begin", ks["begin"], "    ")
    out += field_lines("find", ks["find"], "    ")
    out.append(f"    flags: {ks['flags']},")
    out.append("}")
    return out


def emit_defs(defs: list[dict], indent: int, out: list[str]) -> None:
    """Emit CommandDef literals in the layout rustfmt (edition 2021, default config)
    produces, so that running rustfmt on the output changes nothing."""
    pad = " " * indent
    fpad = pad + "    "
    for d in defs:
        out.append(f"{pad}CommandDef {{")
        out.append(f"{fpad}name: {rust_str(d['name'])},")
        out.append(f"{fpad}arity: {d['arity']},")
        flags_line = f"{fpad}flags: {d['flags']},"
        if len(flags_line) <= MAX_WIDTH:
            out.append(flags_line)
        else:  # rustfmt breaks a long `a | b | c` before each `|`
            parts = d["flags"].split(" | ")
            out.append(f"{fpad}flags: {parts[0]}")
            out += [f"{fpad}    | {p}" for p in parts[1:-1]]
            out.append(f"{fpad}    | {parts[-1]},")
        out.append(f"{fpad}group: {rust_str(d['group'])},")
        specs = d["key_specs"]
        if not specs:
            out.append(f"{fpad}key_specs: &[],")
        elif len(specs) == 1:  # rustfmt hugs a single element: `&[KeySpec { ... }]`
            lines = key_spec_lines(specs[0])
            out.append(f"{fpad}key_specs: &[{lines[0]}")
            out += [fpad + l for l in lines[1:-1]]
            out.append(f"{fpad}{lines[-1]}],")
        else:
            out.append(f"{fpad}key_specs: &[")
            for ks in specs:
                lines = key_spec_lines(ks)
                out += [fpad + "    " + l for l in lines[:-1]]
                out.append(fpad + "    " + lines[-1] + ",")
            out.append(f"{fpad}],")
        if d["subcommands"]:
            out.append(f"{fpad}subcommands: &[")
            emit_defs(d["subcommands"], indent + 8, out)
            out.append(f"{fpad}],")
        else:
            out.append(f"{fpad}subcommands: &[],")
        out.append(f"{pad}}},")


def render(version: str, defs: list[dict]) -> str:
    out = [
        f"//! Redis command table, generated by tools/gen_command_table.py from redis-server {version}.",
        "//!",
        "//! DO NOT EDIT BY HAND: regenerate with `python3 tools/gen_command_table.py --out",
        "//! src/command/table.rs [HOST] [PORT]` against a running redis-server, then run",
        "//! `rustfmt --edition 2021 src/command/table.rs`.",
        "//!",
        "//! `COMMANDS` and every `subcommands` slice are sorted by name (byte order), so they",
        "//! can be binary-searched.",
        "",
        "use super::spec::*;",
        "",
        "pub static COMMANDS: &[CommandDef] = &[",
    ]
    emit_defs(defs, 4, out)
    out.append("];")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def redis_version(conn: Resp2Conn) -> str:
    info = conn.call("INFO", "server")
    if not isinstance(info, str):
        fail(f"INFO server: unexpected reply {info!r}")
    for line in info.splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    fail("INFO server has no redis_version field")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="gen_command_table.py",
        description="Generate src/command/table.rs from a running redis-server's "
        "COMMAND INFO and COMMAND DOCS.",
    )
    ap.add_argument("host", nargs="?", default="127.0.0.1", help="default 127.0.0.1")
    ap.add_argument("port", nargs="?", type=int, default=6379, help="default 6379")
    ap.add_argument("--out", metavar="PATH", help="write here instead of stdout")
    args = ap.parse_args(argv)

    try:
        conn = Resp2Conn(args.host, args.port)
    except OSError as e:
        fail(f"cannot connect to {args.host}:{args.port}: {e}")
    try:
        version = redis_version(conn)
        infos = conn.call("COMMAND", "INFO")
        if not infos:  # servers where COMMAND INFO needs names: plain COMMAND is the same
            infos = conn.call("COMMAND")
        docs_reply = conn.call("COMMAND", "DOCS")
    except RedisError as e:
        fail(f"server error: {e}")
    except (OSError, ProtocolError, ValueError) as e:
        fail(f"talking to {args.host}:{args.port}: {e}")
    finally:
        conn.close()

    if not isinstance(infos, list) or not infos:
        fail(f"COMMAND INFO: unexpected reply {infos!r:.200}")
    for i in infos:
        if i is None or isinstance(i, RedisError):
            fail(f"COMMAND INFO: bad entry {i!r}")

    stats = Stats()
    docs = docs_by_name(docs_reply, "COMMAND DOCS")
    defs = sort_defs([build_def(i, docs, stats, None) for i in infos], "COMMANDS")
    text = render(version, defs)

    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    else:
        sys.stdout.write(text)

    print(
        f"gen_command_table.py: redis {version}: {stats.commands} commands, "
        f"{stats.subcommands} subcommands",
        file=sys.stderr,
    )
    for what in stats.unknown_begin:
        print(f"  note: {what}: begin_search unknown", file=sys.stderr)
    for what in stats.unknown_find:
        print(f"  note: {what}: find_keys unknown", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
