//! The workspace's structure, read from its sources (issue 18, "Done when").
//!
//! (a) No function or method in `crates/hyco-relay/src` or `crates/hyco-io/src` is longer than
//!     [`MAX_FN_LINES`] lines. A function's length runs from its first line (attributes and doc
//!     comments aside) to its closing brace. Tests, `#[cfg(test)]` modules and `#[test]`
//!     functions are not counted; a function nested in another is counted on its own and as part
//!     of the outer one.
//! (b) No crate in `crates/` has an import cycle between its top-level modules. An edge `b → a`
//!     is a path `crate::a::…` (in a `use`, an expression, a type, or the tokens of a macro call)
//!     or `super::a::…` that leaves a submodule of `b` for `a`, written anywhere in module `b`'s
//!     files; submodules count as their top-level module. The crate root (`lib.rs`, `main.rs`)
//!     is not a module of its own here. `#[cfg(test)]` modules are left out, as in (a).
//!
//! The sources are found by following `mod` declarations from each crate root, so a file the
//! compiler does not read is not read here either. A failure lists every offender with
//! `file:line`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use syn::visit::Visit;

const MAX_FN_LINES: usize = 100;

#[test]
fn structure_holds() {
    let report = check();
    assert!(report.is_empty(), "{report}");
}

/// This workspace, or the checkout `HYCO_STRUCTURE_ROOT` names (to survey another branch).
fn workspace_root() -> PathBuf {
    std::env::var_os("HYCO_STRUCTURE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .canonicalize()
        .expect("workspace root")
}

fn check() -> String {
    let root = workspace_root();
    let mut report = String::new();

    let mut long = Vec::new();
    for krate in ["crates/hyco-relay", "crates/hyco-io"] {
        for file in crate_files(&root.join(krate)) {
            let rel = relative(&root, &file.path);
            let mut finder = LongFns {
                file: &rel,
                found: &mut long,
            };
            finder.visit_file(&file.ast);
        }
    }
    if !long.is_empty() {
        let _ = writeln!(
            report,
            "functions longer than {MAX_FN_LINES} lines (tests aside):"
        );
        for line in &long {
            let _ = writeln!(report, "  {line}");
        }
    }

    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("crates/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    crates.sort();
    for krate in crates {
        let name = relative(&root, &krate);
        for cycle in import_cycles(&root, &krate) {
            let _ = writeln!(report, "import cycle in {name}: {cycle}");
        }
    }
    report
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// One source file of a crate: which top-level module it belongs to (`None` for the root) and
/// the module path of the file itself (`["a", "b"]` for `a/b.rs`).
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    ast: syn::File,
}

/// Every file reachable from the crate's roots (`src/lib.rs`, `src/main.rs`, `src/bin/*.rs`),
/// `#[cfg(test)]` modules left out. Each root is a crate of its own; files are returned per
/// root in [`crate_roots`] order.
fn crate_files(krate: &Path) -> Vec<SourceFile> {
    crate_roots(krate)
        .into_iter()
        .flat_map(|root| {
            let mut out = Vec::new();
            let dir = root.parent().expect("root dir").to_path_buf();
            read_module(&root, Vec::new(), dir, &mut out);
            out
        })
        .collect()
}

fn crate_roots(krate: &Path) -> Vec<PathBuf> {
    let src = krate.join("src");
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
        let mut bins: Vec<PathBuf> = bins
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        bins.sort();
        roots.extend(bins);
    }
    roots
}

/// Reads `path` as module `module`, whose `mod x;` children live in `child_dir`.
fn read_module(path: &Path, module: Vec<String>, child_dir: PathBuf, out: &mut Vec<SourceFile>) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    let file_dir = path.parent().expect("file dir").to_path_buf();
    collect_children(&ast.items, &module, &child_dir, &file_dir, out);
    out.push(SourceFile {
        path: path.to_path_buf(),
        module,
        ast,
    });
}

