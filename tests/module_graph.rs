#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The module graph under `src/` has no cycles: imports run downhill, from `app` down to the
//! leaves (`ARCHITECTURE.md` has the map). A cycle between two files means neither can be read,
//! tested or moved without the other, so CI fails on the first one and prints it.
//!
//! What the check reads: every `.rs` file under `src/` (the library; `main.rs` is the binary on
//! top and imports the library by name, so it cannot close a cycle), with comments and string
//! literals blanked out and `#[cfg(test)]` items skipped (a unit test may reach up; the product
//! may not). Each file is one node, named by its module path: `foo.rs` and `foo/mod.rs` are both
//! `crate::foo`, `foo/bar.rs` is `crate::foo::bar`, and inline `mod x { .. }` blocks belong to
//! their file. Each path that names something in the crate is an edge: `use crate::..`,
//! `use super::..`, `use self::..`, a `use` of a child module, the same paths in code, and code
//! paths through a name a `use` brought in (`use crate::limit; limit::Limiter`).
//!
//! A path is followed to the file that *defines* the item: through `pub use` re-exports (and
//! `pub use child::*` when the child defines the name), so a facade `mod.rs` that re-exports its
//! children is not mistaken for their author. Two kinds of reference are not edges: a file's
//! references to itself, and a file's references to items its ancestor modules define (a child
//! using its room's shared types, say `super::Problem`, while the room's `mod.rs` uses the child,
//! is the module tree itself, not a cycle). A parent using its child is an edge like any other,
//! so a cycle that runs through a room's `mod.rs` is still found. Names a glob import of an
//! ancestor brings in (`use super::*` outside tests) are not followed.
//!
//! A second check collapses the files into rooms (the modules right under the crate root) and
//! asks the same of them, so two rooms cannot use each other through different files either.
//! `MODULE_GRAPH_EDGES=1 cargo test --test module_graph -- --nocapture` prints every edge.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A module path from the crate root: `[]` is `lib.rs`, `["config", "policy"]` is
/// `src/config/policy.rs`.
type ModPath = Vec<String>;

// === reading source: comments and literals out ===

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `source` with comments and the contents of string and char literals replaced by spaces
/// (newlines kept, so line numbers stay right). Lifetimes and labels are kept as they are.
fn blank_comments_and_literals(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let prev = if i > 0 { Some(chars[i - 1]) } else { None };
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            continue;
        }
        // Raw strings: r"..", r#".."#, br#".."# (the `r` not the end of an identifier).
        let starts_word =
            prev.is_none_or(|p| !is_ident_char(p)) || (prev == Some('b') && (i < 2 || !is_ident_char(chars[i - 2])));
        if c == 'r' && starts_word && matches!(next, Some('"') | Some('#')) {
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            if chars.get(j) == Some(&'"') {
                let hashes = j - i - 1;
                out.push('r');
                out.extend(std::iter::repeat_n(' ', hashes));
                out.push('"');
                j += 1;
                while j < chars.len() {
                    if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                        break;
                    }
                    out.push(blank(chars[j]));
                    j += 1;
                }
                out.push('"');
                out.extend(std::iter::repeat_n(' ', hashes));
                i = (j + 1 + hashes).min(chars.len());
                continue;
            }
        }
        if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    out.push(' ');
                    i += 1;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push('"');
            i += 1;
            continue;
        }
        if c == '\'' {
            // A char literal ('x', '\n', '\u{1F600}'), or else a lifetime or label ('a).
            let end = if next == Some('\\') {
                // `'\''`: the quote after the backslash is the char, not the end.
                (i + 3..chars.len().min(i + 12)).find(|&j| chars[j] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            if let Some(end) = end {
                out.push('\'');
                out.extend(std::iter::repeat_n(' ', end - i - 1));
                out.push('\'');
                i = end + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: String,
    line: usize,
}

/// Identifiers (`$crate` as `crate`), `::`, and single punctuation characters; numbers and
/// blanked literals are dropped.
fn tokens(clean: &str) -> Vec<Token> {
    let chars: Vec<char> = clean.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
        } else if is_ident_char(c) || (c == '$' && chars.get(i + 1).is_some_and(|n| is_ident_char(*n))) {
            let start = if c == '$' { i + 1 } else { i };
            i = start;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token { text: chars[start..i].iter().collect(), line });
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(Token { text: "::".into(), line });
            i += 2;
        } else if c == '\'' && chars.get(i + 1).is_some_and(|n| is_ident_char(*n)) {
            // A lifetime or label: one token, so `'static` is not the keyword.
            let start = i;
            i += 1;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token { text: chars[start..i].iter().collect(), line });
        } else if c == '"' || c == '\'' {
            i += 1;
        } else {
            out.push(Token { text: c.to_string(), line });
            i += 1;
        }
    }
    out
}

