//! The command line documents itself: completions and man pages generated from it, an
//! example in every command's help, `ecst stages` from the registry, and `ecst init`
//! writing a pipeline that validates.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// `ecst ARGS`: exit status, stdout, stderr.
fn ecst_out(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = ecst();
    cmd.args(args);
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr_of(&out),
    )
}

/// The subcommands `ecst --help` lists (all but `help`).
fn subcommands() -> Vec<String> {
    let (_, help, _) = ecst_out(&["--help"]);
    let listed: Vec<String> = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|name| name != "help")
        .collect();
    assert!(listed.len() >= 15, "{help}");
    listed
}

#[test]
fn completion_scripts_know_every_subcommand() {
    let names = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, stderr) = ecst_out(&["completions", shell]);
        assert_eq!(code, Some(0), "{stderr}");
        for name in &names {
            assert!(script.contains(name.as_str()), "{shell} lacks {name}");
        }
    }
    let (code, _, stderr) = ecst_out(&["completions", "tcsh"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("possible values: bash"), "{stderr}");
}

#[test]
fn the_man_page_renders_and_every_subcommand_gets_a_page() {
    let (code, page, stderr) = ecst_out(&["man"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(page.contains(".TH ecst 1"), "{page}");
    let names = subcommands();
    for name in &names {
        assert!(page.contains(name.as_str()), "the page lists {name}");
    }
    // groff renders it as `man` would, without a warning.
    let mut groff = std::process::Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("groff is installed (scripts/services.sh installs groff-base)");
    groff
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write");
    let rendered = groff.wait_with_output().expect("groff");
    assert!(rendered.status.success());
    assert_eq!(String::from_utf8_lossy(&rendered.stderr), "");

    let dir = std::env::temp_dir().join(unique("man").replace(':', "_"));
    let (code, _, stderr) = ecst_out(&["man", "--out", dir.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{stderr}");
    for name in &names {
        let file = dir.join(format!("ecst-{name}.1"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(text.contains(&format!(".TH ecst-{name} 1")), "{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_command_has_an_example_in_its_help() {
    for name in subcommands() {
        let (code, help, stderr) = ecst_out(&[&name, "--help"]);
        assert_eq!(code, Some(0), "{stderr}");
        let examples = help
            .split("Examples:\n")
            .nth(1)
            .unwrap_or_else(|| panic!("`ecst {name} --help` has no Examples:\n{help}"));
        assert!(
            examples.contains(&format!("  ecst {name}")),
            "`ecst {name} --help` shows ecst {name} in use:\n{help}"
        );
    }
}

#[test]
fn stages_lists_every_type_with_its_role_and_describes_one_with_its_keys() {
    let (code, list, stderr) = ecst_out(&["stages"]);
    assert_eq!(code, Some(0), "{stderr}");
    for (name, role) in [
        ("decode", "root"),
        ("version_filter", "transform"),
        ("tombstone", "transform"),
        ("project", "transform"),
        ("redis_hash", "sink"),
        ("postgres", "sink"),
    ] {
        assert!(
            list.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.len() > 2 && words[0] == name && words[1] == role
            }),
            "{name} ({role}) in\n{list}"
        );
    }
    let (code, one, _) = ecst_out(&["stages", "redis_hash"]);
    assert_eq!(code, Some(0));
    assert!(
        one.starts_with("redis_hash (sink): Writes Redis hashes"),
        "{one}"
    );
    assert!(
        one.contains("  key                    key template; required\n"),
        "{one}"
    );
    assert!(
        one.contains("  tombstone_prefix       string; default ecst:tombstone:\n"),
        "{one}"
    );
    let (code, _, stderr) = ecst_out(&["stages", "kafka"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("no stage type `kafka`; the types are: decode, version_filter"),
        "{stderr}"
    );
}

#[test]
fn init_from_a_sample_event_writes_a_pipeline_that_validates() {
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/athletes.ndjson"
    ))
    .expect("examples/athletes.ndjson");
    let first = sample.lines().next().expect("a sample event");
    let mut cmd = ecst();
    cmd.args([
        "init",
        "--from-event",
        "-",
        "--stream",
        "athletes.athlete-updated.v1",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("ecst init");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(first.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("ecst init");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in [
        "  stream: athletes.athlete-updated.v1\n",
        "      display_name: payload.displayName\n",
        "      country_code: payload.countryCode\n",
        "    type: redis_hash\n",
        "    key: \"athlete:{aggregateId}\"\n",
    ] {
        assert!(yaml.contains(line), "missing {line:?} in\n{yaml}");
    }
    let file = pipeline_file("init", &yaml);
    let (code, stdout, stderr) = ecst_out(&["validate", file.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{stderr}\n{yaml}");
    assert!(stdout.ends_with(": ok (5 stages)\n"), "{stdout}");

    let bad = pipeline_file("init-bad", "{\"aggregateId\": \"a\"}");
    let (code, _, stderr) = ecst_out(&["init", "--from-event", bad.to_str().expect("utf-8")]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("the sample has no `payload` object"),
        "{stderr}"
    );
}