fn collect_children(
    items: &[syn::Item],
    module: &[String],
    child_dir: &Path,
    file_dir: &Path,
    out: &mut Vec<SourceFile>,
) {
    for item in items {
        let syn::Item::Mod(m) = item else { continue };
        if is_test(&m.attrs) {
            continue;
        }
        let name = m.ident.to_string();
        let mut sub = module.to_vec();
        sub.push(name.clone());
        match &m.content {
            // Inline: its items are part of this file; its own `mod x;` are under `name/`.
            Some((_, inner)) => {
                collect_children(inner, &sub, &child_dir.join(&name), file_dir, out)
            }
            None => {
                let (file, dir) = match path_attr(&m.attrs) {
                    Some(p) => {
                        let file = file_dir.join(p);
                        let dir = file.parent().expect("dir").to_path_buf();
                        (file, dir)
                    }
                    None => {
                        let flat = child_dir.join(format!("{name}.rs"));
                        if flat.is_file() {
                            (flat, child_dir.join(&name))
                        } else {
                            (child_dir.join(&name).join("mod.rs"), child_dir.join(&name))
                        }
                    }
                };
                read_module(&file, sub, dir, out);
            }
        }
    }
}

fn path_attr(attrs: &[syn::Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| {
        if !a.path().is_ident("path") {
            return None;
        }
        match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value()),
                _ => None,
            },
            _ => None,
        }
    })
}

/// `#[test]`, `#[tokio::test]` and friends, or `#[cfg(test)]` (also inside `all(...)`).
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        if path.segments.last().is_some_and(|s| s.ident == "test") {
            return true;
        }
        if !path.is_ident("cfg") {
            return false;
        }
        let mut test = false;
        let _ = a.parse_nested_meta(|meta| {
            test |= meta.path.is_ident("test");
            if meta.path.is_ident("all") {
                meta.parse_nested_meta(|inner| {
                    test |= inner.path.is_ident("test");
                    Ok(())
                })?;
            }
            Ok(())
        });
        test
    })
}

struct LongFns<'a> {
    file: &'a str,
    found: &'a mut Vec<String>,
}

impl LongFns<'_> {
    fn measure(&mut self, name: &syn::Ident, sig: &syn::Signature, body: &syn::Block) {
        use syn::spanned::Spanned;
        let first = sig.span().start().line;
        let last = body.brace_token.span.close().end().line;
        let lines = last + 1 - first;
        if lines > MAX_FN_LINES {
            self.found
                .push(format!("{}:{first}: fn {name} is {lines} lines", self.file));
        }
    }
}