// === one file: what it declares, defines, imports and names ===

/// A path as written in a module, before it is resolved.
#[derive(Debug, Clone)]
struct Written {
    /// The module the path is written in (a file's module, or an inline module inside it).
    context: ModPath,
    segments: Vec<String>,
    line: usize,
}

/// One leaf of a `use` tree: `use a::b::{c, d as e, self, *}` has four.
#[derive(Debug, Clone)]
struct UseLeaf {
    path: Written,
    /// The name it brings into scope (`None` for a glob).
    alias: Option<String>,
}

#[derive(Debug, Default)]
struct Scanned {
    /// Modules this file holds: its own, and inline `mod x { .. }` blocks.
    modules: Vec<ModPath>,
    /// Child modules declared with `mod x;` (in a file of their own), by declaring module.
    children: Vec<(ModPath, String)>,
    /// Child modules declared under `#[cfg(test)]`: their files are left out.
    test_children: Vec<ModPath>,
    /// Names of items defined at module level, by module.
    defined: Vec<(ModPath, String)>,
    uses: Vec<UseLeaf>,
    /// Paths in code (outside `use`) that start with `crate`, `super`, `self` or a plain
    /// identifier followed by `::` (resolved later, if that identifier names a module of ours).
    paths: Vec<Written>,
    /// The whole file is `#![cfg(test)]`.
    test_only: bool,
}

const DEFINING: &[&str] = &["struct", "enum", "union", "trait", "type", "fn", "const", "static"];

/// Walks a file's tokens once, tracking inline modules by brace depth.
fn scan(module: &ModPath, source: &str) -> Scanned {
    let tokens = tokens(&blank_comments_and_literals(source));
    let mut scanned = Scanned { modules: vec![module.clone()], ..Scanned::default() };
    // Inline modules open at this brace depth: (name, depth before its `{`).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut skip_next_item = false;
    let mut i = 0;
    let current = |inline: &[(String, usize)]| {
        let mut path = module.clone();
        path.extend(inline.iter().map(|(name, _)| name.clone()));
        path
    };
    while i < tokens.len() {
        let text = tokens[i].text.as_str();
        let level = inline.last().map_or(0, |(_, open)| open + 1);
        match text {
            "#" => {
                let inner = tokens.get(i + 1).is_some_and(|t| t.text == "!");
                let open = if inner { i + 2 } else { i + 1 };
                if tokens.get(open).is_some_and(|t| t.text == "[") {
                    let close = matching(&tokens, open);
                    let attribute: Vec<&str> = tokens[open + 1..close].iter().map(|t| t.text.as_str()).collect();
                    if attribute == ["cfg", "(", "test", ")"] {
                        if inner && depth == 0 {
                            scanned.test_only = true;
                            return scanned;
                        }
                        skip_next_item = !inner;
                    }
                    i = close + 1;
                    continue;
                }
            }
            _ if skip_next_item => {
                skip_next_item = false;
                let end = item_end(&tokens, i);
                // `#[cfg(test)] mod tests;`: that file is test code too.
                if let Some(at) = (i..end).find(|&j| tokens[j].text == "mod") {
                    let is_decl = tokens.get(at + 2).is_some_and(|t| t.text == ";");
                    if let (true, Some(name)) = (is_decl, tokens.get(at + 1)) {
                        let mut child = current(&inline);
                        child.push(name.text.clone());
                        scanned.test_children.push(child);
                    }
                }
                i = end;
                continue;
            }
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, open)| *open == depth) {
                    inline.pop();
                }
            }
            "use" => {
                let end = (i..tokens.len()).find(|&j| tokens[j].text == ";").unwrap_or(tokens.len());
                let context = current(&inline);
                let mut leaves = Vec::new();
                use_tree(&tokens[i + 1..end], &mut Vec::new(), &mut leaves);
                for (segments, alias) in leaves {
                    let line = tokens[i].line;
                    scanned.uses.push(UseLeaf { path: Written { context: context.clone(), segments, line }, alias });
                }
                i = end + 1;
                continue;
            }
            "mod" if depth == level => {
                if let (Some(name), Some(after)) = (tokens.get(i + 1), tokens.get(i + 2)) {
                    let context = current(&inline);
                    scanned.defined.push((context.clone(), name.text.clone()));
                    if after.text == ";" {
                        scanned.children.push((context, name.text.clone()));
                    } else if after.text == "{" {
                        inline.push((name.text.clone(), depth));
                        scanned.modules.push(current(&inline));
                        depth += 1;
                        i += 3;
                        continue;
                    }
                }
            }
            "macro_rules" if depth == level => {
                if let Some(name) = tokens.get(i + 2) {
                    scanned.defined.push((current(&inline), name.text.clone()));
                }
            }
            keyword if depth == level && DEFINING.contains(&keyword) => {
                // `const fn f`, `static mut X`: the name is after the second keyword.
                let mut at = i + 1;
                while tokens.get(at).is_some_and(|t| matches!(t.text.as_str(), "fn" | "mut")) {
                    at += 1;
                }
                if let Some(name) = tokens.get(at).filter(|t| t.text.starts_with(is_ident_char_start)) {
                    scanned.defined.push((current(&inline), name.text.clone()));
                }
            }
            _ => {}
        }
        // A path: an identifier followed by `::`, not itself in the middle of a path.
        let starts_path = text.starts_with(is_ident_char_start)
            && tokens.get(i + 1).is_some_and(|t| t.text == "::")
            && (i == 0 || tokens[i - 1].text != "::");
        if starts_path {
            let mut segments = vec![text.to_owned()];
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t.text == "::")
                && tokens.get(j + 1).is_some_and(|t| t.text.starts_with(is_ident_char_start))
            {
                segments.push(tokens[j + 1].text.clone());
                j += 2;
            }
            scanned.paths.push(Written { context: current(&inline), segments, line: tokens[i].line });
            i = j;
            continue;
        }
        i += 1;
    }
    scanned
}

