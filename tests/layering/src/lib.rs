//! Module import cycles inside one crate, found from its sources.
//!
//! An edge A -> B means module A names an item of module B (`use crate::b::..`,
//! `crate::b::x` anywhere, `use super::..` resolved). Edges between a module and its own
//! ancestors or descendants are ignored: a child using its parent's items (and a parent
//! its children's) is ordinary Rust. What is forbidden is siblings, or cousins, that import
//! each other in a circle: that is how layers melt into one knot. `#[cfg(test)] mod .. { }`
//! bodies, files named `tests.rs` or `*_tests.rs`, comments and `src/bin/` are not looked
//! at: tests may reach anywhere. See `docs/architecture.md`, "Layers".
//!
//! Every crate of the workspace calls [`assert_no_module_cycles`] from a unit test, so a
//! cycle fails `cargo test` of the crate that grew it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;

/// A module's path from the crate root: `["storage", "sqlite"]`; the root is `[]`.
pub type ModPath = Vec<String>;

/// The import edges between the modules of the crate whose `src/` is `src`.
pub fn edges(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let files = rust_files(src);
    let modules: BTreeMap<ModPath, PathBuf> = files
        .into_iter()
        .map(|f| (module_path(src, &f), f))
        .collect();
    let use_stmt =
        Regex::new(r"(?s)\buse\s+(crate|super)::(.*?);").unwrap_or_else(|_| unreachable!());
    let crate_path = Regex::new(r"\bcrate::((?:[A-Za-z_0-9]+::)*[A-Za-z_0-9]+)")
        .unwrap_or_else(|_| unreachable!());
    let mut out: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let text = strip_tests(&strip_comments(&text));
        let mut paths: Vec<Vec<String>> = Vec::new();
        for cap in use_stmt.captures_iter(&text) {
            let mut tree = Vec::new();
            parse_tree(&cap[2], &mut Vec::new(), &mut tree);
            for p in tree {
                if &cap[1] == "crate" {
                    paths.push(p);
                } else {
                    let mut full: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
                    full.extend(p);
                    paths.push(full);
                }
            }
        }
        for cap in crate_path.captures_iter(&text) {
            paths.push(cap[1].split("::").map(str::to_string).collect());
        }
        for path in paths {
            let path: Vec<String> = path.into_iter().filter(|s| s != "self").collect();
            for len in (1..=path.len()).rev() {
                let target = &path[..len];
                if modules.contains_key(target) {
                    let related = target.starts_with(module) || module.starts_with(target);
                    if !related {
                        out.entry(module.clone())
                            .or_default()
                            .insert(target.to_vec());
                    }
                    break;
                }
            }
        }
    }
    out
}

/// The sets of modules (more than one each) that import each other in a circle.
pub fn module_cycles(src: &Path) -> Vec<Vec<String>> {
    let graph = edges(src);
    strongly_connected(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| scc.into_iter().map(|m| m.join("/")).collect())
        .collect()
}

/// Panics, naming them, when modules of the crate at `manifest_dir` import each other in a
/// circle. Call it from a unit test with `env!("CARGO_MANIFEST_DIR")`.
pub fn assert_no_module_cycles(manifest_dir: &str) {
    let cycles = module_cycles(&Path::new(manifest_dir).join("src"));
    assert!(
        cycles.is_empty(),
        "module import cycles in {manifest_dir} (a child may use its parent; siblings must not \
         import each other in a circle; see docs/architecture.md): {cycles:?}"
    );
}

/// Panics when a module of the crate at `manifest_dir` imports `module` (the composition
/// root, say), except `module` itself, its children and the crate root that declares it.
pub fn assert_nobody_imports(manifest_dir: &str, module: &str) {
    let graph = edges(&Path::new(manifest_dir).join("src"));
    let target = vec![module.to_string()];
    let importers: Vec<String> = graph
        .iter()
        .filter(|(from, to)| !from.is_empty() && to.contains(&target))
        .map(|(from, _)| from.join("/"))
        .collect();
    assert!(
        importers.is_empty(),
        "`{module}` is imported by {importers:?} in {manifest_dir}; nothing may import it"
    );
}

