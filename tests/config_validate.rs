//! services.yml compatibility and validation: real AION files load; broken files give every problem with
//! file:line:column; the loader never panics.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod common;
use aion::runtime::config::{load_file, load_str, Severity};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> Vec<PathBuf> {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aion")];
    // The shared fixtures next to the repository, when present (CI lays them beside the clone).
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if shared.is_dir() {
        dirs.push(shared);
    }
    let mut files = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(&d).expect("fixtures dir").flatten() {
            if e.path().extension().is_some_and(|x| x == "yml" || x == "yaml") {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 4, "fixtures missing: {files:?}");
    files
}

#[test]
fn every_aion_fixture_validates() {
    for f in fixtures() {
        let l = load_file(&f);
        let errors: Vec<String> =
            l.diagnostics.iter().filter(|d| d.severity == Severity::Error).map(|d| d.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", f.display());
        assert!(l.config.is_some());
    }
}

#[test]
fn fixture_semantics_match_aion() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aion");
    let cfg = load_file(&dir.join("aion-core-normal-config.yml")).config.expect("config");
    let t = &cfg.microservices["test"];
    assert_eq!(t.command, vec!["python3", "main.py"]);
    assert!(t.always && t.multiple && t.startup);
    assert_eq!(t.scale, 2);
    assert_eq!(t.interval, 1000);
    assert_eq!(t.volume_mount_path_list[0].container_path, "/dev");
    assert_eq!(t.volume_mount_path_list[0].host_path, "/device");
    assert!(t.volume_mount_path_list[0].bidirectional);
    let next = &t.next_service["default"];
    assert_eq!((next[0].name.as_str(), next[0].pattern.as_str(), next[0].device.as_str()), ("test2", "0", "other"));
    assert_eq!(next[1].pattern, "n", "pattern defaults to n");
    assert_eq!(cfg.devices["other"].ssh_port, 22);
    assert_eq!(cfg.devices["other2"].aion_home, "/var/lib/aion", "device defaults");
    assert_eq!(cfg.devices["other2"].username, "aion");
    let t2 = &cfg.microservices["test2"];
    assert_eq!(
        (t2.scale, t2.tag.as_str(), t2.network.as_str(), t2.service_account.as_str()),
        (1, "latest", "ClusterIP", "default")
    );

    let defs = load_file(&dir.join("aion-service-definitions.yml")).config.expect("config");
    let ui = &defs.microservices["ui-backend-for-xxxxxxx"];
    assert_eq!(ui.env["MYSQL_PORT"], "3306", "an int scalar into a string field keeps its text");
    assert_eq!(ui.network, "NodePort");
    assert_eq!(ui.ports[0].node_port, 30088);

    let sample = load_file(&dir.join("aion-core-sample.yml")).config.expect("config");
    assert!(sample.microservices["sample-microservice-job"].privileged);
    assert_eq!(sample.microservices["sample-microservice-deployment"].service_account, "controller-serviceaccount");
}

#[test]
fn unknown_keys_are_warnings_naming_the_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aion");
    let l = load_file(&dir.join("aion-core-normal-config.yml"));
    let w: Vec<String> = l.diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(w.iter().any(|d| d.contains(":9:5: warning: microservices.test: unknown key `docker` (ignored)")), "{w:?}");
}

