//! The driver component, built from WAT text at test time (no wasm toolchain needed).
//!
//! Its core module imports the lowered `wasi:keyvalue` functions and exports one lifted
//! function per driver call. Each export opens the bucket it is given, forwards the call with
//! the handle, drops the handle and returns the import's own return area: `test:driver/kv`'s
//! result types have the same canonical-ABI layout as `wasi:keyvalue`'s, so the bytes the host
//! wrote are already the answer. Lists the host passes in are allocated by a bump allocator
//! (`cabi_realloc`); nothing is freed, which is fine for an instance that lives for a test.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// One forwarded call: the driver export, the import it forwards to, the core types of the
/// parameters after the bucket name, and where the result's payload starts in the return area
/// (4, or 8 when the payload holds a u64).
struct Forward {
    export: &'static str,
    module: &'static str,
    import: &'static str,
    rest: &'static [&'static str],
    payload: u32,
}

const STORE: &str = "wasi:keyvalue/store@0.2.0-draft";
const ATOMICS: &str = "wasi:keyvalue/atomics@0.2.0-draft";
const BATCH: &str = "wasi:keyvalue/batch@0.2.0-draft";

const FORWARDS: &[Forward] = &[
    Forward {
        export: "get",
        module: STORE,
        import: "[method]bucket.get",
        rest: &["i32", "i32"],
        payload: 4,
    },
    Forward {
        export: "set",
        module: STORE,
        import: "[method]bucket.set",
        rest: &["i32", "i32", "i32", "i32"],
        payload: 4,
    },
    Forward {
        export: "delete",
        module: STORE,
        import: "[method]bucket.delete",
        rest: &["i32", "i32"],
        payload: 4,
    },
    Forward {
        export: "exists",
        module: STORE,
        import: "[method]bucket.exists",
        rest: &["i32", "i32"],
        payload: 4,
    },
    Forward {
        export: "list-keys",
        module: STORE,
        import: "[method]bucket.list-keys",
        rest: &["i32", "i64"],
        payload: 8,
    },
    Forward {
        export: "increment",
        module: ATOMICS,
        import: "increment",
        rest: &["i32", "i32", "i64"],
        payload: 8,
    },
    Forward {
        export: "get-many",
        module: BATCH,
        import: "get-many",
        rest: &["i32", "i32"],
        payload: 4,
    },
    Forward {
        export: "set-many",
        module: BATCH,
        import: "set-many",
        rest: &["i32", "i32"],
        payload: 4,
    },
];

/// The bump allocator both components export as `cabi_realloc` (the host allocates the
/// strings and lists it passes in with it); it needs a mutable global `$heap`, declared here.
const ALLOCATOR: &str = r#"  (global $heap (mut i32) (i32.const 1024))
  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $p i32)
    (local.set $p
      (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get $align))))
    (global.set $heap (i32.add (local.get $p) (local.get $size)))
    (block $fits
      (loop $grow
        (br_if $fits (i32.le_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))))
        (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))
        (unreachable)))
    (if (local.get $old)
      (then (memory.copy (local.get $p) (local.get $old) (local.get $old_size))))
    (local.get $p))
"#;

/// The export's return area (up to 24 bytes, 8-aligned) and `open`'s (16 bytes).
const RET: u32 = 16;
const OPEN_RET: u32 = 64;

/// The core module, as WAT text.
pub fn core_wat() -> String {
    let mut wat = String::from("(module\n");
    writeln!(
        wat,
        "  (import \"{STORE}\" \"open\" (func $open (param i32 i32 i32)))\n  \
           (import \"{STORE}\" \"[resource-drop]bucket\" (func $drop (param i32)))"
    )
    .unwrap();
    for (i, f) in FORWARDS.iter().enumerate() {
        writeln!(
            wat,
            "  (import \"{}\" \"{}\" (func $imp{i} (param i32 {} i32)))",
            f.module,
            f.import,
            f.rest.join(" ")
        )
        .unwrap();
    }
    wat.push_str("  (memory (export \"memory\") 1)\n");
    wat.push_str(ALLOCATOR);
    for (i, f) in FORWARDS.iter().enumerate() {
        // Parameters: 0, 1 = the bucket name; 2.. = the forwarded ones.
        let params = f.rest.join(" ");
        let forwarded: String = (0..f.rest.len())
            .map(|n| format!(" (local.get {})", n + 2))
            .collect();
        let handle = f.rest.len() + 2;
        let p = RET + f.payload;
        writeln!(
            wat,
            r#"  (func (export "test:driver/kv#{export}") (param i32 i32 {params}) (result i32)
    (local i32)
    (call $open (local.get 0) (local.get 1) (i32.const {OPEN_RET}))
    (if (i32.load8_u (i32.const {OPEN_RET}))
      (then
        ;; open failed: the same error, at this result's payload offset
        (i32.store8 (i32.const {RET}) (i32.const 1))
        (i32.store (i32.const {p}) (i32.load (i32.const {o4})))
        (i32.store (i32.const {p4}) (i32.load (i32.const {o8})))
        (i32.store (i32.const {p8}) (i32.load (i32.const {o12})))
        (return (i32.const {RET}))))
    (local.set {handle} (i32.load (i32.const {o4})))
    (call $imp{i} (local.get {handle}){forwarded} (i32.const {RET}))
    (call $drop (local.get {handle}))
    (i32.const {RET}))"#,
            export = f.export,
            p4 = p + 4,
            p8 = p + 8,
            o4 = OPEN_RET + 4,
            o8 = OPEN_RET + 8,
            o12 = OPEN_RET + 12,
        )
        .unwrap();
    }
    wat.push_str(")\n");
    wat
}