fn is_ident_char_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

/// The index of the bracket closing the one at `open`.
fn matching(tokens: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, token) in tokens.iter().enumerate().skip(open) {
        match token.text.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    tokens.len().saturating_sub(1)
}

/// The index just past the item starting at `start`: its `;`, its `{ .. }` body, or (for a
/// field, variant or argument) its `,`; or the `}` that closes what it sits in, unconsumed.
fn item_end(tokens: &[Token], start: usize) -> usize {
    let mut depth = 0usize;
    for (j, token) in tokens.iter().enumerate().skip(start) {
        match token.text.as_str() {
            "{" if depth == 0 => return matching(tokens, j) + 1,
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" if depth == 0 => return j,
            ")" | "]" | "}" => depth -= 1,
            ";" | "," if depth == 0 => return j + 1,
            _ => {}
        }
    }
    tokens.len()
}

/// The leaves of a `use` tree (`tokens` is what follows `use`, up to its `;`), each with the
/// name it binds.
fn use_tree(tokens: &[Token], prefix: &mut Vec<String>, leaves: &mut Vec<(Vec<String>, Option<String>)>) {
    let mut i = 0;
    // A leading `::` (`use ::std::..`) names an extern crate.
    if tokens.first().is_some_and(|t| t.text == "::") {
        return;
    }
    let base = prefix.len();
    while i < tokens.len() {
        let text = tokens[i].text.as_str();
        match text {
            "{" => {
                let close = matching(tokens, i);
                // Split the group at its top-level commas.
                let inside = &tokens[i + 1..close];
                let mut depth = 0usize;
                let mut from = 0;
                for (j, token) in inside.iter().enumerate() {
                    match token.text.as_str() {
                        "{" => depth += 1,
                        "}" => depth -= 1,
                        "," if depth == 0 => {
                            use_tree(&inside[from..j], prefix, leaves);
                            from = j + 1;
                        }
                        _ => {}
                    }
                }
                use_tree(&inside[from..], prefix, leaves);
                prefix.truncate(base);
                return;
            }
            "*" => {
                leaves.push((prefix.clone(), None));
                prefix.truncate(base);
                return;
            }
            "::" => {}
            "self" if !prefix.is_empty() && i == 0 => {
                let alias = alias_after(&tokens[i + 1..]).or_else(|| prefix.last().cloned());
                leaves.push((prefix.clone(), alias));
                prefix.truncate(base);
                return;
            }
            "as" => break,
            _ => prefix.push(text.to_owned()),
        }
        i += 1;
    }
    if prefix.len() > base {
        let alias = alias_after(&tokens[i..]).or_else(|| prefix.last().cloned());
        leaves.push((prefix.clone(), alias));
    }
    prefix.truncate(base);
}