impl<'ast> Visit<'ast> for LongFns<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test(&f.attrs) {
            self.measure(&f.sig.ident, &f.sig, &f.block);
            syn::visit::visit_item_fn(self, f);
        }
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test(&f.attrs) {
            self.measure(&f.sig.ident, &f.sig, &f.block);
            syn::visit::visit_impl_item_fn(self, f);
        }
    }
    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if is_test(&f.attrs) {
            return;
        }
        if let Some(body) = &f.default {
            self.measure(&f.sig.ident, &f.sig, body);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

/// The cycles between the top-level modules of each crate root of `krate`; one line per cycle,
/// listing every edge's places.
fn import_cycles(root: &Path, krate: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for crate_root in crate_roots(krate) {
        let mut files = Vec::new();
        let dir = crate_root.parent().expect("root dir").to_path_buf();
        read_module(&crate_root, Vec::new(), dir, &mut files);
        let tops: BTreeSet<String> = files
            .iter()
            .filter_map(|f| f.module.first().cloned())
            .chain(files.iter().filter(|f| f.module.is_empty()).flat_map(|f| {
                // Inline top-level modules of the root.
                f.ast.items.iter().filter_map(|i| match i {
                    syn::Item::Mod(m) if !is_test(&m.attrs) => Some(m.ident.to_string()),
                    _ => None,
                })
            }))
            .collect();
        // edge (from, to) → places
        let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for file in &files {
            let rel = relative(root, &file.path);
            let mut paths = CratePaths {
                module: file.module.clone(),
                found: Vec::new(),
            };
            paths.visit_file(&file.ast);
            for (module, target, line) in paths.found {
                let Some(from) = module.first() else { continue };
                if from == &target || !tops.contains(&target) {
                    continue;
                }
                edges
                    .entry((from.clone(), target))
                    .or_default()
                    .push(format!("{rel}:{line}"));
            }
        }
        for scc in strongly_connected(&tops, &edges) {
            let members: BTreeSet<&String> = scc.iter().collect();
            let mut line = scc.join(" ↔ ");
            line.push_str(" —");
            for ((from, to), places) in &edges {
                if members.contains(from) && members.contains(to) {
                    let _ = write!(line, " [{from} → {to}: {}]", places.join(", "));
                }
            }
            out.push(line);
        }
    }
    out
}

/// Finds the top-level module each `crate::x` / `super::…::x` path names, with its line.
struct CratePaths {
    /// The module the visitor is in (grows with inline `mod`s).
    module: Vec<String>,
    /// (module the path is written in, top-level module it names, line)
    found: Vec<(Vec<String>, String, usize)>,
}

impl CratePaths {
    /// `segments` is a path's leading identifiers; records its target if it names a module.
    fn record(&mut self, segments: &[String], line: usize) {
        let Some(first) = segments.first() else {
            return;
        };
        let target = match first.as_str() {
            "crate" => segments.get(1).cloned(),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                if ups > self.module.len() {
                    return;
                }
                let mut resolved = self.module[..self.module.len() - ups].to_vec();
                resolved.extend(segments[ups..].iter().cloned());
                resolved.first().cloned()
            }
            _ => None,
        };
        if let Some(target) = target {
            self.found.push((self.module.clone(), target, line));
        }
    }

    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let tts: Vec<proc_macro2::TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tts.len() {
            if let proc_macro2::TokenTree::Group(g) = &tts[i] {
                self.tokens(g.stream());
                i += 1;
                continue;
            }
            let proc_macro2::TokenTree::Ident(id) = &tts[i] else {
                i += 1;
                continue;
            };
            if id != "crate" && id != "super" {
                i += 1;
                continue;
            }
            let line = id.span().start().line;
            let mut segments = vec![id.to_string()];
            let mut j = i + 1;
            loop {
                let colons = matches!(
                    (tts.get(j), tts.get(j + 1)),
                    (Some(proc_macro2::TokenTree::Punct(a)), Some(proc_macro2::TokenTree::Punct(b)))
                        if a.as_char() == ':' && b.as_char() == ':'
                );
                let Some(proc_macro2::TokenTree::Ident(next)) = tts.get(j + 2) else {
                    break;
                };
                if !colons {
                    break;
                }
                segments.push(next.to_string());
                j += 3;
            }
            self.record(&segments, line);
            i = j.max(i + 1);
        }
    }
}

impl<'ast> Visit<'ast> for CratePaths {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test(&m.attrs) {
            return;
        }
        if let Some((_, items)) = &m.content {
            self.module.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.module.pop();
        }
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = p.segments.first() {
            self.record(&segments, first.ident.span().start().line);
        }
        syn::visit::visit_path(self, p);
    }
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut prefixes = Vec::new();
        use_paths(&u.tree, &mut Vec::new(), &mut prefixes);
        for (segments, line) in prefixes {
            self.record(&segments, line);
        }
    }
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