/// Where the watcher keeps what it was told: the bucket name, then what `on-delete` stores.
const SEEN: u32 = 512;
const DELETED: u32 = 520;

/// The watcher component's core module, as WAT text: it exports `wasi:keyvalue/watcher`
/// and, told of a change of `key`, opens its bucket `seen` and sets `key` there to the new
/// value (`on-set`) or to `deleted` (`on-delete`). It never uses or drops the bucket handle it
/// is given: the 1.x host makes it from the number we send, in a fresh instance whose table
/// holds no such bucket (using or dropping it traps).
pub fn watcher_wat() -> String {
    format!(
        r#"(module
  (import "{STORE}" "open" (func $open (param i32 i32 i32)))
  (import "{STORE}" "[method]bucket.set" (func $set (param i32 i32 i32 i32 i32 i32)))
  (import "{STORE}" "[resource-drop]bucket" (func $drop (param i32)))
  (memory (export "memory") 1)
  (data (i32.const {SEEN}) "seen")
  (data (i32.const {DELETED}) "deleted")
{ALLOCATOR}  ;; Opens `seen`, sets key = value in it, drops the handle; traps if the store refuses.
  (func $remember (param $key i32) (param $key_len i32) (param $value i32) (param $value_len i32)
    (local $bucket i32)
    (call $open (i32.const {SEEN}) (i32.const 4) (i32.const {OPEN_RET}))
    (if (i32.load8_u (i32.const {OPEN_RET})) (then (unreachable)))
    (local.set $bucket (i32.load (i32.const {open_handle})))
    (call $set (local.get $bucket) (local.get $key) (local.get $key_len) (local.get $value) (local.get $value_len) (i32.const {RET}))
    (if (i32.load8_u (i32.const {RET})) (then (unreachable)))
    (call $drop (local.get $bucket)))
  (func (export "wasi:keyvalue/watcher@0.2.0-draft#on-set") (param i32 i32 i32 i32 i32)
    (call $remember (local.get 1) (local.get 2) (local.get 3) (local.get 4)))
  (func (export "wasi:keyvalue/watcher@0.2.0-draft#on-delete") (param i32 i32 i32)
    (call $remember (local.get 1) (local.get 2) (i32.const {DELETED}) (i32.const 7)))
)
"#,
        open_handle = OPEN_RET + 4,
    )
}

/// Encodes the driver component (world `test:driver/driver` from `wit_dir`).
pub fn build(wit_dir: &Path) -> anyhow::Result<Vec<u8>> {
    encode(wit_dir, "driver", &core_wat())
}

/// Encodes the watcher component (world `test:driver/watcher` from `wit_dir`).
pub fn build_watcher(wit_dir: &Path) -> anyhow::Result<Vec<u8>> {
    encode(wit_dir, "watcher", &watcher_wat())
}

/// Encodes the core module `wat` as a component of `world` (from `wit_dir`).
fn encode(wit_dir: &Path, world: &str, wat: &str) -> anyhow::Result<Vec<u8>> {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_dir(wit_dir)
        .with_context(|| format!("cannot parse {}", wit_dir.display()))?;
    let world = resolve.select_world(&[package], Some(world))?;
    let mut module =
        wat::parse_str(wat).with_context(|| format!("the {world:?} WAT does not parse"))?;
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )?;
    wit_component::ComponentEncoder::default()
        .module(&module)?
        .validate(true)
        .encode()
        .context("cannot encode the component")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_components_encode_and_validate() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
        for component in [
            super::build(&wit).unwrap(),
            super::build_watcher(&wit).unwrap(),
        ] {
            // A component (layer 1), not a core module.
            assert_eq!(&component[..4], b"\0asm");
            assert_eq!(&component[4..8], &[0x0d, 0x00, 0x01, 0x00]);
        }
    }
}