fn alias_after(tokens: &[Token]) -> Option<String> {
    match tokens {
        [first, name, ..] if first.text == "as" => Some(name.text.clone()),
        _ => None,
    }
}

// === the crate: resolution and the graph ===

/// The module path of a file under `src/`, or `None` for the binary root.
fn module_of(relative: &Path) -> Option<ModPath> {
    let mut parts: Vec<String> = relative.iter().map(|part| part.to_string_lossy().into_owned()).collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    match (parts.is_empty(), stem) {
        (true, "lib") => Some(Vec::new()),
        (true, "main") => None,
        (_, "mod") => Some(parts),
        _ => {
            parts.push(stem.to_owned());
            Some(parts)
        }
    }
}

/// One edge's evidence: where the path was written, and how.
#[derive(Debug, Clone)]
struct Evidence {
    line: usize,
    written: String,
}

struct Crate {
    /// Display names of the files (`src/config/file.rs`), by node index.
    files: Vec<String>,
    /// Each file's module path, by node index.
    file_modules: Vec<ModPath>,
    /// Every module (file or inline) and the file it lives in.
    module_file: HashMap<ModPath, usize>,
    children: HashMap<ModPath, BTreeSet<String>>,
    defined: HashMap<ModPath, BTreeSet<String>>,
    /// Named imports by module: the name, and the path it stands for.
    imports: HashMap<ModPath, Vec<(String, Written)>>,
    globs: HashMap<ModPath, Vec<Written>>,
    /// Edges, with the first reference that made each.
    edges: BTreeMap<(usize, usize), Evidence>,
}

/// How deep re-exports and aliases are followed before giving up (a `use` cycle is a compile
/// error, so this is only a guard).
const MAX_HOPS: usize = 16;

impl Crate {
    /// Builds the graph from `(path under src/, source)` pairs.
    fn build(sources: &[(PathBuf, String)]) -> Self {
        let mut scanned = Vec::new();
        for (relative, source) in sources {
            let Some(module) = module_of(relative) else { continue };
            scanned.push((format!("src/{}", relative.display()), module.clone(), scan(&module, source)));
        }
        // Test-only files (and modules below them) are left out.
        let test_modules: Vec<ModPath> = scanned
            .iter()
            .flat_map(|(_, module, scanned)| {
                let whole = scanned.test_only.then(|| module.clone());
                scanned.test_children.iter().cloned().chain(whole)
            })
            .collect();
        scanned.retain(|(_, module, _)| !test_modules.iter().any(|test| module.starts_with(test)));
        let mut graph = Crate {
            files: Vec::new(),
            file_modules: Vec::new(),
            module_file: HashMap::new(),
            children: HashMap::new(),
            defined: HashMap::new(),
            imports: HashMap::new(),
            globs: HashMap::new(),
            edges: BTreeMap::new(),
        };
        for (index, (name, module, file)) in scanned.iter().enumerate() {
            graph.files.push(name.clone());
            graph.file_modules.push(module.clone());
            for inner in &file.modules {
                graph.module_file.insert(inner.clone(), index);
            }
            for (parent, child) in &file.children {
                graph.children.entry(parent.clone()).or_default().insert(child.clone());
            }
            for (at, name) in &file.defined {
                graph.defined.entry(at.clone()).or_default().insert(name.clone());
            }
            for leaf in &file.uses {
                match &leaf.alias {
                    Some(alias) => graph
                        .imports
                        .entry(leaf.path.context.clone())
                        .or_default()
                        .push((alias.clone(), leaf.path.clone())),
                    None => graph.globs.entry(leaf.path.context.clone()).or_default().push(leaf.path.clone()),
                }
            }
        }
        for (index, (_, _, file)) in scanned.iter().enumerate() {
            for written in file.uses.iter().map(|leaf| &leaf.path).chain(&file.paths) {
                let Some(absolute) = graph.absolute(written, 0) else { continue };
                let (target, _) = graph.resolve(&absolute, 0);
                let Some(&to) = graph.module_file.get(&target) else { continue };
                let from_module = &graph.file_modules[index];
                let to_module = &graph.file_modules[to];
                // Itself, or an item its own ancestor defines: the module tree, not an import.
                if to == index || (from_module.starts_with(to_module) && from_module != to_module) {
                    continue;
                }
                let evidence = Evidence { line: written.line, written: written.segments.join("::") };
                graph.edges.entry((index, to)).or_insert(evidence);
            }
        }
        graph
    }