/// Every path a `use` tree names, as its identifiers with the line of its first one.
fn use_paths(
    tree: &syn::UseTree,
    prefix: &mut Vec<(String, usize)>,
    out: &mut Vec<(Vec<String>, usize)>,
) {
    let finish =
        |prefix: &Vec<(String, usize)>, last: Option<(String, usize)>, out: &mut Vec<_>| {
            let mut segments: Vec<(String, usize)> = prefix.clone();
            segments.extend(last);
            if let Some((_, line)) = segments.first() {
                let line = *line;
                out.push((segments.into_iter().map(|(s, _)| s).collect(), line));
            }
        };
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push((p.ident.to_string(), p.ident.span().start().line));
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => finish(
            prefix,
            Some((n.ident.to_string(), n.ident.span().start().line)),
            out,
        ),
        syn::UseTree::Rename(r) => finish(
            prefix,
            Some((r.ident.to_string(), r.ident.span().start().line)),
            out,
        ),
        syn::UseTree::Glob(_) => finish(prefix, None, out),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

/// Tarjan's strongly connected components with more than one member, each sorted.
fn strongly_connected(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<(String, String), Vec<String>>,
) -> Vec<Vec<String>> {
    let names: Vec<&String> = nodes.iter().collect();
    let index_of: BTreeMap<&String, usize> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut adj = vec![Vec::new(); names.len()];
    for (from, to) in edges.keys() {
        if let (Some(&f), Some(&t)) = (index_of.get(from), index_of.get(to)) {
            adj[f].push(t);
        }
    }
    struct State {
        next: usize,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        stack: Vec<usize>,
        on_stack: Vec<bool>,
        out: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adj: &[Vec<usize>], s: &mut State) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for &w in &adj[v] {
            match s.index[w] {
                None => {
                    visit(w, adj, s);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.out.push(component);
            }
        }
    }
    let n = names.len();
    let mut s = State {
        next: 0,
        index: vec![None; n],
        low: vec![0; n],
        stack: Vec::new(),
        on_stack: vec![false; n],
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            visit(v, &adj, &mut s);
        }
    }
    let mut out: Vec<Vec<String>> = s
        .out
        .into_iter()
        .map(|c| {
            let mut c: Vec<String> = c.into_iter().map(|i| names[i].clone()).collect();
            c.sort();
            c
        })
        .collect();
    out.sort();
    out
}

/// The checker itself, on sources written here: it must see what it is meant to see.
mod checker {
    use super::*;

    fn parse(src: &str) -> syn::File {
        syn::parse_file(src).expect("parse")
    }

    #[test]
    fn counts_a_long_function_and_skips_tests() {
        let body = "    let _x = 1;\n".repeat(MAX_FN_LINES - 1);
        let src = format!(
            "fn long() {{\n{body}}}\nfn fits() {{\n{}}}\n#[cfg(test)]\nmod tests {{ fn t() {{\n{body}}} }}\n",
            "    let _x = 1;\n".repeat(MAX_FN_LINES - 2)
        );
        let mut found = Vec::new();
        LongFns {
            file: "x.rs",
            found: &mut found,
        }
        .visit_file(&parse(&src));
        assert_eq!(
            found,
            vec![format!("x.rs:1: fn long is {} lines", MAX_FN_LINES + 1)]
        );
    }

    #[test]
    fn finds_crate_and_super_paths_in_uses_code_and_macros() {
        let src = "use crate::a::{B, c::D};\nfn f() { crate::b::g(); }\nfn h() { format!(\"{}\", crate::c::X); }\nmod inner { use super::super::d::E; }\n";
        let mut paths = CratePaths {
            module: vec!["m".into(), "n".into()],
            found: Vec::new(),
        };
        paths.visit_file(&parse(src));
        let targets: Vec<(String, usize)> =
            paths.found.into_iter().map(|(_, t, l)| (t, l)).collect();
        assert_eq!(
            targets,
            vec![
                ("a".into(), 1),
                ("a".into(), 1),
                ("b".into(), 2),
                ("c".into(), 3),
                ("m".into(), 4)
            ]
        );
    }

    #[test]
    fn finds_a_cycle() {
        let nodes: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let mut edges = BTreeMap::new();
        for (f, t) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            edges.insert((f.to_string(), t.to_string()), vec![]);
        }
        assert_eq!(
            strongly_connected(&nodes, &edges),
            vec![vec!["a", "b", "c"]]
        );
    }
}
