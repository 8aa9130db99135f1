//! Types of the generated command table (`table.rs`): what Redis 7 says about each command
//! through `COMMAND INFO` and `COMMAND DOCS`. Pure data; no parsing of requests here.

/// One Redis command (or one subcommand of a container command such as `CLIENT`).
#[derive(Debug)]
pub struct CommandDef {
    /// Lower-case name; for a subcommand, only the part after `|` (`"setname"`).
    pub name: &'static str,
    /// Redis arity: positive = exact argument count (name included), negative = at least -arity.
    pub arity: i32,
    /// Bit set of the `F_*` flags below.
    pub flags: u64,
    /// `COMMAND DOCS` group (`"string"`, `"pubsub"`, `"transactions"`, ...).
    pub group: &'static str,
    /// Key specifications, in Redis's order.
    pub key_specs: &'static [KeySpec],
    /// Subcommands, sorted by name; empty for plain commands.
    pub subcommands: &'static [CommandDef],
}

/// One key specification (Redis 7 `key_specs`).
#[derive(Debug)]
pub struct KeySpec {
    pub begin: BeginSearch,
    pub find: FindKeys,
    /// Bit set of the `KS_*` flags below.
    pub flags: u32,
}

/// Where the search for keys starts.
#[derive(Debug)]
pub enum BeginSearch {
    /// Keys start at this argument index (0 = the command name).
    Index(i32),
    /// Keys start after `keyword`, searched from `start_from` (negative: from the end).
    Keyword { keyword: &'static str, start_from: i32 },
    /// Redis could not describe it (the command has `movablekeys` and custom code).
    Unknown,
}

/// How keys are found from the start position.
#[derive(Debug)]
pub enum FindKeys {
    /// `last_key` relative to the start (negative: from the end), every `step`; `limit` > 0
    /// means "1/limit of the remaining args" when `last_key` is -1.
    Range {
        last_key: i32,
        step: i32,
        limit: i32,
    },
    /// The number of keys is the argument at `keynum_idx` (relative to the start); keys
    /// begin at `first_key` (relative to the start) every `step`.
    Keynum {
        keynum_idx: i32,
        first_key: i32,
        step: i32,
    },
    Unknown,
}

pub const F_WRITE: u64 = 1 << 0;
pub const F_READONLY: u64 = 1 << 1;
pub const F_DENYOOM: u64 = 1 << 2;
pub const F_MODULE: u64 = 1 << 3;
pub const F_ADMIN: u64 = 1 << 4;
pub const F_PUBSUB: u64 = 1 << 5;
pub const F_NOSCRIPT: u64 = 1 << 6;
pub const F_BLOCKING: u64 = 1 << 7;
pub const F_LOADING: u64 = 1 << 8;
pub const F_STALE: u64 = 1 << 9;
pub const F_SKIP_MONITOR: u64 = 1 << 10;
pub const F_SKIP_SLOWLOG: u64 = 1 << 11;
pub const F_ASKING: u64 = 1 << 12;
pub const F_FAST: u64 = 1 << 13;
pub const F_NO_AUTH: u64 = 1 << 14;
pub const F_MAY_REPLICATE: u64 = 1 << 15;
pub const F_NO_MANDATORY_KEYS: u64 = 1 << 16;
pub const F_NO_ASYNC_LOADING: u64 = 1 << 17;
pub const F_NO_MULTI: u64 = 1 << 18;
pub const F_MOVABLEKEYS: u64 = 1 << 19;
pub const F_ALLOW_BUSY: u64 = 1 << 20;
pub const F_SENTINEL: u64 = 1 << 21;
pub const F_ONLY_SENTINEL: u64 = 1 << 22;

pub const KS_RO: u32 = 1 << 0;
pub const KS_RW: u32 = 1 << 1;
pub const KS_OW: u32 = 1 << 2;
pub const KS_RM: u32 = 1 << 3;
pub const KS_ACCESS: u32 = 1 << 4;
pub const KS_UPDATE: u32 = 1 << 5;
pub const KS_INSERT: u32 = 1 << 6;
pub const KS_DELETE: u32 = 1 << 7;
pub const KS_NOT_KEY: u32 = 1 << 8;
pub const KS_INCOMPLETE: u32 = 1 << 9;
pub const KS_VARIABLE_FLAGS: u32 = 1 << 10;