    /// The path from the crate root that `written` names, if it names something in this crate.
    fn absolute(&self, written: &Written, hops: usize) -> Option<ModPath> {
        let (first, rest) = written.segments.split_first()?;
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => written.context.clone(),
            "super" => {
                let mut base = written.context.clone();
                base.pop()?;
                let mut rest = rest;
                while rest.first().is_some_and(|segment| segment == "super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
                base.extend(rest.iter().cloned());
                return Some(base);
            }
            name if self.children.get(&written.context).is_some_and(|children| children.contains(name)) => {
                let mut base = written.context.clone();
                base.push(name.to_owned());
                base
            }
            name if hops < MAX_HOPS => {
                // A name an import of this module brought in (`use crate::limit;`).
                let imports = self.imports.get(&written.context)?;
                let (_, target) = imports.iter().find(|(alias, _)| alias == name)?;
                self.absolute(target, hops + 1)?
            }
            _ => return None,
        };
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The module that defines what `path` names, following re-exports; and whether the name
    /// was found there (else the path's longest module prefix).
    fn resolve(&self, path: &[String], hops: usize) -> (ModPath, bool) {
        let known = (0..=path.len()).rev().find(|&n| self.module_file.contains_key(&path[..n])).unwrap_or(0);
        let module = path[..known].to_vec();
        let Some(name) = path.get(known) else { return (module, true) };
        if hops >= MAX_HOPS || self.defined.get(&module).is_some_and(|names| names.contains(name)) {
            return (module, true);
        }
        let rest = &path[known + 1..];
        if let Some(imports) = self.imports.get(&module) {
            for (alias, target) in imports {
                if alias != name {
                    continue;
                }
                if let Some(mut absolute) = self.absolute(target, hops + 1) {
                    absolute.extend(rest.iter().cloned());
                    return self.resolve(&absolute, hops + 1);
                }
            }
        }
        for glob in self.globs.get(&module).into_iter().flatten() {
            let Some(mut absolute) = self.absolute(glob, hops + 1) else { continue };
            absolute.extend(path[known..].iter().cloned());
            let (found, defined) = self.resolve(&absolute, hops + 1);
            if defined {
                return (found, true);
            }
        }
        (module, false)
    }

    /// The graph between files.
    fn file_graph(&self) -> Graph {
        let edges = self
            .edges
            .iter()
            .map(|(&(from, to), evidence)| {
                ((from, to), format!("{}:{} names `{}`", self.files[from], evidence.line, evidence.written))
            })
            .collect();
        Graph { names: self.files.clone(), edges }
    }

    /// The graph between rooms: the modules right under the crate root (`config`, `limit`,
    /// `state`, ..), each with everything below it. `lib.rs` is no room.
    fn room_graph(&self) -> Graph {
        let mut names: Vec<String> = Vec::new();
        let mut room_of = Vec::new();
        for module in &self.file_modules {
            let room = module.first().map(|first| format!("crate::{first}"));
            room_of.push(room.map(|room| match names.iter().position(|name| *name == room) {
                Some(at) => at,
                None => {
                    names.push(room);
                    names.len() - 1
                }
            }));
        }
        let mut edges = BTreeMap::new();
        for (&(from, to), evidence) in &self.edges {
            if let (Some(a), Some(b)) = (room_of[from], room_of[to]) {
                if a != b {
                    let text = format!("{}:{} names `{}`", self.files[from], evidence.line, evidence.written);
                    edges.entry((a, b)).or_insert(text);
                }
            }
        }
        Graph { names, edges }
    }
}

/// Nodes and the edges between them, each with the first reference that made it.
struct Graph {
    names: Vec<String>,
    edges: BTreeMap<(usize, usize), String>,
}

impl Graph {
    /// Strongly connected components with more than one node: every cycle lies in one.
    fn cycles(&self) -> Vec<Vec<usize>> {
        let mut next: Vec<Vec<usize>> = vec![Vec::new(); self.names.len()];
        for &(from, to) in self.edges.keys() {
            next[from].push(to);
        }
        tarjan(&next).into_iter().filter(|component| component.len() > 1).collect()
    }

