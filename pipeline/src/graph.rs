//! The stage DAG: structural checks, topological order and Mermaid / DOT rendering.

use std::collections::{HashMap, HashSet};

/// What the graph checks need to know of a stage.
#[derive(Debug, Clone)]
pub struct GraphNode<'a> {
    /// Stage name.
    pub name: &'a str,
    /// Stage type (`decode`, `redis_hash`, ...).
    pub type_name: &'a str,
    /// Names of the stages it reads.
    pub inputs: &'a [String],
    /// Whether it is a sink.
    pub is_sink: bool,
    /// Whether it reads the source directly.
    pub is_root: bool,
    /// Whether its type is known; problems that depend on an unknown type are not reported.
    pub known: bool,
}

/// A structural problem in the DAG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphProblem {
    /// Stage the problem is reported on.
    pub stage: String,
    /// Key inside the stage (`input`), if the problem is in one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Checks inputs exist, roots and sinks sit where they must, nothing is unread and there are
/// no cycles. Returns every problem found.
pub fn check(nodes: &[GraphNode<'_>]) -> Vec<GraphProblem> {
    let mut problems = Vec::new();
    let by_name: HashMap<&str, &GraphNode<'_>> = nodes.iter().map(|n| (n.name, n)).collect();
    let mut readers: HashMap<&str, usize> = HashMap::new();
    let problem = |stage: &str, key: Option<&str>, message: String| GraphProblem {
        stage: stage.to_string(),
        key: key.map(str::to_string),
        message,
    };
    for node in nodes {
        if node.known && node.is_root && !node.inputs.is_empty() {
            problems.push(problem(
                node.name,
                Some("input"),
                format!(
                    "a {} stage reads the source and takes no input",
                    node.type_name
                ),
            ));
        }
        if node.known && !node.is_root && node.inputs.is_empty() {
            problems.push(problem(
                node.name,
                None,
                format!(
                    "stage `{}` ({}) needs `input` (or `inputs`) naming the stage it reads",
                    node.name, node.type_name
                ),
            ));
        }
        let mut seen = HashSet::new();
        for input in node.inputs {
            if !seen.insert(input.as_str()) {
                problems.push(problem(
                    node.name,
                    Some("inputs"),
                    format!("input `{input}` is listed twice"),
                ));
                continue;
            }
            match by_name.get(input.as_str()) {
                None => {
                    let mut known: Vec<&str> = nodes
                        .iter()
                        .map(|n| n.name)
                        .filter(|n| *n != node.name)
                        .collect();
                    known.sort_unstable();
                    problems.push(problem(
                        node.name,
                        Some("input"),
                        format!(
                            "input `{input}` is not a stage of this pipeline (stages: {})",
                            known.join(", ")
                        ),
                    ));
                }
                Some(source) if source.known && source.is_sink => problems.push(problem(
                    node.name,
                    Some("input"),
                    format!(
                        "input `{input}` is a sink ({}); sinks are leaves and feed nothing",
                        source.type_name
                    ),
                )),
                Some(_) => *readers.entry(input.as_str()).or_default() += 1,
            }
        }
    }
    for node in nodes {
        if node.known && !node.is_sink && !readers.contains_key(node.name) {
            problems.push(problem(
                node.name,
                None,
                format!("stage `{}` is read by no stage, so its branch reaches no sink (add a sink reading it, or remove it)", node.name),
            ));
        }
    }
    if nodes.iter().all(|n| n.known)
        && !nodes.iter().any(|n| n.is_sink)
        && let Some(first) = nodes.first()
    {
        problems.push(problem(
            first.name,
            None,
            "the pipeline has no sink, so it would replicate nothing".into(),
        ));
    }
    if nodes.iter().all(|n| n.known)
        && !nodes.iter().any(|n| n.is_root)
        && let Some(first) = nodes.first()
    {
        problems.push(problem(
            first.name,
            None,
            "the pipeline has no decode stage reading the source".into(),
        ));
    }
    // fetch and claim_check replace an event's payload and version (or mark it deleted): a
    // tombstone mode or a projection applied upstream would be silently undone.
    for node in nodes {
        if !matches!(node.type_name, "fetch" | "claim_check") {
            continue;
        }
        let mut stack: Vec<&str> = node.inputs.iter().map(String::as_str).collect();
        let mut seen: HashSet<&str> = HashSet::new();
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some(upstream) = by_name.get(name) else {
                continue;
            };
            if matches!(upstream.type_name, "tombstone" | "project") {
                problems.push(problem(
                    node.name,
                    Some("input"),
                    format!(
                        "a {} stage must come before `{}` ({}), which it would undo; move `{}` upstream of it",
                        node.type_name, upstream.name, upstream.type_name, node.name
                    ),
                ));
                break;
            }
            stack.extend(upstream.inputs.iter().map(String::as_str));
        }
    }
    for cycle in cycles(nodes) {
        problems.push(problem(
            &cycle[0],
            Some("input"),
            format!("cycle: {}", cycle.join(" -> ")),
        ));
    }
    problems.extend(delta_problems(nodes));
    problems
}