/// An expected diagnostic: (line, column, severity, substring of the message).
type Expect = (usize, usize, Severity, &'static str);

/// (file text, expected diagnostics).
fn broken_cases() -> Vec<(&'static str, Vec<Expect>)> {
    use Severity::{Error as E, Warning as W};
    vec![
        ("microservices:\n  a:\n    ports:\n      - name: p\n        port: xxxx\n", vec![(5, 15, E, "microservices.a.ports[0].port: expected an integer, found `xxxx`")]),
        ("microservices:\n  a:\n    command: python3 main.py\n", vec![(3, 14, E, "expected a list (argv, no shell)")]),
        ("microservices:\n  a:\n    tag: [1, 2]\n", vec![(3, 10, E, "microservices.a.tag: expected a string, found a list")]),
        (
            "microservices:\n  a:\n    nextService:\n      - default:\n          - name: b\n",
            vec![(4, 7, E, "microservices.a.nextService: expected a mapping of connection key to a list of targets")],
        ),
        ("microservices:\n  My_Service:\n    startup: yes\n", vec![(2, 3, E, "`My_Service` is not a valid service name")]),
        ("microservices:\n  a:\n    volumeMountPathList:\n      - /only-one-part\n", vec![(4, 9, E, "`/only-one-part` must have two or three")]),
        ("microservices:\n  a:\n    volumeMountPathList:\n      - rel:/host\n", vec![(4, 9, E, "must use absolute paths")]),
        (
            "microservices:\n  a:\n    resources:\n      limits:\n        memory: 5 Mi\n        cpu: 500m\n",
            vec![(5, 17, E, "microservices.a.resources.limits.memory: `5 Mi` is not a resource quantity")],
        ),
        (
            "microservices:\n  a:\n    ports:\n      - name: web\n        port: 80\n      - name: web\n        port: 81\n",
            vec![(6, 15, E, "duplicate port name `web`")],
        ),
        ("microservices:\n  a:\n    startup: maybe\n", vec![(3, 14, E, "expected a boolean (yes/no, true/false, on/off), found `maybe`")]),
        ("microservices:\n  a:\n    startup: \"yes\"\n", vec![(3, 14, E, "expected a boolean")]),
        ("microservices:\n  a:\n", vec![(2, 3, E, "yaml format is wrong")]),
        ("microservices:\n  a:\n    scale: 1\n    scale: 2\n", vec![(4, 5, E, "key `scale` is defined more than once")]),
        ("microservices:\n  a: [\n", vec![(3, 1, E, "YAML syntax error")]),
        (
            "microservices:\n  a:\n    scale: 0\n    nextService:\n      default:\n        - name: ghost\n          device: far\n",
            vec![
                (3, 12, W, "microservices.a.scale: 0 is less than 1; using 1"),
                (6, 17, W, "`ghost` is not defined in microservices"),
                (7, 19, W, "`far` is not listed in devices"),
            ],
        ),
        (
            "deviceName: x\nbogus: 1\nmicroservices:\n  a:\n    command: [\"x\"]\n    nextService:\n      default:\n        - name: a\n          colour: red\n",
            vec![(2, 1, W, "document: unknown key `bogus`"), (8, 17, W, "routing cycle a > a"), (9, 11, W, "unknown key `colour`")],
        ),
        // D19: what `run` would refuse or misread, `validate` reports.
        ("microservices:\n  a:\n    command: []\n", vec![(3, 14, W, "microservices.a.command: the command is empty")]),
        ("microservices:\n  a:\n    command: [\"\"]\n", vec![(3, 15, E, "microservices.a.command[0]: the program name is empty")]),
        (
            "microservices:\n  a:\n    command: [x]\n    env:\n      K: \"a\\0b\"\n",
            vec![(5, 10, E, "microservices.a.env.K: contains a NUL byte")],
        ),
        ("microservices:\n  a:\n    command: [x]\n    env:\n      A=B: 1\n", vec![(5, 7, E, "env key `A=B` contains `=`")]),
        ("microservices:\n  a:\n    command: [x]\n    env:\n      \"\": 1\n", vec![(5, 7, E, "an empty env key")]),
        (
            "microservices:\n  a:\n    command: [x]\n---\nmicroservices:\n  b: {}\n",
            vec![(4, 1, W, "a second YAML document starts here; it is ignored")],
        ),
        ("", vec![(1, 1, W, "no microservices")]),
        ("# only a comment\n", vec![(1, 1, W, "no microservices")]),
        ("deviceName: x\nmicroservices: {}\n", vec![(2, 16, W, "no microservices")]),
        // D8: routing cycles are named (a kanban on them ends at the hop limit).
        (
            "microservices:\n  a:\n    command: [x]\n    nextService:\n      default:\n        - name: b\n  b:\n    command: [x]\n    nextService:\n      default:\n        - name: a\n",
            vec![(6, 17, W, "routing cycle a > b > a")],
        ),
        (
            "microservices:\n  s:\n    command: [x]\n    nextService:\n      default:\n        - name: s\n        - name: s\n",
            vec![(6, 17, W, "routing cycle s > s")],
        ),
        // Several problems at once, all reported.
        (
            "microservices:\n  a:\n    scale: lots\n    always: perhaps\n    ports:\n      - name: p\n        port: 70000\n",
            vec![
                (3, 12, E, "microservices.a.scale: expected an integer, found `lots`"),
                (4, 13, E, "microservices.a.always: expected a boolean"),
                (7, 15, E, "70000 is out of range (1..=65535)"),
            ],
        ),
    ]
}

#[test]
fn broken_files_give_every_problem_with_its_position() {
    for (text, expected) in broken_cases() {
        let l = load_str("bad.yml", text);
        let got: Vec<String> = l.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(l.diagnostics.len(), expected.len(), "for:\n{text}\ngot {got:#?}");
        for (d, (line, col, sev, msg)) in l.diagnostics.iter().zip(&expected) {
            assert_eq!((d.line, d.column, d.severity), (*line, *col, *sev), "for:\n{text}\ngot {got:#?}");
            assert!(d.message.contains(msg), "{d} does not contain {msg:?}");
            assert_eq!(d.file, "bad.yml");
        }
        let has_error = expected.iter().any(|e| e.2 == Severity::Error);
        assert_eq!(l.config.is_none(), has_error, "config refused exactly when there is an error");
    }
}

/// D10: a UTF-8 byte order mark (Windows editors) is skipped, as yaml.v2 did: the file is read, not ignored.
#[test]
fn a_byte_order_mark_is_skipped() {
    let l = load_str("bom.yml", "\u{feff}microservices:\n  x:\n    command: [\"true\"]\n");
    assert!(l.diagnostics.is_empty(), "{:?}", l.diagnostics);
    assert!(l.config.expect("config").microservices.contains_key("x"));
}

/// D4: aliases are expanded within a budget; a "billion laughs" file is an error at the alias that exceeds it,
/// found without building the expansion.
#[test]
fn an_alias_bomb_is_refused_at_the_alias() {
    let mut text = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (i, (name, prev)) in [("b", "a"), ("c", "b"), ("d", "c"), ("e", "d"), ("f", "e"), ("g", "f")].iter().enumerate()
    {
        let refs = vec![format!("*{prev}"); 9].join(",");
        text += &format!("{name}: &{name} [{refs}]\n");
        let _ = i;
    }
    text += "microservices:\n  x:\n    command: [\"true\"]\n";
    let l = load_str("laughs.yml", &text);
    assert!(l.config.is_none(), "refused");
    let d = &l.diagnostics[0];
    assert!(d.message.contains("alias") && d.message.contains("expand"), "{d}");
    assert!((2..=7).contains(&d.line) && d.column > 1, "at an alias: {d}");
    // Aliases used as intended still work.
    let ok = load_str(
        "ok.yml",
        "common: &env {A: \"1\", B: \"2\"}\nmicroservices:\n  x:\n    command: [x]\n    env: *env\n  y:\n    command: [y]\n    env: *env\n",
    );
    let cfg = ok.config.expect("config");
    assert_eq!(cfg.microservices["y"].env["B"], "2");
}

/// Review finding on D4: anchors without any alias are copied too (to be aliased later): nested anchors over a
/// large node count against the same budget, so a file cannot cost its size times its depth.
#[test]
fn nested_anchors_count_against_the_budget() {
    let leaf = vec!["x"; 20_000].join(",");
    let mut text = format!("[{leaf}]");
    for i in 0..100 {
        text = format!("&a{i} [{text}]");
    }
    let l = load_str("anchors.yml", &format!("a: {text}\nmicroservices:\n  x:\n    command: [\"true\"]\n"));
    assert!(l.config.is_none(), "refused");
    let d = &l.diagnostics[0];
    assert!(d.message.contains("expand"), "{d}");
}

/// D16: deep block nesting is an error with its position, not a stack overflow.
#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [300usize, 50_000] {
        let text = format!("microservices:\n  x:\n    command: [\"true\"]\n    foo:\n      {}a\n", "- ".repeat(depth));
        let l = load_str("deep.yml", &text);
        assert!(l.config.is_none());
        let d = &l.diagnostics[0];
        assert!(d.message.contains("nested more than"), "{d}");
        assert_eq!(d.line, 5, "{d}");
    }
    // Through the CLI too (the stack of the main thread).
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("deep.yml");
    std::fs::write(&f, format!("microservices:\n  x:\n    foo:\n      {}a\n", "- ".repeat(50_000))).expect("write");
    let (code, out) = aion(&["validate", f.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nested more than"), "{out}");
}

/// A file over the size limit is refused before it is read (what a hostile file can cost is bounded).
#[test]
fn an_oversized_file_is_refused_unread() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("big.yml");
    let file = std::fs::File::create(&f).expect("create");
    file.set_len(aion::runtime::config::MAX_FILE_BYTES + 1).expect("grow");
    let (code, out) = aion(&["validate", f.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a services.yml may have at most"), "{out}");
}

/// D19: a command that is not found is reported before it crash-loops.
#[test]
fn validate_warns_about_a_command_not_found() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("s.yml");
    std::fs::write(&f, "microservices:\n  a:\n    command: [\"no-such-program-aion\"]\n  b:\n    command: [\"sh\", \"-c\", \"true\"]\n").expect("write");
    let (code, out) = aion(&["validate", f.to_str().expect("path")]);
    assert_eq!(code, 0, "a warning: {out}");
    assert!(out.contains(":3:14: warning: microservices.a.command: `no-such-program-aion` is not found"), "{out}");
    assert!(!out.contains("microservices.b.command"), "{out}");
}

fn aion(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::AION).args(args).output().expect("run aion");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn cli_validate_exit_codes_and_format() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "microservices:\n  a:\n    ports:\n      - name: p\n        port: xxxx\n    scale: y\n")
        .expect("write");
    let (code, out) = aion(&["validate", bad.to_str().expect("path")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("{}:5:15: error: microservices.a.ports[0].port", bad.display())), "{out}");
    assert!(out.contains(&format!("{}:6:12: error: microservices.a.scale", bad.display())), "{out}");
    assert!(out.contains("2 errors"), "{out}");

    let warn = dir.path().join("warn.yml");
    std::fs::write(&warn, "microservices:\n  a:\n    nextService:\n      default:\n        - name: nobody\n")
        .expect("write");
    let (code, out) = aion(&["validate", warn.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}");
    let (code, _) = aion(&["validate", "--strict", warn.to_str().expect("path")]);
    assert_eq!(code, 1, "--strict turns warnings into errors");
    let (code, out) = aion(&["validate", "--json", bad.to_str().expect("path")]);
    assert_eq!(code, 1);
    let json_part = &out[..out.rfind(']').expect("json array") + 1];
    let v: serde_json::Value = serde_json::from_str(json_part).expect("json");
    assert_eq!(v[0]["line"], 5);
    assert_eq!(v[0]["severity"], "error");

    let fixtures: Vec<String> = fixtures().iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["validate"];
    args.extend(fixtures.iter().map(String::as_str));
    let (code, out) = aion(&args);
    assert_eq!(code, 0, "{out}");

    let (code, out) = aion(&["validate", "/nonexistent/services.yml"]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot read file"), "{out}");
}

#[test]
fn run_refuses_an_invalid_file_with_the_same_messages() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "microservices:\n  a:\n    scale: many\n").expect("write");
    let data = dir.path().join("data");
    let (code, out) = aion(&["--data-dir", data.to_str().expect("p"), "run", bad.to_str().expect("p")]);
    assert_eq!(code, 1);
    assert!(out.contains(":3:12: error: microservices.a.scale: expected an integer"), "{out}");
    assert!(out.contains("nothing started"), "{out}");
    // A service without a command cannot run as a local process: refused with the reason.
    let img = dir.path().join("img.yml");
    std::fs::write(&img, "microservices:\n  a:\n    startup: yes\n").expect("write");
    let (code, out) = aion(&["--data-dir", data.to_str().expect("p"), "run", img.to_str().expect("p")]);
    assert_eq!(code, 1);
    assert!(out.contains("has no `command`"), "{out}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn loader_never_panics_on_arbitrary_text(s in "\\PC{0,400}") {
        let _ = load_str("fuzz.yml", &s);
    }

    #[test]
    fn loader_never_panics_on_mutated_fixtures(idx in any::<prop::sample::Index>(), pick in 0usize..4, ins in "[\\[\\]{}:,\\-#&*!|>'\" \\n\\ta-z0-9]{0,8}") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aion");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.path()).collect();
        files.sort();
        let text = std::fs::read_to_string(&files[pick % files.len()]).expect("read");
        let mut at = idx.index(text.len() + 1);
        while !text.is_char_boundary(at) { at -= 1; }
        let mutated = format!("{}{}{}", &text[..at], ins, &text[at..]);
        let l = load_str("m.yml", &mutated);
        // Any error has a position inside the file.
        // Lines as YAML counts them (a lone `\r` ends a line too).
        let b = mutated.as_bytes();
        let lines = 1 + b.iter().enumerate().filter(|(i, c)| **c == b'\n' || (**c == b'\r' && b.get(i + 1) != Some(&b'\n'))).count();
        for d in &l.diagnostics {
            prop_assert!(d.line <= lines + 1, "{}", d);
        }
    }
}