    /// One shortest cycle through the first node of `component`, as a path that starts and
    /// ends there.
    fn example_cycle(&self, component: &[usize]) -> Vec<usize> {
        let start = component[0];
        let inside: BTreeSet<usize> = component.iter().copied().collect();
        let mut came_from: HashMap<usize, usize> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(at) = queue.pop_front() {
            for &(from, to) in self.edges.keys() {
                if from != at || !inside.contains(&to) {
                    continue;
                }
                if to == start {
                    let mut path = vec![start, at];
                    let mut step = at;
                    while step != start {
                        step = came_from[&step];
                        path.push(step);
                    }
                    path.reverse();
                    return path;
                }
                if let std::collections::hash_map::Entry::Vacant(entry) = came_from.entry(to) {
                    entry.insert(at);
                    queue.push_back(to);
                }
            }
        }
        component.to_vec()
    }

    fn cycle_names(&self) -> Vec<Vec<String>> {
        self.cycles().iter().map(|component| component.iter().map(|&node| self.names[node].clone()).collect()).collect()
    }

    /// Every cycle: the nodes tangled together, and one way round with the reference behind
    /// each step.
    fn report(&self, what: &str) -> String {
        let cycles = self.cycles();
        let mut out = format!("the module graph under src/ has {} cycle(s) between {what}:\n", cycles.len());
        for (n, component) in cycles.iter().enumerate() {
            let names: Vec<&str> = component.iter().map(|&node| self.names[node].as_str()).collect();
            let _ = writeln!(out, "\ncycle {}: {} {what} tangled together: {}", n + 1, names.len(), names.join(", "));
            let _ = writeln!(out, "  for example:");
            for pair in self.example_cycle(component).windows(2) {
                let evidence = &self.edges[&(pair[0], pair[1])];
                let _ = writeln!(out, "    {} -> {}   ({evidence})", self.names[pair[0]], self.names[pair[1]]);
            }
        }
        out.push_str("\nImports must run downhill: move the shared item into the lower module (or a leaf both use).\n");
        out
    }
}

/// Tarjan's strongly connected components over adjacency lists.
fn tarjan(next: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        next: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        counter: usize,
        components: Vec<Vec<usize>>,
    }
    fn visit(state: &mut State<'_>, node: usize) {
        state.index[node] = Some(state.counter);
        state.low[node] = state.counter;
        state.counter += 1;
        state.stack.push(node);
        state.on_stack[node] = true;
        for &to in &state.next[node] {
            match state.index[to] {
                None => {
                    visit(state, to);
                    state.low[node] = state.low[node].min(state.low[to]);
                }
                Some(seen) if state.on_stack[to] => state.low[node] = state.low[node].min(seen),
                Some(_) => {}
            }
        }
        if Some(state.low[node]) == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack[top] = false;
                component.push(top);
                if top == node {
                    break;
                }
            }
            component.sort_unstable();
            state.components.push(component);
        }
    }
    let count = next.len();
    let mut state = State {
        next,
        index: vec![None; count],
        low: vec![0; count],
        on_stack: vec![false; count],
        stack: Vec::new(),
        counter: 0,
        components: Vec::new(),
    };
    for node in 0..count {
        if state.index[node].is_none() {
            visit(&mut state, node);
        }
    }
    state.components.sort();
    state.components
}

/// Every `.rs` file under `dir`, as (path relative to `dir`, source), in a stable order.
fn read_tree(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    // Bounded: a source tree has far fewer directories than this.
    for _ in 0..10_000 {
        let Some(at) = pending.pop() else { break };
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), source));
            }
        }
    }
    out.sort();
    out
}

fn read_src() -> Crate {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = Crate::build(&read_tree(&src));
    assert!(graph.files.len() > 20, "src/ was not read: {:?}", graph.files);
    assert!(graph.edges.len() > 20, "no imports were found: the scanner is broken");
    graph
}

/// No two files under `src/` import each other, directly or round a loop.
#[test]
fn the_module_graph_under_src_is_acyclic() {
    let graph = read_src().file_graph();
    println!("{} files, {} edges between them", graph.names.len(), graph.edges.len());
    if std::env::var_os("MODULE_GRAPH_EDGES").is_some() {
        for (&(from, to), evidence) in &graph.edges {
            println!("{} -> {}   ({evidence})", graph.names[from], graph.names[to]);
        }
    }
    assert!(graph.cycles().is_empty(), "{}", graph.report("files"));
}