fn rust_files(src: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !(dir == src && name == "bin") {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" && !name.ends_with("_tests.rs") {
                out.push(path);
            }
        }
    }
    out
}

fn module_path(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Drops `//` comments (doc comments included), leaving strings as they are.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Drops the bodies of `#[cfg(test)] mod name { ... }`.
fn strip_tests(text: &str) -> String {
    let head = Regex::new(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{")
        .unwrap_or_else(|_| unreachable!());
    let mut text = text.to_string();
    while let Some(m) = head.find(&text) {
        let bytes = text.as_bytes();
        let mut depth = 0usize;
        let mut end = text.len();
        for (i, b) in bytes.iter().enumerate().skip(m.end() - 1) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        text.replace_range(m.start()..end, "");
    }
    text
}

/// Expands a `use` tree (`a::{b, c::d as e}`) into its paths.
fn parse_tree(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(inner) = tree.strip_prefix('{') {
        let inner = &inner[..inner.rfind('}').unwrap_or(inner.len())];
        let mut depth = 0usize;
        let mut start = 0;
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    parse_tree(&inner[start..i], prefix, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parse_tree(&inner[start..], prefix, out);
        return;
    }
    if tree.is_empty() {
        return;
    }
    match tree.split_once("::") {
        Some((head, rest)) if !head.contains('{') => {
            prefix.push(head.trim().to_string());
            parse_tree(rest, prefix, out);
            prefix.pop();
        }
        _ => {
            let name = tree.split_whitespace().next().unwrap_or(tree);
            let mut path = prefix.clone();
            path.push(name.to_string());
            out.push(path);
        }
    }
}

/// Tarjan's strongly connected components.
fn strongly_connected(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        graph: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        next: usize,
        out: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.graph.get(v) {
            for w in targets {
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(lw));
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(iw));
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.clone());
                if w == v {
                    break;
                }
            }
            scc.sort();
            s.out.push(scc);
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn crate_with(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, text) in files {
            let path = dir.0.join("src").join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let n = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                let p = std::env::temp_dir().join(format!("layering-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn siblings_in_a_circle_are_found_parents_and_tests_are_not() {
        let dir = crate_with(&[
            ("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
            ("a.rs", "use crate::b::X;\n// use crate::c::Y;\n"),
            ("b/mod.rs", "use super::a::Z; mod inner;\n"),
            ("b/inner.rs", "use super::W; use crate::b::V;"),
            (
                "c.rs",
                "use crate::{d::{self, Q}, a as other};\n#[cfg(test)]\nmod tests { use crate::d::T; }",
            ),
            ("d.rs", "fn f() { crate::c::g(); }"),
            ("e_tests.rs", "use crate::a::X;"),
        ]);
        let mut cycles = module_cycles(&dir.0.join("src"));
        cycles.sort();
        assert_eq!(cycles, vec![vec!["a", "b"], vec!["c", "d"]]);
    }

    #[test]
    fn a_child_using_its_parent_is_no_cycle() {
        let dir = crate_with(&[
            ("lib.rs", "pub mod a;"),
            ("a/mod.rs", "mod x; use self::x::Y; pub struct P;"),
            ("a/x.rs", "use super::P; use crate::a::P as Q;"),
        ]);
        assert!(module_cycles(&dir.0.join("src")).is_empty());
    }

    #[test]
    fn importers_of_a_module_are_named() {
        let dir = crate_with(&[
            ("lib.rs", "pub mod app; pub mod http;"),
            ("app.rs", "use crate::http::X;"),
            ("http.rs", "use crate::app::AppState;"),
        ]);
        let graph = edges(&dir.0.join("src"));
        assert!(graph[&vec!["http".to_string()]].contains(&vec!["app".to_string()]));
        let result = std::panic::catch_unwind(|| {
            assert_nobody_imports(dir.0.to_str().unwrap(), "app");
        });
        assert!(result.is_err());
    }

    #[test]
    fn this_crate_has_no_cycle() {
        assert_no_module_cycles(env!("CARGO_MANIFEST_DIR"));
    }
}
