//! `ecst stages [NAME]`: the stage types a pipeline may name, with their roles and keys, from
//! the registry (each stage file declares its keys next to its config struct).

use std::process::ExitCode;

use ecst_operators::registry::{STAGE_CATALOGUE, StageTypeDoc};

/// Keys every stage takes, whatever its type.
const COMMON_KEYS: &str =
    "type (the stage type), input or inputs (upstream stages; not for root stages)";

/// Lists every stage type, or describes the one named.
pub(crate) fn stages(name: Option<&str>) -> ExitCode {
    let Some(name) = name else {
        for doc in STAGE_CATALOGUE {
            println!(
                "{:<16} {:<10} {}",
                doc.name,
                doc.role.as_str(),
                doc.summary.trim()
            );
        }
        println!("\n`ecst stages NAME` lists a type's keys.");
        return ExitCode::SUCCESS;
    };
    match STAGE_CATALOGUE.iter().find(|doc| doc.name == name) {
        Some(doc) => {
            print!("{}", describe(doc));
            ExitCode::SUCCESS
        }
        None => {
            let known: Vec<&str> = STAGE_CATALOGUE.iter().map(|doc| doc.name).collect();
            eprintln!(
                "error: no stage type `{name}`; the types are: {}",
                known.join(", ")
            );
            ExitCode::from(1)
        }
    }
}

/// One type's role, summary and keys, a key per line with its meaning on the next.
fn describe(doc: &StageTypeDoc) -> String {
    let mut text = format!(
        "{} ({}): {}\n\nKeys besides {COMMON_KEYS}:\n",
        doc.name,
        doc.role.as_str(),
        doc.summary.trim()
    );
    if doc.keys.is_empty() {
        text.push_str("  (none)\n");
    }
    for key in doc.keys {
        let default = match key.default {
            Some(default) => format!("default {default}"),
            None => "required".into(),
        };
        text.push_str(&format!(
            "  {:<22} {}; {default}\n  {:<22} {}\n",
            key.name, key.value, "", key.meaning
        ));
    }
    text
}