/// The rooms (the modules under the crate root) form a DAG too, as `ARCHITECTURE.md` draws
/// them: a room may not reach up to one that uses it, even through different files.
#[test]
fn the_rooms_under_src_form_a_dag() {
    let graph = read_src().room_graph();
    println!("{} rooms, {} edges between them", graph.names.len(), graph.edges.len());
    assert!(graph.cycles().is_empty(), "{}", graph.report("rooms"));
}

// === the checker itself, on tiny synthetic crates ===

fn synthetic(files: &[(&str, &str)]) -> Crate {
    let sources: Vec<(PathBuf, String)> =
        files.iter().map(|(path, source)| (PathBuf::from(path), (*source).to_owned())).collect();
    Crate::build(&sources)
}

fn edge_names(graph: &Crate) -> Vec<(String, String)> {
    graph.edges.keys().map(|&(from, to)| (graph.files[from].clone(), graph.files[to].clone())).collect()
}

fn cycle_names(graph: &Crate) -> Vec<Vec<String>> {
    graph.file_graph().cycle_names()
}

#[test]
fn a_cycle_is_found_and_printed() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::b::Bee;\npub struct Ay;\n"),
        ("b/mod.rs", "pub struct Bee;\nfn f() -> crate::c::Sea { todo!() }\n"),
        ("c.rs", "pub struct Sea(super::a::Ay);\n"),
    ]);
    assert_eq!(cycle_names(&graph), [["src/a.rs", "src/b/mod.rs", "src/c.rs"]]);
    let report = graph.file_graph().report("files");
    println!("{report}");
    assert!(report.contains("src/a.rs -> src/b/mod.rs   (src/a.rs:1 names `crate::b::Bee`)"), "{report}");
    assert!(report.contains("src/b/mod.rs -> src/c.rs   (src/b/mod.rs:2 names `crate::c::Sea`)"), "{report}");
    assert!(report.contains("src/c.rs -> src/a.rs   (src/c.rs:1 names `super::a::Ay`)"), "{report}");
}

#[test]
fn an_acyclic_crate_passes_with_its_edges() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod leaf;\npub mod mid;\npub mod top;\n"),
        ("leaf.rs", "pub struct Leaf;\n"),
        ("mid/mod.rs", "mod part;\npub use part::Part;\n"),
        ("mid/part.rs", "pub struct Part(crate::leaf::Leaf);\n"),
        ("top.rs", "use crate::mid::{self, Part};\nfn f(_: mid::Part, _: Part) {}\n"),
        ("main.rs", "use sluice::top;\nfn main() {}\n"),
    ]);
    assert!(cycle_names(&graph).is_empty());
    assert_eq!(
        edge_names(&graph),
        [
            ("src/mid/mod.rs".to_owned(), "src/mid/part.rs".to_owned()),
            ("src/mid/part.rs".to_owned(), "src/leaf.rs".to_owned()),
            ("src/top.rs".to_owned(), "src/mid/mod.rs".to_owned()),
            ("src/top.rs".to_owned(), "src/mid/part.rs".to_owned()),
        ]
    );
}

/// `use crate::facade::Thing`, re-exported by `facade/mod.rs` from `facade/inner.rs`, is an
/// edge to `inner.rs`; and a cycle through it is found, not hidden behind the facade.
#[test]
fn re_exports_are_followed_to_the_defining_file() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod facade;\npub mod user;\n"),
        ("facade/mod.rs", "mod inner;\nmod globbed;\npub use inner::Thing;\npub use globbed::*;\n"),
        ("facade/inner.rs", "pub struct Thing;\npub fn f() { crate::user::g(); }\n"),
        ("facade/globbed.rs", "pub enum Other { A }\n"),
        ("user.rs", "use crate::facade::Thing;\npub fn g() { let _ = crate::facade::Other::A; }\n"),
    ]);
    let edges = edge_names(&graph);
    assert!(edges.contains(&("src/user.rs".into(), "src/facade/inner.rs".into())), "{edges:?}");
    assert!(edges.contains(&("src/user.rs".into(), "src/facade/globbed.rs".into())), "{edges:?}");
    assert!(!edges.contains(&("src/user.rs".into(), "src/facade/mod.rs".into())), "{edges:?}");
    assert_eq!(cycle_names(&graph), [["src/facade/inner.rs", "src/user.rs"]]);
}

