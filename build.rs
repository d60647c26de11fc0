//! Release builds for x86_64 Linux place the functions the runtime runs while it starts and idles next to each
//! other (`src/startup-order.txt`, written by `benches/startup_order.py`, given to the linker as a symbol order).
//! The kernel maps a binary's code in 64 KB blocks around every page touched: start-up code spread over the whole
//! text kept most of it resident (docs/performance.md, Footprint). Names the file lists that a build no longer has
//! are ignored. Only where the linker is rust-lld (rustc's default for this target since 1.90) and no linker was
//! chosen in the flags; `AION_STARTUP_ORDER=off` leaves the linker's order.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/startup-order.txt");
    println!("cargo:rerun-if-env-changed=AION_STARTUP_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let own_linker = ["linker", "fuse-ld"].iter().any(|w| var("CARGO_ENCODED_RUSTFLAGS").contains(w))
        || !var("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_empty();
    if var("PROFILE") != "release"
        || var("TARGET") != "x86_64-unknown-linux-gnu"
        || var("AION_STARTUP_ORDER") == "off"
        || own_linker
        || !rustc_links_with_lld(&var("RUSTC"))
    {
        return;
    }
    let file = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("src").join("startup-order.txt");
    if file.is_file() && !file.to_string_lossy().contains(',') {
        println!("cargo:rustc-link-arg-bin=aion=-Wl,--symbol-ordering-file={}", file.display());
        println!("cargo:rustc-link-arg-bin=aion=-Wl,--no-warn-symbol-ordering");
    }
}

/// True for rustc 1.90 and later, which link x86_64 Linux binaries with its own lld.
fn rustc_links_with_lld(rustc: &str) -> bool {
    let Ok(out) = std::process::Command::new(if rustc.is_empty() { "rustc" } else { rustc }).arg("--version").output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.split_whitespace().nth(1).unwrap_or("").split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    matches!((v.next(), v.next()), (Some(major), Some(minor)) if major > 1 || (major == 1 && minor >= 90))
}