/// Stages on the way of a `delta` stage's patches (before or after it) that cannot take them:
/// a `version_filter` coalesces a batch to its newest version, so that patch finds a gap where
/// the others were. (Both sinks apply patches behind their base-version guard.)
fn delta_problems(nodes: &[GraphNode<'_>]) -> Vec<GraphProblem> {
    let by_name: HashMap<&str, &GraphNode<'_>> = nodes.iter().map(|n| (n.name, n)).collect();
    let mut readers: HashMap<&str, Vec<&str>> = HashMap::new();
    for node in nodes {
        for input in node.inputs {
            readers.entry(input.as_str()).or_default().push(node.name);
        }
    }
    let mut problems = Vec::new();
    let mut reported = HashSet::new();
    for delta in nodes.iter().filter(|n| n.type_name == "delta") {
        let mut seen = HashSet::from([delta.name]);
        let mut up: Vec<&str> = delta.inputs.iter().map(String::as_str).collect();
        let mut down: Vec<&str> = readers.get(delta.name).cloned().unwrap_or_default();
        let mut lineage = Vec::new();
        let mut upstream = HashSet::new();
        while let Some(name) = up.pop() {
            if let Some(node) = by_name.get(name).filter(|_| seen.insert(name)) {
                lineage.push(*node);
                upstream.insert(node.name);
                up.extend(node.inputs.iter().map(String::as_str));
            }
        }
        while let Some(name) = down.pop() {
            if let Some(node) = by_name.get(name).filter(|_| seen.insert(name)) {
                lineage.push(*node);
                down.extend(readers.get(name).into_iter().flatten().copied());
            }
        }
        for node in lineage {
            let message = match node.type_name {
                "version_filter" => format!(
                    "a version_filter on the way of delta stage `{}` coalesces a batch's patches to the newest, which then finds a gap where the others were: remove it (the sink's guard keeps patches in order)",
                    delta.name
                ),
                "project" if upstream.contains(node.name) => format!(
                    "a project before delta stage `{0}` sees full states, not patches: it would fill defaults for the fields a patch leaves untouched and drop its removals (nulls); move it after `{0}`",
                    delta.name
                ),
                _ => continue,
            };
            if reported.insert(node.name) {
                problems.push(GraphProblem {
                    stage: node.name.to_string(),
                    key: None,
                    message,
                });
            }
        }
    }
    problems
}

/// Cycles, each as the list of stage names around it (first repeated at the end).
fn cycles(nodes: &[GraphNode<'_>]) -> Vec<Vec<String>> {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    // 0 = unvisited, 1 = on the stack, 2 = done
    let mut state = vec![0u8; nodes.len()];
    let mut found = Vec::new();
    for start in 0..nodes.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        state[start] = 1;
        while let Some((node, next_input)) = stack.last().copied() {
            let inputs = nodes[node].inputs;
            if next_input < inputs.len() {
                if let Some(top) = stack.last_mut() {
                    top.1 += 1;
                }
                let Some(&child) = index.get(inputs[next_input].as_str()) else {
                    continue;
                };
                match state[child] {
                    0 => {
                        state[child] = 1;
                        stack.push((child, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|(n, _)| *n == child).unwrap_or(0);
                        let mut cycle: Vec<String> = stack[from..]
                            .iter()
                            .map(|(n, _)| nodes[*n].name.to_string())
                            .collect();
                        // Edges point from a stage to its input; show data flow instead.
                        cycle.reverse();
                        cycle.push(cycle[0].clone());
                        found.push(cycle);
                    }
                    _ => {}
                }
            } else {
                state[node] = 2;
                stack.pop();
            }
        }
    }
    found
}

/// Stage indexes ordered so that every stage comes after its inputs; `None` on a cycle.
pub fn topo_order(nodes: &[GraphNode<'_>]) -> Option<Vec<usize>> {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    let mut remaining: Vec<usize> = nodes.iter().map(|n| n.inputs.len()).collect();
    let mut order: Vec<usize> = (0..nodes.len()).filter(|i| remaining[*i] == 0).collect();
    let mut head = 0;
    while head < order.len() {
        let done = order[head];
        head += 1;
        for (i, node) in nodes.iter().enumerate() {
            let feeds = node
                .inputs
                .iter()
                .filter(|input| index.get(input.as_str()) == Some(&done))
                .count();
            if feeds > 0 {
                remaining[i] -= feeds;
                if remaining[i] == 0 {
                    order.push(i);
                }
            }
        }
    }
    (order.len() == nodes.len()).then_some(order)
}

/// Renders the DAG as a Mermaid flowchart, the source first.
pub fn mermaid(stream: &str, nodes: &[GraphNode<'_>]) -> String {
    let mut out = String::from("flowchart LR\n");
    out.push_str(&format!("    source[(\"{}\")]\n", escape(stream)));
    for node in nodes {
        let label = format!("{}<br/><i>{}</i>", escape(node.name), node.type_name);
        let id = mermaid_id(node.name);
        if node.is_sink {
            out.push_str(&format!("    {id}[[\"{label}\"]]\n"));
        } else {
            out.push_str(&format!("    {id}[\"{label}\"]\n"));
        }
    }
    for node in nodes {
        if node.is_root {
            out.push_str(&format!("    source --> {}\n", mermaid_id(node.name)));
        }
        for input in node.inputs {
            out.push_str(&format!(
                "    {} --> {}\n",
                mermaid_id(input),
                mermaid_id(node.name)
            ));
        }
    }
    out
}

/// Renders the DAG in Graphviz DOT.
pub fn dot(stream: &str, nodes: &[GraphNode<'_>]) -> String {
    let mut out = String::from("digraph pipeline {\n    rankdir=LR;\n");
    out.push_str(&format!(
        "    \"source\" [shape=cylinder, label=\"{}\"];\n",
        escape(stream)
    ));
    for node in nodes {
        let shape = if node.is_sink { "box3d" } else { "box" };
        out.push_str(&format!(
            "    \"{}\" [shape={shape}, label=\"{}\\n({})\"];\n",
            escape(node.name),
            escape(node.name),
            node.type_name
        ));
    }
    for node in nodes {
        if node.is_root {
            out.push_str(&format!("    \"source\" -> \"{}\";\n", escape(node.name)));
        }
        for input in node.inputs {
            out.push_str(&format!(
                "    \"{}\" -> \"{}\";\n",
                escape(input),
                escape(node.name)
            ));
        }
    }
    out.push_str("}\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

fn mermaid_id(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("s_{cleaned}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(name: &'a str, type_name: &'a str, inputs: &'a [String]) -> GraphNode<'a> {
        GraphNode {
            name,
            type_name,
            inputs,
            is_sink: type_name == "redis_hash",
            is_root: type_name == "decode",
            known: true,
        }
    }

    #[test]
    fn a_linear_pipeline_is_clean_and_ordered() {
        let none: Vec<String> = vec![];
        let d = vec!["decode".to_string()];
        let f = vec!["latest".to_string()];
        let nodes = vec![
            node("cache", "redis_hash", &f),
            node("latest", "version_filter", &d),
            node("decode", "decode", &none),
        ];
        assert!(check(&nodes).is_empty());
        assert_eq!(topo_order(&nodes), Some(vec![2, 1, 0]));
        let m = mermaid("s", &nodes);
        assert!(
            m.contains("s_decode --> s_latest") && m.contains("source --> s_decode"),
            "{m}"
        );
        assert!(dot("s", &nodes).contains("\"latest\" -> \"cache\";"));
    }

    #[test]
    fn reports_missing_unread_cyclic_and_sinkless() {
        let none: Vec<String> = vec![];
        let a_in = vec!["b".to_string()];
        let b_in = vec!["a".to_string()];
        let x_in = vec!["nope".to_string()];
        let nodes = vec![
            node("decode", "decode", &none),
            node("a", "project", &a_in),
            node("b", "project", &b_in),
            node("x", "project", &x_in),
        ];
        let problems = check(&nodes);
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.stage, p.message))
            .collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("x: input `nope` is not a stage")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("decode: stage `decode` is read by no stage")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("has no sink")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("cycle: ")), "{text:?}");
        assert_eq!(topo_order(&nodes), None);
    }

    #[test]
    fn a_delta_pipeline_refuses_a_version_filter_but_takes_a_postgres_sink() {
        let none: Vec<String> = vec![];
        let d = vec!["decode".to_string()];
        let l = vec!["latest".to_string()];
        let p = vec!["patches".to_string()];
        let f = vec!["full".to_string()];
        let nodes = vec![
            node("decode", "decode", &none),
            node("latest", "version_filter", &d),
            node("patches", "delta", &l),
            node("cache", "redis_hash", &p),
            GraphNode {
                is_sink: true,
                ..node("table", "postgres", &p)
            },
            // Another branch, which patches never reach: left alone.
            node("full", "version_filter", &d),
            node("other", "redis_hash", &f),
        ];
        let text: Vec<String> = check(&nodes)
            .iter()
            .map(|p| format!("{}: {}", p.stage, p.message))
            .collect();
        // The postgres sink applies patches: only the version_filter is refused.
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].starts_with("latest: a version_filter on the way of delta stage `patches`"),
            "{text:?}"
        );
    }

    #[test]
    fn a_project_before_delta_is_refused() {
        let none: Vec<String> = vec![];
        let d = vec!["decode".to_string()];
        let p = vec!["shape".to_string()];
        let x = vec!["patches".to_string()];
        let nodes = vec![
            node("decode", "decode", &none),
            node("shape", "project", &d),
            node("patches", "delta", &p),
            node("cache", "redis_hash", &x),
        ];
        let text: Vec<String> = check(&nodes)
            .iter()
            .map(|p| format!("{}: {}", p.stage, p.message))
            .collect();
        assert_eq!(text.len(), 1, "{text:?}");
        assert!(
            text[0].starts_with("shape: a project before delta stage `patches`"),
            "{text:?}"
        );
        let fine = vec![
            node("decode", "decode", &none),
            node("patches", "delta", &d),
            node("shape", "project", &x),
            node("cache", "redis_hash", &p),
        ];
        assert!(check(&fine).is_empty(), "{:?}", check(&fine));
    }

    #[test]
    fn fetch_and_claim_check_come_before_tombstone_and_project() {
        let none: Vec<String> = vec![];
        let d = vec!["decode".to_string()];
        let p = vec!["shape".to_string()];
        let f = vec!["fetch".to_string()];
        let c = vec!["claims".to_string()];
        let nodes = vec![
            node("decode", "decode", &none),
            node("shape", "project", &d),
            node("fetch", "fetch", &p),
            node("claims", "claim_check", &f),
            node("cache", "redis_hash", &c),
        ];
        let text: Vec<String> = check(&nodes)
            .iter()
            .map(|p| format!("{} {:?}: {}", p.stage, p.key, p.message))
            .collect();
        assert_eq!(
            text,
            [
                "fetch Some(\"input\"): a fetch stage must come before `shape` (project), which it would undo; move `fetch` upstream of it",
                "claims Some(\"input\"): a claim_check stage must come before `shape` (project), which it would undo; move `claims` upstream of it",
            ]
        );
        let fine = vec![
            node("decode", "decode", &none),
            node("fetch", "fetch", &d),
            node("shape", "project", &f),
            node("cache", "redis_hash", &p),
        ];
        assert!(check(&fine).is_empty(), "{:?}", check(&fine));
    }
}