/// A child using its room's own types while the room's `mod.rs` uses the child is the module
/// tree, not a cycle; two siblings using each other are.
#[test]
fn parents_and_children_are_not_a_cycle_but_siblings_are() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod room;\n"),
        ("room/mod.rs", "mod a;\nmod b;\npub struct Problem;\npub fn run() { a::go(); }\n"),
        ("room/a.rs", "use super::Problem;\nuse super::b::Bee;\npub fn go() {}\n"),
        ("room/b.rs", "pub struct Bee;\nfn f() { super::super::room::a::go(); }\n"),
    ]);
    assert_eq!(cycle_names(&graph), [["src/room/a.rs", "src/room/b.rs"]]);
    let edges = edge_names(&graph);
    assert!(edges.contains(&("src/room/mod.rs".into(), "src/room/a.rs".into())), "{edges:?}");
    assert!(!edges.contains(&("src/room/a.rs".into(), "src/room/mod.rs".into())), "{edges:?}");
}

/// Comments, doc comments, strings and `#[cfg(test)]` code name nothing.
#[test]
fn comments_strings_and_test_code_are_not_imports() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod low;\npub mod high;\n"),
        (
            "low.rs",
            "//! See [`crate::high::High`].\n\
             /* crate::high::High */\n\
             pub struct Low;\n\
             const S: &str = \"crate::high::High\";\n\
             const R: &str = r#\"crate::high::High\"#;\n\
             fn life<'a>(x: &'a str) -> char { let _ = x; '\"' }\n\
             #[cfg(test)]\nmod tests { use crate::high::High; }\n\
             #[cfg(test)]\nmod more;\n",
        ),
        ("low/more.rs", "use crate::high::High;\n"),
        ("high.rs", "pub struct High(crate::low::Low);\n"),
    ]);
    assert!(cycle_names(&graph).is_empty(), "{}", graph.file_graph().report("files"));
    assert_eq!(edge_names(&graph), [("src/high.rs".to_owned(), "src/low.rs".to_owned())]);
    assert!(!graph.files.iter().any(|file| file == "src/low/more.rs"), "{:?}", graph.files);
}

/// Two rooms that use each other through different files: no two files form a cycle, the rooms
/// do.
#[test]
fn a_cycle_between_rooms_through_different_files_is_found() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod x;\npub mod y;\n"),
        ("x/mod.rs", "pub mod a;\npub mod d;\n"),
        ("x/a.rs", "pub fn a() { crate::y::b::B::new(); }\n"),
        ("x/d.rs", "pub struct D;\n"),
        ("y/mod.rs", "pub mod b;\npub mod c;\n"),
        ("y/b.rs", "pub struct B;\n"),
        ("y/c.rs", "use crate::x::d::D;\n"),
    ]);
    assert!(cycle_names(&graph).is_empty(), "{}", graph.file_graph().report("files"));
    let rooms = graph.room_graph();
    assert_eq!(rooms.cycle_names(), [["crate::x", "crate::y"]]);
    let report = rooms.report("rooms");
    println!("{report}");
    assert!(report.contains("crate::x -> crate::y   (src/x/a.rs:1 names `crate::y::b::B::new`)"), "{report}");
    assert!(report.contains("crate::y -> crate::x   (src/y/c.rs:1 names `crate::x::d::D`)"), "{report}");
}

/// An attribute on a field or a statement skips that much, not the rest of the block; an
/// escaped quote is a char literal.
#[test]
fn test_only_fields_and_escaped_quotes_skip_no_more_than_themselves() {
    let graph = synthetic(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        (
            "a.rs",
            "pub struct A {\n    #[cfg(test)]\n    probe: u8,\n    b: crate::b::B,\n}\n\
             fn f() -> char { '\\'' }\n\
             fn g() { let _ = crate::c::C; }\n",
        ),
        ("b.rs", "pub struct B;\n"),
        ("c.rs", "pub struct C;\n"),
    ]);
    assert_eq!(
        edge_names(&graph),
        [("src/a.rs".to_owned(), "src/b.rs".to_owned()), ("src/a.rs".to_owned(), "src/c.rs".to_owned())]
    );
}
