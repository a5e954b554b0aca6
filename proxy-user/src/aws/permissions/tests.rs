//! The SDK calls in the source, [`AWS_CALLS`], and the deploy policies, side by side.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::{AWS_CALLS, Caller, actions};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_file(name: &str) -> String {
    let path = crate_dir().join("../deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Verbs AWS SDK operations start with; a `.verb_noun()` call (no arguments: the fluent
/// builder) in a file that uses an SDK client is taken as an AWS call.
const VERBS: [&str; 14] = [
    "describe",
    "list",
    "get",
    "put",
    "delete",
    "discover",
    "create",
    "update",
    "register",
    "deregister",
    "run",
    "start",
    "stop",
    "tag",
];

/// (caller, method, "file:line") of every SDK call outside test code.
fn sdk_calls_in_source() -> Vec<(Caller, String, String)> {
    let src = crate_dir().join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if !text.contains("aws_sdk_") {
            continue; // no SDK client here
        }
        let rel = file.strip_prefix(&src).unwrap();
        let caller = if rel.starts_with("issuer") {
            Caller::Issuer
        } else {
            Caller::Node
        };
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break; // inline tests sit at the end of a module
            }
            for piece in line.split('.').skip(1) {
                // `.name()`: a method call without arguments.
                let name_len = piece
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(piece.len());
                let (name, after) = piece.split_at(name_len);
                let sdk_like = after.starts_with("()")
                    && VERBS
                        .iter()
                        .any(|v| name.strip_prefix(v).is_some_and(|r| r.starts_with('_')));
                if sdk_like {
                    found.push((
                        caller,
                        name.to_owned(),
                        format!("src/{}:{}", rel.display(), n + 1),
                    ));
                }
            }
        }
    }
    found
}

/// Source files, without test modules (`tests.rs`, `tests/`).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "tests" {
                walk(&path, out);
            }
        } else if name.ends_with(".rs") && name != "tests.rs" {
            out.push(path);
        }
    }
}

#[test]
fn aws_calls_list_matches_the_sdk_calls_in_the_source() {
    let found = sdk_calls_in_source();
    let mut errors = Vec::new();
    for (caller, method, at) in &found {
        if !AWS_CALLS
            .iter()
            .any(|c| c.caller == *caller && c.method == method)
        {
            errors.push(format!(
                "{at}: the {} calls .{method}() but AWS_CALLS (src/aws/permissions.rs) does not list it: add it with its IAM action and grant that",
                caller.as_str()
            ));
        }
    }
    for c in AWS_CALLS {
        if !found
            .iter()
            .any(|(k, m, _)| *k == c.caller && m == c.method)
        {
            errors.push(format!(
                "AWS_CALLS lists .{}() ({}) for the {}, but no source file makes that call: remove it and its grant",
                c.method,
                c.action,
                c.caller.as_str()
            ));
        }
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

/// The actions granted by the template resource `resource` (an IAM policy), read line by
/// line: `Action: x:Y`, `Action: [x:Y, ...]` or an `Action:` list of `- x:Y` items.
fn template_actions(template: &str, resource: &str) -> BTreeSet<String> {
    let header = format!("  {resource}:");
    let mut lines = template
        .lines()
        .skip_while(|l| l.trim_end() != header)
        .skip(1)
        .take_while(|l| {
            l.trim().is_empty() || l.starts_with("   ") || l.trim_start().starts_with('#')
        })
        .peekable();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let clean = |s: &str| s.trim().trim_matches('"').trim_matches('\'').to_owned();
    let mut out = BTreeSet::new();
    while let Some(line) = lines.next() {
        // `Action:` may open a list item (`- Action: ...`); its key column counts.
        let t = line.trim_start();
        let (t, key_at) = match t.strip_prefix("- ") {
            Some(t) => (t, indent(line) + 2),
            None => (t, indent(line)),
        };
        let Some(rest) = t.strip_prefix("Action:") else {
            continue;
        };
        let rest = rest.trim();
        if let Some(list) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            out.extend(list.split(',').map(clean));
        } else if !rest.is_empty() {
            out.insert(clean(rest));
        } else {
            while let Some(item) =
                lines.next_if(|l| indent(l) > key_at && l.trim_start().starts_with("- "))
            {
                out.insert(clean(&item.trim_start()[2..]));
            }
        }
    }
    out
}

fn json_actions(doc: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in doc["Statement"].as_array().into_iter().flatten() {
        match &s["Action"] {
            serde_json::Value::String(a) => {
                out.insert(a.clone());
            }
            serde_json::Value::Array(list) => {
                out.extend(list.iter().filter_map(|a| a.as_str().map(String::from)));
            }
            _ => {}
        }
    }
    out
}

/// Differences between what `caller` needs and what `granted` (named `policy`) allows.
fn compare(caller: Caller, policy: &str, granted: &BTreeSet<String>, errors: &mut Vec<String>) {
    if granted.is_empty() {
        errors.push(format!(
            "{policy}: no actions found (the {} policy)",
            caller.as_str()
        ));
        return;
    }
    for c in AWS_CALLS.iter().filter(|c| c.caller == caller) {
        if !granted.contains(c.action) {
            errors.push(format!(
                "{policy}: the {} calls .{}() ({}) but {} is not granted",
                caller.as_str(),
                c.method,
                c.why,
                c.action
            ));
        }
    }
    let needed = actions(caller);
    for a in granted {
        if !needed.contains(&a.as_str()) {
            errors.push(format!(
                "{policy}: grants {a} to the {}, which no call in AWS_CALLS needs",
                caller.as_str()
            ));
        }
    }
}

#[test]
fn deploy_policies_grant_exactly_what_the_calls_need() {
    let template = deploy_file("cloudformation.yaml");
    let standalone: serde_json::Value =
        serde_json::from_str(&deploy_file("iam-policy.json")).unwrap();
    let mut errors = Vec::new();
    compare(
        Caller::Node,
        "cloudformation.yaml EcsmeshPolicy",
        &template_actions(&template, "EcsmeshPolicy"),
        &mut errors,
    );
    compare(
        Caller::Node,
        "iam-policy.json",
        &json_actions(&standalone),
        &mut errors,
    );
    compare(
        Caller::Issuer,
        "cloudformation.yaml IssuerPolicy",
        &template_actions(&template, "IssuerPolicy"),
        &mut errors,
    );
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

#[test]
fn template_action_reader() {
    let t = "Resources:\n  P:\n    Properties:\n      Statement:\n        - Action: a:B\n        - Action: [c:D, \"e:F\"]\n        - Action:\n            - g:H\n            - i:J\n          Resource: \"*\"\n  Q:\n    Action: x:Y\n";
    let got: Vec<_> = template_actions(t, "P").into_iter().collect();
    assert_eq!(got, ["a:B", "c:D", "e:F", "g:H", "i:J"]);
    assert!(template_actions(t, "Missing").is_empty());
}
